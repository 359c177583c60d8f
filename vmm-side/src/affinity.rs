//! Where the device process and the VMM's mapping-service thread run (CPU affinity).
//!
//! A sandboxed placement is a relay between three threads: the guest's vCPU (or the
//! bench's driver), the device, and the VMM's mapping service. When the mapping service
//! places a blob with `MAP_FIXED`, the kernel must flush the TLB of every other CPU that
//! currently runs a thread of the VMM's address space: a vCPU or driver spinning on
//! another core turns each placement into an IPI round trip (a VM exit on a virtualised
//! host); decision 045 has the measurements.
//! Giving each process its own cores (the device on some, the VMM's vCPU and mapping
//! service on others) keeps each address space live on its own cores only, so no
//! placement sends an IPI (`--device-cpus`, `--service-cpus`; the bench's `--cpu-layout
//! split`). Nothing is pinned by default.

use anyhow::{bail, Context};
use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// A CPU list as given on the command line (`--device-cpus 1`, `--service-cpus 0-3`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

impl std::str::FromStr for CpuList {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        parse_cpu_list(s).map(CpuList)
    }
}

/// Parses a CPU list such as `1`, `0,2` or `0-3` (the kernel's `cpuset` list syntax).
pub fn parse_cpu_list(s: &str) -> Result<Vec<usize>, String> {
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = || format!("bad CPU list `{s}`: `{part}`");
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (a.trim(), b.trim()),
            None => (part, part),
        };
        let a: usize = a.parse().map_err(|_| bad())?;
        let b: usize = b.parse().map_err(|_| bad())?;
        if a > b || b >= CpuSet::count() {
            return Err(bad());
        }
        cpus.extend(a..=b);
    }
    if cpus.is_empty() {
        return Err(format!("empty CPU list `{s}`"));
    }
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// The CPUs the calling thread may run on.
pub fn allowed() -> anyhow::Result<Vec<usize>> {
    let set = sched_getaffinity(Pid::from_raw(0)).context("sched_getaffinity")?;
    Ok((0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect())
}

/// Restricts the calling thread to `cpus` (empty: leaves it alone); a failure is logged
/// and the thread runs unpinned. For the VMM's own service threads.
pub fn pin_self_or_warn(cpus: &[usize], what: &str) {
    if let Err(e) = pin(0, cpus, what) {
        log::warn!("{e:#}; it runs unpinned");
    }
}

/// Restricts `pid` (0: the calling thread) to `cpus`. An empty list leaves it alone.
pub fn pin(pid: i32, cpus: &[usize], what: &str) -> anyhow::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    let mut set = CpuSet::new();
    for &c in cpus {
        set.set(c)
            .with_context(|| format!("{what}: CPU {c} is out of range"))?;
    }
    if let Err(e) = sched_setaffinity(Pid::from_raw(pid), &set) {
        bail!("{what}: sched_setaffinity to CPUs {cpus:?}: {e}");
    }
    log::debug!("{what} pinned to CPUs {cpus:?}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse_like_cpusets() {
        assert_eq!(parse_cpu_list("1").unwrap(), vec![1]);
        assert_eq!(parse_cpu_list("0-2,5, 1").unwrap(), vec![0, 1, 2, 5]);
        for bad in ["", "x", "2-1", "1-", "-1", "100000"] {
            assert!(parse_cpu_list(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_thread_is_pinned_and_unpinned() {
        let all = allowed().unwrap();
        assert!(!all.is_empty());
        std::thread::spawn(move || {
            let one = [*all.last().unwrap()];
            pin(0, &one, "test thread").unwrap();
            assert_eq!(allowed().unwrap(), one);
            pin(0, &all, "test thread").unwrap();
            assert_eq!(allowed().unwrap(), all);
            assert!(pin(0, &[CpuSet::count() + 1], "test thread").is_err());
        })
        .join()
        .unwrap();
    }
}
