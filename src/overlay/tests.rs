//! The overlay's rules without a mount: errnos of namespace changes, merged listings, and that
//! a replay of the journal (also torn) rebuilds exactly the state the live overlay had.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::*;
use crate::fs::testing::namespace;

const OWNER: Owner = Owner {
    uid: 1000,
    gid: 1000,
};

fn file(mode: u32) -> NewNode<'static> {
    NewNode {
        kind: NodeKind::File,
        mode,
        uid: 1,
        gid: 2,
        target: None,
    }
}

fn dir() -> NewNode<'static> {
    NewNode {
        kind: NodeKind::Dir,
        mode: 0o755,
        uid: 1,
        gid: 2,
        target: None,
    }
}

fn names(overlay: &Overlay, dir: Ino) -> Vec<String> {
    let (_, entries) = overlay.children(dir).unwrap();
    entries
        .iter()
        .map(|e| String::from_utf8(e.name.clone()).unwrap())
        .collect()
}

fn open(dir: &Path, base: &Arc<Namespace>) -> Overlay {
    Overlay::open(dir, base.clone(), OWNER, 1 << 20).unwrap()
}

fn state(overlay: &Overlay) -> Delta {
    overlay.read().clone()
}

#[test]
fn namespace_changes_answer_the_errnos_linux_does() {
    let tmp = tempfile::tempdir().unwrap();
    let base = namespace(&[("a", b"hello"), ("b", b"")]);
    let o = open(tmp.path(), &base);
    let root = ROOT_INO;
    let a = o.lookup(root, b"a").unwrap();
    let d = o.lookup(root, b"dir").unwrap();
    assert_eq!(
        o.create(root, b"a", file(0o644)).unwrap_err(),
        FsError::Exists
    );
    assert_eq!(o.remove(root, b"dir", true).unwrap_err(), FsError::NotEmpty);
    assert_eq!(
        o.remove(root, b"dir", false).unwrap_err(),
        FsError::IsDirectory
    );
    assert_eq!(
        o.remove(root, b"a", true).unwrap_err(),
        FsError::NotDirectory
    );
    assert_eq!(
        o.remove(root, b"nope", false).unwrap_err(),
        FsError::NotFound
    );
    assert_eq!(
        o.create(a, b"x", file(0o644)).unwrap_err(),
        FsError::NotDirectory
    );
    assert_eq!(o.link(d, root, b"d2").unwrap_err(), FsError::NotPermitted);
    // A directory into its own subtree; over a non-empty directory; a file over a directory.
    let inner = o.lookup(d, b"inner").unwrap();
    assert_eq!(
        o.rename((root, b"dir"), (inner, b"x"), 0).unwrap_err(),
        FsError::Invalid
    );
    let e = o.create(root, b"e", dir()).unwrap().ino;
    o.create(e, b"f", file(0o600)).unwrap();
    assert_eq!(
        o.rename((root, b"dir"), (root, b"e"), 0).unwrap_err(),
        FsError::NotEmpty
    );
    assert_eq!(
        o.rename((root, b"a"), (root, b"e"), 0).unwrap_err(),
        FsError::IsDirectory
    );
    assert_eq!(
        o.rename((root, b"e"), (root, b"a"), 0).unwrap_err(),
        FsError::NotDirectory
    );
    assert_eq!(
        o.rename((root, b"a"), (root, b"b"), RENAME_NOREPLACE)
            .unwrap_err(),
        FsError::Exists
    );
    assert_eq!(
        o.rename((root, b"a"), (root, b"zz"), RENAME_EXCHANGE)
            .unwrap_err(),
        FsError::NotFound
    );
    // Emptying a base directory makes it removable.
    o.remove(d, b"inner", true).unwrap();
    o.remove(root, b"dir", true).unwrap();
    assert_eq!(names(&o, root), ["a", "b", "e", "link"]);
}

