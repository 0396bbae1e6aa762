//! Reads what the kernel says about a shard's arena: io_uring buffer registration
//! (`/proc/self/fdinfo`) and page sizes (`/proc/self/smaps`). Start-up only; never on the data
//! path.

use std::fs;

/// One registered buffer as listed under `UserBufs:` in an io_uring fdinfo.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UserBuf {
    pub addr: usize,
    pub len: usize,
}

/// Registered buffers of every io_uring fd of this process, one `Vec` per ring.
pub(crate) fn uring_user_bufs() -> Vec<Vec<UserBuf>> {
    let Ok(dir) = fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut rings = Vec::new();
    for entry in dir.flatten() {
        let is_ring = fs::read_link(entry.path())
            .map(|t| t.to_string_lossy() == "anon_inode:[io_uring]")
            .unwrap_or(false);
        if !is_ring {
            continue;
        }
        let fdinfo = format!("/proc/self/fdinfo/{}", entry.file_name().to_string_lossy());
        if let Ok(text) = fs::read_to_string(fdinfo) {
            rings.push(parse_user_bufs(&text));
        }
    }
    rings
}

/// Parses the `UserBufs:` section: a count line, then lines `    0: 0x7f12.../16777216`.
pub(crate) fn parse_user_bufs(fdinfo: &str) -> Vec<UserBuf> {
    let mut out = Vec::new();
    let mut lines = fdinfo.lines();
    let Some(count) = lines.by_ref().find_map(|l| l.strip_prefix("UserBufs:")) else {
        return out;
    };
    let count: usize = count.trim().parse().unwrap_or(0);
    for line in lines.take(count) {
        let Some((_, rest)) = line.split_once(':') else {
            continue;
        };
        let Some((addr, len)) = rest.trim().split_once('/') else {
            continue;
        };
        let addr = usize::from_str_radix(addr.trim_start_matches("0x"), 16);
        let len = len.trim().parse();
        if let (Ok(addr), Ok(len)) = (addr, len) {
            out.push(UserBuf { addr, len });
        }
    }
    out
}

/// How many io_uring rings of this process have a registered buffer containing `addr`, and that
/// buffer.
pub(crate) fn rings_registering(addr: usize) -> (usize, Option<UserBuf>) {
    let mut n = 0;
    let mut found = None;
    for ring in uring_user_bufs() {
        if let Some(b) = ring
            .iter()
            .find(|b| b.addr <= addr && addr < b.addr + b.len)
        {
            n += 1;
            found = Some(*b);
        }
    }
    (n, found)
}

/// The smaps fields we care about for one mapping.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SmapsEntry {
    /// Start address of the mapping.
    pub start: usize,
    /// Length of the mapping in bytes.
    pub size: usize,
    /// `KernelPageSize` in bytes: 2 MiB for hugetlb.
    pub kernel_page_size: usize,
    /// `AnonHugePages` in bytes: THP-backed part of the mapping.
    pub anon_huge: usize,
    /// `Rss` in bytes (0 for hugetlb; see `Private_Hugetlb`).
    pub rss: usize,
    /// `Private_Hugetlb` in bytes.
    pub private_hugetlb: usize,
}

/// The `/proc/self/smaps` entry of the mapping that contains `addr`.
pub fn smaps_entry(addr: usize) -> Option<SmapsEntry> {
    let text = fs::read_to_string("/proc/self/smaps").ok()?;
    parse_smaps(&text, addr)
}

fn parse_smaps(text: &str, addr: usize) -> Option<SmapsEntry> {
    let mut cur: Option<SmapsEntry> = None;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((s, e)) = first.split_once('-') {
            if let (Ok(s), Ok(e)) = (usize::from_str_radix(s, 16), usize::from_str_radix(e, 16)) {
                if cur.is_some() {
                    return cur;
                }
                if s <= addr && addr < e {
                    cur = Some(SmapsEntry {
                        start: s,
                        size: e - s,
                        ..Default::default()
                    });
                }
                continue;
            }
        }
        let Some(entry) = cur.as_mut() else {
            continue;
        };
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let kb: usize = value
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .unwrap_or(0);
        match key {
            "KernelPageSize" => entry.kernel_page_size = kb * 1024,
            "AnonHugePages" => entry.anon_huge = kb * 1024,
            "Rss" => entry.rss = kb * 1024,
            "Private_Hugetlb" => entry.private_hugetlb = kb * 1024,
            _ => {}
        }
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_user_bufs() {
        let text = "SqMask:\t0x7f\nUserFiles:\t0\nUserBufs:\t1\n    0: 0x7f0000200000/16777216\nPollList:\n";
        assert_eq!(
            parse_user_bufs(text),
            vec![UserBuf {
                addr: 0x7f0000200000,
                len: 16777216
            }]
        );
        assert!(parse_user_bufs("UserBufs:\t0\n").is_empty());
    }

    #[test]
    fn parses_smaps() {
        let text = "7f0000000000-7f0000200000 rw-p 00000000 00:00 0 \nSize: 2048 kB\nKernelPageSize: 4 kB\n\
                    7f0000200000-7f0001200000 rw-p 00000000 00:0f 123 /anon_hugepage (deleted)\n\
                    Size: 16384 kB\nKernelPageSize: 2048 kB\nRss: 0 kB\nAnonHugePages: 0 kB\n\
                    Private_Hugetlb: 16384 kB\n7f0001200000-7f0001201000 r--p 0 00:00 0 \nKernelPageSize: 4 kB\n";
        let e = parse_smaps(text, 0x7f0000300000).unwrap();
        assert_eq!(e.start, 0x7f0000200000);
        assert_eq!(e.size, 16 << 20);
        assert_eq!(e.kernel_page_size, 2 << 20);
        assert_eq!(e.private_hugetlb, 16 << 20);
        assert!(parse_smaps(text, 0x1000).is_none());
    }
}
