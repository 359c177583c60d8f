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
    /// The VMM's `RssAnon` in KiB at the start, at each tenth of the run the guest reports
    /// and at the end: at most [`Samples::MAX`] samples whatever the guest reports (decimated,
    /// first and last kept).
    pub vmm_rss_anon_kib_samples: Samples,
    /// The (last) device once it served its first command.
    pub device_start: Usage,
    /// The device at the end, with every blob unmapped and unreferenced.
    pub device_end: Usage,
}

/// A bounded series of samples: at most [`Samples::MAX`]. When full, every second sample
/// after the first is dropped and from then on only every second one pushed is kept (the
/// stride doubles each time), so a guest that reports progress without end costs a fixed
/// amount of memory and report; the first and the latest sample are always there.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Samples {
    kept: Vec<u64>,
    stride: u64,
    since_kept: u64,
    /// The latest sample pushed, when it was not kept (it is reported as the last).
    latest: Option<u64>,
}

/// As the list of [`Samples::values`].
impl Serialize for Samples {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.values().serialize(s)
    }
}

impl Samples {
    /// Most samples kept.
    pub const MAX: usize = 32;

    /// Adds a sample.
    pub fn push(&mut self, v: u64) {
        let stride = self.stride.max(1);
        self.since_kept += 1;
        if self.since_kept < stride && !self.kept.is_empty() {
            self.latest = Some(v);
            return;
        }
        self.since_kept = 0;
        self.latest = None;
        if self.kept.len() >= Self::MAX {
            let first = self.kept[0];
            let rest: Vec<u64> = self.kept.iter().skip(2).step_by(2).copied().collect();
            self.kept = std::iter::once(first).chain(rest).collect();
            self.stride = stride.saturating_mul(2);
        }
        self.kept.push(v);
    }

    /// The samples kept (the latest one pushed last, if it was not kept).
    pub fn values(&self) -> Vec<u64> {
        let mut v = self.kept.clone();
        v.extend(self.latest);
        v
    }

    /// Sample `i` of [`Samples::values`].
    pub fn get(&self, i: usize) -> Option<u64> {
        self.values().get(i).copied()
    }

    /// The latest sample.
    pub fn last(&self) -> Option<u64> {
        self.latest.or(self.kept.last().copied())
    }

    /// How many are kept.
    pub fn len(&self) -> usize {
        self.kept.len() + usize::from(self.latest.is_some())
    }

    /// No sample yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Vec<u64>> for Samples {
    fn from(v: Vec<u64>) -> Self {
        let mut s = Samples::default();
        for x in v {
            s.push(x);
        }
        s
    }
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
                if last.saturating_sub(first) > RSS_GROWTH_LIMIT_KIB {
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
            vmm_rss_anon_kib_samples: vec![1000, 5000, 5100].into(),
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

    #[test]
    fn samples_stay_bounded_and_keep_first_and_last() {
        let mut s = Samples::default();
        for i in 0..31_002u64 {
            s.push(i);
            assert!(s.len() <= Samples::MAX + 1, "{} after {i}", s.len());
        }
        let v = s.values();
        assert_eq!(v[0], 0);
        assert_eq!(s.last(), Some(31_001));
        assert!(v.windows(2).all(|w| w[0] < w[1]), "in order: {v:?}");
        // A short series is kept whole.
        let short: Samples = vec![1, 2, 3].into();
        assert_eq!(short.values(), [1, 2, 3]);
        assert_eq!(serde_json::to_string(&short).unwrap(), "[1,2,3]");
    }
}
