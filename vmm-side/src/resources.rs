//! What a run costs and whether it gives it back: fd, VMA and anonymous-RSS counts of the
//! VMM and the device ([`Usage`]) at the start and the end of a run ([`UsageCheck`]).
//! Latency statistics live in [`crate::latency`].

use serde::Serialize;

/// Resource counts of one process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Open fds.
    pub fds: usize,
    /// VMAs (lines of `/proc/<pid>/maps`).
    pub vmas: usize,
    /// `RssAnon:` in KiB: heap and stacks, what a leak grows (the window and the blobs are
    /// shared memory and are not counted here).
    pub rss_anon_kib: u64,
}

impl Usage {
    /// Counts of process `pid` ("self" or a number).
    pub fn of(pid: &str) -> Result<Usage, hostmem_base::Error> {
        Ok(Usage {
            fds: hostmem_base::procfs::open_fds_of(pid)?.len(),
            vmas: hostmem_base::procfs::vma_count_of(pid)?,
            rss_anon_kib: rss_anon_kib(pid)?,
        })
    }
}

fn rss_anon_kib(pid: &str) -> Result<u64, hostmem_base::Error> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).map_err(|source| hostmem_base::Error::Proc {
        path: path.clone(),
        source,
    })?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0))
}

/// Resource counts at the start and the end of a run, and how they compare.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UsageCheck {
    /// The VMM once the first device serves (window, VM, probe and service thread exist).
    pub vmm_start: Usage,
    /// The VMM at the end, with every blob unmapped and the device still up.
    pub vmm_end: Usage,
    /// The VMM's `RssAnon` in KiB at each tenth of the run.
    pub vmm_rss_anon_kib_samples: Vec<u64>,
    /// The (last) device once it served its first command.
    pub device_start: Usage,
    /// The device at the end, with every blob unmapped and unreferenced.
    pub device_end: Usage,
}

/// Allowed growth of the VMM's anonymous RSS from the first tenth of a run to its end.
/// Allocator caches settle within the first tenth; a leak of even 32 bytes per blob shows
/// up over a 100,000-blob soak.
pub const RSS_GROWTH_LIMIT_KIB: u64 = 2048;

impl UsageCheck {
    /// What did not come back to its start (empty: nothing leaked). The RSS trend is
    /// judged only on runs of at least 10,000 blobs; shorter ones are noise.
    pub fn problems(&self, blobs: u32) -> Vec<String> {
        let mut v = Vec::new();
        let (s, e) = (self.vmm_start, self.vmm_end);
        if e.fds != s.fds {
            v.push(format!(
                "VMM fds {} at the start, {} at the end",
                s.fds, e.fds
            ));
        }
        if e.vmas != s.vmas {
            v.push(format!(
                "VMM VMAs {} at the start, {} at the end",
                s.vmas, e.vmas
            ));
        }
        let (s, e) = (self.device_start, self.device_end);
        if e.fds != s.fds {
            v.push(format!(
                "device fds {} at the start, {} at the end",
                s.fds, e.fds
            ));
        }
        if e.vmas != s.vmas {
            v.push(format!(
                "device VMAs {} at the start, {} at the end",
                s.vmas, e.vmas
            ));
        }
        if blobs >= 10_000 {
            if let (Some(first), Some(last)) = (
                self.vmm_rss_anon_kib_samples.get(1),
                self.vmm_rss_anon_kib_samples.last(),
            ) {
                if last.saturating_sub(*first) > RSS_GROWTH_LIMIT_KIB {
                    v.push(format!(
                        "VMM RssAnon grew from {first} KiB to {last} KiB (limit {RSS_GROWTH_LIMIT_KIB} KiB)"
                    ));
                }
            }
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_name_what_did_not_come_back() {
        let u = |fds, vmas| Usage {
            fds,
            vmas,
            rss_anon_kib: 0,
        };
        let mut c = UsageCheck {
            vmm_start: u(10, 100),
            vmm_end: u(10, 100),
            device_start: u(7, 40),
            device_end: u(7, 40),
            vmm_rss_anon_kib_samples: vec![1000, 5000, 5100],
        };
        assert!(c.problems(100_000).is_empty());
        c.device_end = u(8, 42);
        c.vmm_rss_anon_kib_samples
            .push(5000 + RSS_GROWTH_LIMIT_KIB + 1);
        let p = c.problems(100_000);
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("device fds 7"));
        assert!(p[2].contains("RssAnon"));
        assert_eq!(c.problems(100).len(), 2, "short runs do not judge RSS");
    }
}
