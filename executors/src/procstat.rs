//! Process-wide counters for benchmarks: page faults per GiB served is the number that tells
//! whether the pre-faulted pool works.

use std::time::Duration;

/// Minor page faults and CPU time (user + system) of this process so far.
///
/// Faults come from `/proc/self/stat` (field 10, `minflt`), the same number an outside observer
/// reads from `/proc/PID/stat`; CPU time comes from `getrusage`, which has microsecond rather
/// than clock-tick (10 ms) resolution. Falls back to `getrusage`'s `ru_minflt` when /proc is
/// unreadable.
pub fn minor_faults_and_cpu_time() -> (u64, Duration) {
    // SAFETY: `rusage` is plain data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let (cpu, ru_minflt) = if rc == 0 {
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        (tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_minflt as u64)
    } else {
        (Duration::ZERO, 0)
    };
    let faults = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| minflt_from_stat(&s))
        .unwrap_or(ru_minflt);
    (faults, cpu)
}

/// Field 10 of `/proc/PID/stat`. The command name (field 2) may contain spaces and parentheses,
/// so fields are counted after the last `)`.
fn minflt_from_stat(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')': state(3) ppid(4) pgrp(5) session(6) tty_nr(7) tpgid(8) flags(9) minflt(10).
    rest.split_whitespace().nth(7)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat() {
        let stat = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 5678 0 0 0 12 3 0 0 20 0 1";
        assert_eq!(minflt_from_stat(stat), Some(5678));
    }

    #[test]
    fn counts_faults_of_fresh_memory() {
        let (f0, _) = minor_faults_and_cpu_time();
        let v = vec![1u8; 64 << 20];
        std::hint::black_box(&v);
        let (f1, cpu) = minor_faults_and_cpu_time();
        assert!(f1 >= f0 + 100, "{f0} -> {f1}");
        assert!(cpu > Duration::ZERO);
    }
}
