//! What a run costs and whether it gives it back: fd, VMA and anonymous-RSS counts of the
//! VMM and the device ([`Usage`]), and a fixed-size latency histogram so that recording a
//! hundred thousand samples does not itself grow the VMM (a soak must show a flat RSS).

use serde::Serialize;

use crate::run::Latency;

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

/// Sub-buckets per power of two: values are kept to within 1/32 (about 3 %).
const SUB: u64 = 32;
const SUB_BITS: u32 = 5;
/// Exact buckets below `2 * SUB` ns, then `SUB` per power of two up to 2^63 ns.
const BUCKETS: usize = (2 * SUB + (64 - SUB_BITS as u64 - 1) * SUB) as usize;

/// A log-linear latency histogram in nanoseconds: fixed size (about 15 KiB), 3 % precision.
#[derive(Debug, Clone)]
pub struct Histogram {
    counts: Vec<u64>,
    n: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            n: 0,
        }
    }
}

impl Histogram {
    fn index(ns: u64) -> usize {
        if ns < 2 * SUB {
            return ns as usize;
        }
        let e = 63 - ns.leading_zeros(); // >= SUB_BITS + 1
        let sub = (ns >> (e - SUB_BITS)) & (SUB - 1);
        (2 * SUB + u64::from(e - SUB_BITS - 1) * SUB + sub) as usize
    }

    /// The midpoint of bucket `i`, in ns.
    fn value(i: usize) -> f64 {
        let i = i as u64;
        if i < 2 * SUB {
            return i as f64;
        }
        let e = (i - 2 * SUB) / SUB + u64::from(SUB_BITS) + 1;
        let sub = (i - 2 * SUB) % SUB;
        let width = 1u64 << (e - u64::from(SUB_BITS));
        let low = (1u64 << e) + sub * width;
        low as f64 + width as f64 / 2.0
    }

    /// Records one sample.
    pub fn record(&mut self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.counts[Self::index(ns).min(BUCKETS - 1)] += 1;
        self.n += 1;
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.n
    }

    /// No samples yet.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// The `q` quantile in µs (0 when empty).
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.n == 0 {
            return 0.0;
        }
        // The same rank as `Latency::of` over sorted samples.
        let rank = ((self.n - 1) as f64 * q).round() as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen > rank {
                return Self::value(i) / 1000.0;
            }
        }
        Self::value(BUCKETS - 1) / 1000.0
    }

    /// p50 and p99.
    pub fn latency(&self) -> Latency {
        Latency {
            p50: self.quantile_us(0.5),
            p99: self.quantile_us(0.99),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn histogram_quantiles_are_within_three_percent() {
        let mut h = Histogram::default();
        let mut exact = Vec::new();
        let mut x = 12345u64;
        for _ in 0..10_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let ns = 1_000 + (x >> 33) % 2_000_000; // 1 µs .. 2 ms
            h.record(Duration::from_nanos(ns));
            exact.push(ns as f64 / 1000.0);
        }
        let want = Latency::of(&mut exact);
        let got = h.latency();
        assert!(
            (got.p50 - want.p50).abs() / want.p50 < 0.031,
            "{got:?} {want:?}"
        );
        assert!(
            (got.p99 - want.p99).abs() / want.p99 < 0.031,
            "{got:?} {want:?}"
        );
        assert_eq!(h.len(), 10_000);
    }

    #[test]
    fn histogram_edges() {
        let mut h = Histogram::default();
        assert_eq!(h.quantile_us(0.5), 0.0);
        h.record(Duration::from_nanos(0));
        assert_eq!(h.quantile_us(0.5), 0.0);
        h.record(Duration::from_secs(u64::MAX)); // saturates, no panic
        assert!(h.quantile_us(1.0) > 1e12);
        for ns in [63u64, 64, 65, 127, 128, 1 << 40] {
            let v = Histogram::value(Histogram::index(ns));
            assert!((v - ns as f64).abs() / (ns as f64) < 0.031, "{ns}: {v}");
        }
    }

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
