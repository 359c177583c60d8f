//! Small `/proc` readers: VMA and fd counts, `vm.max_map_count`, a process's status fields
//! (seccomp mode, no_new_privs, capabilities), RSS and the mappings inside a range.
//!
//! Hand-written rather than the `procfs` crate (decision, issue 16): the same readers run
//! inside the jailed device (the mirror's VMA budget counts `/proc/self/maps` lines under
//! seccomp, with only a read-only `/proc` in an empty root), where every extra syscall a
//! crate makes would need a policy rule, and on the placement path (a count every 256
//! placements), where counting lines beats parsing every mapping into an owned struct. What
//! they read is a handful of stable fields; each reader's parse errors name the file.

use std::path::Path;

use crate::{Error, Result};

fn read(path: &str) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| Error::Proc {
        path: path.to_string(),
        source,
    })
}

fn parse_err(path: &str, what: impl Into<String>) -> Error {
    Error::ProcParse {
        path: path.to_string(),
        what: what.into(),
    }
}

/// `vm.max_map_count`.
pub fn max_map_count() -> Result<usize> {
    let path = "/proc/sys/vm/max_map_count";
    read(path)?
        .trim()
        .parse()
        .map_err(|_| parse_err(path, "not a number"))
}

/// TLB-shootdown IPIs handled so far, all CPUs together (the `TLB:` line of
/// `/proc/interrupts`); `None` where the kernel does not count them.
pub fn tlb_shootdowns() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/interrupts").ok()?;
    let line = text.lines().find(|l| l.trim_start().starts_with("TLB:"))?;
    Some(
        line.split_whitespace()
            .skip(1)
            .map_while(|w| w.parse::<u64>().ok())
            .sum(),
    )
}

/// Number of VMAs of this process (lines of `/proc/self/maps`).
pub fn vma_count() -> Result<usize> {
    vma_count_of("self")
}

/// Number of VMAs of process `pid` ("self" or a number).
pub fn vma_count_of(pid: &str) -> Result<usize> {
    let path = format!("/proc/{pid}/maps");
    let bytes = std::fs::read(&path).map_err(|source| Error::Proc {
        path: path.clone(),
        source,
    })?;
    Ok(bytes.iter().filter(|&&b| b == b'\n').count())
}

/// The fds open in this process, with what they point at, excluding the directory
/// handle used to list them.
pub fn open_fds() -> Result<Vec<(i32, String)>> {
    open_fds_of("self")
}

/// The fds open in process `pid`, with their link targets.
pub fn open_fds_of(pid: &str) -> Result<Vec<(i32, String)>> {
    let dir = format!("/proc/{pid}/fd");
    let entries = std::fs::read_dir(&dir).map_err(|source| Error::Proc {
        path: dir.clone(),
        source,
    })?;
    let mut out = Vec::new();
    for e in entries.flatten() {
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // The read_dir handle itself shows up as a dangling or directory link: drop fds
        // that vanished by the time we read the link.
        if let Ok(target) = std::fs::read_link(e.path()) {
            let target = target.to_string_lossy().into_owned();
            if pid == "self" && target == Path::new(&dir).to_string_lossy() {
                continue;
            }
            out.push((fd, target));
        }
    }
    out.sort();
    // read_dir's own fd is the highest-numbered one pointing at /proc/<pid>/fd.
    if pid == "self" {
        if let Some(pos) = out
            .iter()
            .rposition(|(_, t)| t.starts_with("/proc/") && t.ends_with("/fd"))
        {
            out.remove(pos);
        }
    }
    Ok(out)
}

/// Number of fds open in this process.
pub fn fd_count() -> Result<usize> {
    Ok(open_fds()?.len())
}

