//! The test data: two files of xorshift bytes, the digests every reader's range must hash to,
//! both manifests (v2023 and v2025) with their CAS, and the upload of it all to the bucket.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use mount_vfs::manifest::{Hash, CHUNK_SIZE};

use crate::clients::{cas_objects, create_bucket, upload};
use crate::common::{fill, snapshot};
use crate::readers::{layout, EXPECTED};

/// The files as the contenders see them, and where they came from.
pub struct Data {
    /// The hashes of `a.bin` and `b.bin`: their objects' names in the CAS.
    pub hashes: [Hash; 2],
    pub manifest: PathBuf,
    /// The same files as a v2025-12-04-beta manifest: 256 MiB chunk objects.
    pub manifest_v2025: PathBuf,
    size: u64,
    tree: PathBuf,
    cas: PathBuf,
}

impl Data {
    /// Writes `a.bin` and `b.bin` (`size` bytes each) under `base`, fills [`EXPECTED`], and
    /// snapshots them into both manifests and one local CAS (all in /dev/shm).
    pub fn create(base: &Path, size: u64) -> Data {
        let tree = base.join("tree");
        fs::create_dir_all(&tree).unwrap();
        let mut hashes = Vec::new();
        let mut expected = BTreeMap::new();
        {
            let mut data = vec![0u8; size as usize];
            for (seed, name) in [
                (0x9E37_79B9_7F4A_7C15u64, "a.bin"),
                (0xD1B5_4A32_D192_ED03, "b.bin"),
            ] {
                fill(seed, &mut data);
                hashes.push(Hash::of(&data));
                fs::write(tree.join(name), &data).unwrap();
                for readers in [1, 4] {
                    for (file, start, end) in layout(readers, size) {
                        if file == name {
                            let digest =
                                xxhash_rust::xxh3::xxh3_128(&data[start as usize..end as usize]);
                            expected.insert((file, start, end), digest);
                        }
                    }
                }
            }
        }
        EXPECTED.set(expected).expect("set once");
        // An empty file between them gives b.bin inode 4: with --shards 2 the two big files are
        // then owned by different shards (inodes 2 and 3 would share shard 0), as most files of
        // a real job would be spread over the shards.
        fs::write(tree.join("a.pad"), b"").unwrap();
        let cas = base.join("cas");
        let manifest = base.join("bench.manifest");
        let manifest_v2025 = base.join("bench-v2025.manifest");
        for (output, format) in [
            (&manifest, "2023-03-03"),
            (&manifest_v2025, "2025-12-04-beta"),
        ] {
            snapshot(&tree, &cas, output, format);
        }
        Data {
            hashes: [hashes[0], hashes[1]],
            manifest,
            manifest_v2025,
            size,
            tree,
            cas,
        }
    }

    /// Creates the bucket and uploads the CAS as `root/Data/{hash}.xxh128` for mount_vfs, and
    /// the files again as `plain/a.bin`, `plain/b.bin` for the peers, which mount the bucket
    /// rather than a manifest; then deletes the local copies.
    pub fn upload(&self, endpoint: &str) {
        create_bucket(endpoint);
        let cas_objects = cas_objects(&self.cas);
        // Two whole-file objects (v2023), the 256 MiB chunks of the v2025 manifest, the empty
        // object. A file of at most one chunk is not chunked: v2025 then names the same objects.
        let chunks = if self.size > CHUNK_SIZE {
            2 * self.size.div_ceil(CHUNK_SIZE) as usize
        } else {
            0
        };
        assert_eq!(cas_objects.len(), 3 + chunks, "unexpected CAS objects");
        upload(endpoint, "root", cas_objects);
        upload(
            endpoint,
            "plain",
            vec![
                ("a.bin".into(), self.tree.join("a.bin")),
                ("b.bin".into(), self.tree.join("b.bin")),
            ],
        );
        let _ = fs::remove_dir_all(&self.tree);
        let _ = fs::remove_dir_all(&self.cas);
    }
}
