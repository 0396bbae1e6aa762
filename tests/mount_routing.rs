//! Reads of an inode execute on its owner shard only, as the `--stats` counters show.

mod common;

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;

use common::{pattern, read_all, snapshot, Mount, MountOptions};
use mount_vfs::namespace::owner;

#[test]
fn reads_run_on_the_owner_shard_only() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    fs::create_dir_all(&tree).unwrap();
    let sizes: Vec<usize> = (0..16).map(|i| 100_000 + i * 37_000).collect();
    for (i, size) in sizes.iter().enumerate() {
        fs::write(
            tree.join(format!("f{i:02}.bin")),
            pattern(i as u64 + 100, *size),
        )
        .unwrap();
    }
    let cas = tmp.path().join("cas");
    let manifest = tmp.path().join("m.json");
    snapshot(&tree, &cas, "2023-03-03", &manifest);

    let shards = 2;
    let mut mount = Mount::start(
        &manifest,
        &cas,
        &tmp.path().join("mnt"),
        MountOptions {
            shards,
            extra: &["--stats"],
        },
    );
    let mut expected_bytes: HashMap<usize, u64> = HashMap::new();
    for (i, size) in sizes.iter().enumerate() {
        let path = mount.dir.join(format!("f{i:02}.bin"));
        let ino = fs::metadata(&path).unwrap().ino();
        assert_eq!(read_all(&path).unwrap().len(), *size);
        *expected_bytes.entry(owner(ino, shards)).or_default() += *size as u64;
    }
    assert_eq!(
        expected_bytes.len(),
        shards,
        "the files spread over both shards"
    );
    mount.stop();
    let stats = mount.stats("final").expect("final stats line");
    let per_shard = stats["shards"].as_array().unwrap();
    assert_eq!(per_shard.len(), shards);
    for (shard, counters) in per_shard.iter().enumerate() {
        assert_eq!(counters["misrouted"], 0, "shard {shard}: {counters}");
        assert_eq!(
            counters["bytes_served"].as_u64().unwrap(),
            expected_bytes[&shard],
            "shard {shard} served exactly the bytes of the files it owns: {counters}"
        );
        assert!(counters["objects_verified"].as_u64().unwrap() > 0);
    }
}