/// The security-relevant fields of `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ProcStatus {
    /// `Seccomp:` (0 off, 1 strict, 2 filter).
    pub seccomp: u32,
    /// `Seccomp_filters:` (how many filters are stacked; Linux >= 5.9).
    pub seccomp_filters: u32,
    /// `NoNewPrivs:`.
    pub no_new_privs: bool,
    /// `CapEff:`.
    pub cap_eff: u64,
    /// `CapPrm:`.
    pub cap_prm: u64,
    /// `CapBnd:`.
    pub cap_bnd: u64,
    /// `CapAmb:`.
    pub cap_amb: u64,
    /// `VmRSS:` in KiB.
    pub vm_rss_kib: u64,
}

/// Reads `/proc/<pid>/status` ("self" or a number).
pub fn status_of(pid: &str) -> Result<ProcStatus> {
    let path = format!("/proc/{pid}/status");
    let text = read(&path)?;
    let mut st = ProcStatus::default();
    let mut seen = 0;
    for line in text.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim();
        let hex = || u64::from_str_radix(v, 16).map_err(|_| parse_err(&path, k));
        match k {
            "Seccomp" => {
                st.seccomp = v.parse().map_err(|_| parse_err(&path, k))?;
                seen += 1;
            }
            "Seccomp_filters" => {
                st.seccomp_filters = v.parse().map_err(|_| parse_err(&path, k))?;
            }
            "NoNewPrivs" => {
                st.no_new_privs = v == "1";
                seen += 1;
            }
            "CapEff" => {
                st.cap_eff = hex()?;
                seen += 1;
            }
            "CapPrm" => st.cap_prm = hex()?,
            "CapBnd" => st.cap_bnd = hex()?,
            "CapAmb" => st.cap_amb = hex()?,
            "VmRSS" => {
                st.vm_rss_kib = v
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .map_err(|_| parse_err(&path, k))?
            }
            _ => {}
        }
    }
    if seen < 3 {
        return Err(parse_err(&path, "missing Seccomp/NoNewPrivs/CapEff"));
    }
    Ok(st)
}

/// One line of `/proc/<pid>/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    /// Start address.
    pub start: usize,
    /// End address (exclusive).
    pub end: usize,
    /// Permissions, e.g. `rw-s`.
    pub perms: String,
    /// Offset in the file.
    pub offset: u64,
    /// Inode number.
    pub inode: u64,
    /// Path or name (`/memfd:hostmem-window (deleted)`), may be empty.
    pub path: String,
}

/// The mappings of this process that intersect `start..end`.
pub fn maps_in_range(start: usize, end: usize) -> Result<Vec<MapEntry>> {
    let path = "/proc/self/maps";
    let text = read(path)?;
    let mut out = Vec::new();
    for line in text.lines() {
        let mut it = line.split_whitespace();
        let (Some(range), Some(perms), Some(off), Some(_dev), Some(inode)) =
            (it.next(), it.next(), it.next(), it.next(), it.next())
        else {
            return Err(parse_err(path, line));
        };
        let name = it.collect::<Vec<_>>().join(" ");
        let (a, b) = range.split_once('-').ok_or_else(|| parse_err(path, line))?;
        let hex = |s: &str| usize::from_str_radix(s, 16).map_err(|_| parse_err(path, line));
        let (a, b) = (hex(a)?, hex(b)?);
        if b <= start || a >= end {
            continue;
        }
        out.push(MapEntry {
            start: a,
            end: b,
            perms: perms.to_string(),
            offset: u64::from_str_radix(off, 16).map_err(|_| parse_err(path, line))?,
            inode: inode.parse().map_err(|_| parse_err(path, line))?,
            path: name,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_status_and_counts() {
        let st = status_of("self").unwrap();
        assert!(st.vm_rss_kib > 0);
        assert!(vma_count().unwrap() > 5);
        assert!(max_map_count().unwrap() > 1000);
        // Other tests run in parallel threads, so look for this fd rather than count.
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
        let is_ours =
            |fds: Vec<(i32, String)>| fds.iter().any(|(n, t)| *n == fd && t.ends_with("/status"));
        assert!(is_ours(open_fds().unwrap()));
        assert!(fd_count().unwrap() >= 1);
        drop(f);
        assert!(!is_ours(open_fds().unwrap()));
    }
}