#[test]
fn renames_move_inodes_with_their_base_children_and_keep_link_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let base = namespace(&[("a", b"hello"), ("b", b"")]);
    let o = open(tmp.path(), &base);
    let root = ROOT_INO;
    let d = o.lookup(root, b"dir").unwrap();
    let new = o.create(root, b"new", dir()).unwrap().ino;
    assert_eq!(o.node(root).unwrap().nlink, 4);
    o.rename((root, b"dir"), (new, b"moved"), 0).unwrap();
    assert_eq!(o.lookup(new, b"moved").unwrap(), d);
    assert!(o.lookup(d, b"inner").is_ok(), "base children move along");
    assert_eq!(o.lookup(root, b"dir").unwrap_err(), FsError::NotFound);
    assert_eq!(
        (o.node(root).unwrap().nlink, o.node(new).unwrap().nlink),
        (3, 3)
    );
    assert_eq!(o.children(d).unwrap().0, new, "`..` follows the move");
    // Exchange a file and a directory.
    let a = o.lookup(root, b"a").unwrap();
    o.rename((root, b"a"), (new, b"moved"), RENAME_EXCHANGE)
        .unwrap();
    assert_eq!(
        (
            o.lookup(root, b"a").unwrap(),
            o.lookup(new, b"moved").unwrap()
        ),
        (d, a)
    );
    assert_eq!(
        (o.node(root).unwrap().nlink, o.node(new).unwrap().nlink),
        (4, 2)
    );
    // Hard links count, and replacing one name keeps the inode.
    let l = o.link(a, root, b"a2").unwrap();
    assert_eq!(l.nlink, 2);
    o.rename((root, b"b"), (root, b"a2"), 0).unwrap();
    assert_eq!(o.node(a).unwrap().nlink, 1);
    assert_eq!(names(&o, root), ["a", "a2", "link", "new"]);
}

#[test]
fn replay_rebuilds_the_live_state_and_a_torn_tail_is_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let base = namespace(&[("a", b"hello"), ("b", b"")]);
    let root = ROOT_INO;
    let live = {
        let o = open(tmp.path(), &base);
        let n = o.create(root, b"n", file(0o640)).unwrap().ino;
        o.upper_file(n).unwrap().write_all_at(b"data", 0).unwrap();
        o.set_attr(
            n,
            AttrChange {
                mode: Some(0o600),
                ..AttrChange::default()
            },
            None,
        )
        .unwrap();
        o.set_xattr(n, b"user.k", b"v", 0).unwrap();
        o.rename((root, b"dir"), (root, b"dir2"), 0).unwrap();
        o.remove(root, b"b", false).unwrap();
        let a = o.lookup(root, b"a").unwrap();
        o.set_attr(a, AttrChange::default(), Some(2)).unwrap();
        o.mark_present(a, vec![0]).unwrap();
        state(&o)
        // Dropped without close(): like a kill -9, only the journal has the changes.
    };
    // A record torn by the crash is cut off, and everything before it is kept.
    let journal = tmp.path().join("journal");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&journal)
        .unwrap()
        .write_all(b"0123456789abcdef {\"seq\":99,\"rec")
        .unwrap();
    let o = open(tmp.path(), &base);
    assert_eq!(state(&o), live);
    assert_eq!(
        std::fs::metadata(&journal).unwrap().len(),
        0,
        "checkpointed"
    );
    assert_eq!(
        o.get_xattr(o.lookup(root, b"n").unwrap(), b"user.k")
            .unwrap(),
        b"v"
    );
    assert_eq!(names(&o, root), ["a", "dir2", "link", "n"]);
    drop(o);
    // And once more from the checkpoint alone.
    assert_eq!(state(&open(tmp.path(), &base)), live);
}

#[test]
fn a_second_writer_is_refused_naming_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let base = namespace(&[("a", b"hello")]);
    let _first = open(tmp.path(), &base);
    match Overlay::open(tmp.path(), base, OWNER, 1 << 20) {
        Err(OverlayError::Locked { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
        other => panic!("expected Locked, got {:?}", other.err()),
    }
}

#[test]
fn unlinked_files_keep_their_upper_file_until_the_last_close() {
    let tmp = tempfile::tempdir().unwrap();
    let base = namespace(&[("a", b"hello")]);
    let o = open(tmp.path(), &base);
    let n = o.create(ROOT_INO, b"n", file(0o644)).unwrap().ino;
    let path = o.upper_path(n);
    o.opened(n);
    o.remove(ROOT_INO, b"n", false).unwrap();
    assert!(path.exists(), "open: kept");
    o.released(n);
    assert!(!path.exists(), "closed: deleted");
}

#[test]
fn upper_bytes_come_from_the_base_only_below_base_len_in_blocks_not_copied() {
    let mut upper = Upper {
        base_len: 2500,
        present: [1].into(),
    };
    let from_base: Vec<bool> = [0, 999, 1000, 1999, 2000, 2499, 2500, 9000]
        .iter()
        .map(|&pos| upper.from_base(pos, 1000))
        .collect();
    assert_eq!(
        from_base,
        [true, true, false, false, true, true, false, false]
    );
    assert!(!upper.complete(1000), "block 0 and 2 are still the base's");
    upper.present.extend([0, 2]);
    assert!(upper.complete(1000));
    assert!(Upper::default().complete(1000), "a new file has no base");
}
