//! [`LogLimiter`]: one log line per kind of misbehaviour at the 1st, 2nd, 4th, 8th, …
//! occurrence, and an exact count of every kind, for whatever the guest or the device can
//! make happen as often as it likes (bad commands, bad chains, bad register writes,
//! refused placements). A flood of n costs about log2(n) lines; the counts go into the
//! reports (`--json`), so nothing is lost but the repetition.

use std::collections::BTreeMap;
use std::sync::Mutex;

/// Most kinds one limiter counts; a kind past it is counted under [`OTHER_KINDS`] (kinds
/// are names in the code, so only a bug reaches it; it keeps the report bounded anyway).
pub const MAX_KINDS: usize = 64;
/// Where kinds past [`MAX_KINDS`] are counted.
pub const OTHER_KINDS: &str = "other kinds";

/// Counts per kind, logging each kind when its count is a power of two.
#[derive(Debug)]
pub struct LogLimiter {
    target: &'static str,
    counts: Mutex<BTreeMap<&'static str, u64>>,
}

impl Default for LogLimiter {
    fn default() -> Self {
        LogLimiter::new("hostmem")
    }
}

impl LogLimiter {
    /// A limiter whose lines go to the log target `target` (the crate's module, as
    /// `log::warn!` would name it).
    pub const fn new(target: &'static str) -> Self {
        LogLimiter {
            target,
            counts: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, u64>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one occurrence of `kind`; logs `what` (with the kind and its count) at WARN
    /// when the count is a power of two. Returns whether it logged.
    pub fn warn(&self, kind: &'static str, what: std::fmt::Arguments<'_>) -> bool {
        self.log(log::Level::Warn, kind, what)
    }

    /// [`LogLimiter::warn`] at another level (what is normal once but not 30,000 times).
    pub fn log(
        &self,
        level: log::Level,
        kind: &'static str,
        what: std::fmt::Arguments<'_>,
    ) -> bool {
        let n = {
            let mut c = self.lock();
            let key = if c.len() >= MAX_KINDS && !c.contains_key(kind) {
                OTHER_KINDS
            } else {
                kind
            };
            let n = c.entry(key).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        if n.is_power_of_two() {
            log::log!(target: self.target, level, "{what} ({kind}, {n} so far)");
            true
        } else {
            false
        }
    }

    /// How often `kind` happened.
    pub fn count(&self, kind: &str) -> u64 {
        self.lock().get(kind).copied().unwrap_or(0)
    }

    /// Every kind seen and its count (at most [`MAX_KINDS`] + 1 entries).
    pub fn counts(&self) -> BTreeMap<String, u64> {
        self.lock()
            .iter()
            .map(|(k, n)| ((*k).to_string(), *n))
            .collect()
    }

    /// Forgets every count (a new device instance starts from zero).
    pub fn clear(&self) {
        self.lock().clear();
    }
}

/// Adds `from`'s counts into `into`, keeping at most [`MAX_KINDS`] kinds (the rest under
/// [`OTHER_KINDS`]): for counts another process reported, which may be anything.
pub fn merge_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, n) in from {
        let key = if into.len() >= MAX_KINDS && !into.contains_key(k) {
            OTHER_KINDS.to_string()
        } else {
            k.chars().take(80).collect()
        };
        let e = into.entry(key).or_insert(0);
        *e = e.saturating_add(*n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_powers_of_two_and_counts_all() {
        let l = LogLimiter::default();
        let logged: Vec<bool> = (0..9).map(|_| l.warn("k", format_args!("x"))).collect();
        assert_eq!(
            logged,
            [true, true, false, true, false, false, false, true, false]
        );
        assert_eq!(l.count("k"), 9);
        let lines = (0..3500).filter(|_| l.warn("j", format_args!("y"))).count();
        assert_eq!(lines, 12, "1, 2, 4, … 2048");
        assert_eq!(l.counts().get("j"), Some(&3500));
    }

    #[test]
    fn kinds_are_bounded() {
        let mut big = BTreeMap::new();
        let many: BTreeMap<String, u64> = (0..1000).map(|i| (format!("kind {i}"), 1)).collect();
        merge_counts(&mut big, &many);
        assert_eq!(big.len(), MAX_KINDS + 1);
        assert_eq!(big.values().sum::<u64>(), 1000);
    }
}
