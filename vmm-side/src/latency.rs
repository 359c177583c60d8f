//! Latency statistics, in one place: [`Latency`] is the p50/p99 summary in µs that every
//! report carries (`hostmem run`, `hostmem bench`), and [`Histogram`] records samples in a
//! fixed amount of memory for runs too long to keep each one (a soak must show a flat RSS).
//!
//! The histogram is `hdrhistogram`'s (the HdrHistogram of Java, Go and C, ported), with
//! fixed bounds so that it never grows: 1 ns to one hour at two significant digits (values
//! kept to within 1 %, about 36 KiB). Longer samples saturate at one hour.
//!
//! [`Spread`] is the median and interquartile range of a few values (the bench's per-round
//! ratios), interpolated between ranks.

use std::time::Duration;

use serde::Serialize;

/// Latency summary in µs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Latency {
    /// From samples in µs (sorts them). The `q` quantile is the sample at rank
    /// `round((n - 1) * q)`.
    pub fn of(samples: &mut [f64]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Latency {
            p50: at(0.5),
            p99: at(0.99),
        }
    }
}

/// Median and interquartile range of a handful of values (the bench's per-round ratios,
/// its cold starts). Quantiles are interpolated linearly between the sorted values: the `q`
/// quantile sits at rank `(n - 1) * q` (numpy's default, R's type 7), so the median of an
/// even count is the mean of the two middle values and one value is its own p25, p50 and
/// p75.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// Values summarized.
    pub n: usize,
    /// 25th percentile.
    pub p25: f64,
    /// Median.
    pub p50: f64,
    /// 75th percentile.
    pub p75: f64,
}

impl Spread {
    /// The spread of `values` (`None` when there are none or one is not finite).
    pub fn of(values: &[f64]) -> Option<Spread> {
        if values.is_empty() || values.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| {
            let pos = (v.len() - 1) as f64 * q;
            let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
        };
        Some(Spread {
            n: v.len(),
            p25: at(0.25),
            p50: at(0.5),
            p75: at(0.75),
        })
    }
}

/// Longest sample kept exactly (ns): one hour.
const MAX_NS: u64 = 3_600 * 1_000_000_000;
/// Significant decimal digits kept (2: within 1 %).
const SIGFIG: u8 = 2;

/// A latency histogram in nanoseconds of fixed size (see the module docs).
#[derive(Debug, Clone)]
pub struct Histogram(hdrhistogram::Histogram<u64>);

impl Default for Histogram {
    fn default() -> Self {
        // Constant, valid bounds (1 <= MAX_NS / 2, SIGFIG <= 5): cannot fail.
        let h = hdrhistogram::Histogram::new_with_bounds(1, MAX_NS, SIGFIG)
            .expect("constant histogram bounds are valid");
        Histogram(h)
    }
}

impl Histogram {
    /// Records one sample (longer than an hour: counted as an hour).
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.0.saturating_record(ns.min(MAX_NS));
    }

    /// Samples recorded.
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// No samples yet.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The `q` quantile in µs (0 when empty): the middle of the bucket that holds it.
    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        let v = self.0.value_at_quantile(q);
        self.0.median_equivalent(v) as f64 / 1000.0
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

    #[test]
    fn latency_of_sorted_ranks() {
        let mut v: Vec<f64> = (1..=101).rev().map(f64::from).collect();
        let l = Latency::of(&mut v);
        assert_eq!(l.p50, 51.0);
        assert_eq!(l.p99, 100.0);
        assert_eq!(Latency::of(&mut []), Latency::default());
    }

    #[test]
    fn spread_of_an_odd_count() {
        // Unsorted on purpose: 1 2 3 4 5 → ranks 1, 2, 3 exactly.
        let s = Spread::of(&[5.0, 1.0, 4.0, 2.0, 3.0]).unwrap();
        assert_eq!((s.n, s.p25, s.p50, s.p75), (5, 2.0, 3.0, 4.0));
        // Between ranks: 7 values, p25 at rank 1.5.
        let s = Spread::of(&[10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0]).unwrap();
        assert_eq!((s.p25, s.p50, s.p75), (25.0, 40.0, 55.0));
    }

    #[test]
    fn spread_of_an_even_count() {
        // 1 2 3 10: median between 2 and 3; p25 at rank 0.75, p75 at rank 2.25.
        let s = Spread::of(&[10.0, 3.0, 2.0, 1.0]).unwrap();
        assert_eq!(s.n, 4);
        assert_eq!(s.p50, 2.5);
        assert_eq!(s.p25, 1.75);
        assert_eq!(s.p75, 4.75);
        let s = Spread::of(&[2.0, 1.0]).unwrap();
        assert_eq!((s.p25, s.p50, s.p75), (1.25, 1.5, 1.75));
    }

    #[test]
    fn spread_of_one_round_and_of_none() {
        let s = Spread::of(&[2.9]).unwrap();
        assert_eq!((s.n, s.p25, s.p50, s.p75), (1, 2.9, 2.9, 2.9));
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[1.0, f64::NAN]), None);
        assert_eq!(Spread::of(&[1.0, f64::INFINITY]), None);
    }

    #[test]
    fn histogram_quantiles_are_within_one_percent() {
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
            (got.p50 - want.p50).abs() / want.p50 < 0.011,
            "{got:?} {want:?}"
        );
        assert!(
            (got.p99 - want.p99).abs() / want.p99 < 0.011,
            "{got:?} {want:?}"
        );
        assert_eq!(h.len(), 10_000);
    }

    #[test]
    fn histogram_edges() {
        let mut h = Histogram::default();
        assert!(h.is_empty());
        assert_eq!(h.quantile_us(0.5), 0.0);
        h.record(Duration::from_nanos(0));
        assert_eq!(h.quantile_us(0.5), 0.0);
        h.record(Duration::from_secs(u64::MAX)); // saturates at an hour, no panic
        let top = h.quantile_us(1.0);
        assert!((top / 3.6e9 - 1.0).abs() < 0.011, "{top}");
        for ns in [63u64, 64, 65, 127, 128, 1 << 40] {
            let mut h = Histogram::default();
            h.record(Duration::from_nanos(ns));
            let v = h.quantile_us(0.5) * 1000.0;
            assert!((v - ns as f64).abs() / (ns as f64) < 0.011, "{ns}: {v}");
        }
    }

    #[test]
    fn histogram_size_is_fixed() {
        let mut h = Histogram::default();
        let before = h.0.distinct_values();
        for ns in [1u64, 1_000, 1_000_000, MAX_NS, u64::MAX] {
            h.record(Duration::from_nanos(ns));
        }
        assert_eq!(h.0.distinct_values(), before, "the bounds never grow");
    }
}
