//! The VMA budget ([`VmaBudget`]: refuse placements before `vm.max_map_count` gets close)
//! and [`Window::audit`], the window checked against `/proc/self/maps`.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::{procfs, Error, Result};

use super::{Window, DEFAULT_VMA_RESERVE};

/// Re-count `/proc/self/maps` after at least this many placements even when far from the
/// limit (further apart the more headroom there is: [`VmaBudget::recount_due`]).
const RECOUNT_EVERY: u32 = 256;

/// VMAs the windows of this process may have added: +2 per placement, -2 per placement
/// restored. A budget's estimate adds what every window added since its own last count, so
/// windows sharing a process (a VMM serving several devices) do not each count on the
/// whole headroom.
pub(super) static WINDOW_VMAS: AtomicI64 = AtomicI64::new(0);

/// The VMA budget: the limit, the reserve and an estimate of the process's VMA count: the
/// last count of `/proc/self/maps` plus what the process's windows placed since
/// ([`WINDOW_VMAS`]). It is counted again whenever the estimate gets close to the limit and
/// now and then in between, to see VMAs made outside the windows (threads, malloc).
#[derive(Debug)]
pub(super) struct VmaBudget {
    limit: usize,
    reserve: usize,
    counted: usize,
    since_count: u32,
    /// The process's tally when it was last counted.
    tally_at_count: i64,
    tally: &'static AtomicI64,
}

impl VmaBudget {
    pub(super) fn new(limit: usize, tally: &'static AtomicI64) -> Self {
        VmaBudget {
            limit,
            reserve: DEFAULT_VMA_RESERVE,
            counted: 0,
            since_count: 0,
            tally_at_count: tally.load(Ordering::Relaxed),
            tally,
        }
    }

    fn used_estimate(&self) -> usize {
        // Restores of placements made before the count can take the tally below its value
        // then; the count stays the floor.
        let added = self.tally.load(Ordering::Relaxed) - self.tally_at_count;
        self.counted + usize::try_from(added.max(0)).unwrap_or(usize::MAX)
    }

    pub(super) fn recount(&mut self) -> Result<()> {
        self.tally_at_count = self.tally.load(Ordering::Relaxed);
        self.counted = procfs::vma_count()?;
        self.since_count = 0;
        Ok(())
    }

    /// A count is due when the estimate comes near the limit, or after this window placed a
    /// quarter of the headroom there was at the last count (2 VMAs each; at least
    /// [`RECOUNT_EVERY`] placements apart): a count costs time per VMA (decision 042).
    fn recount_due(&self) -> bool {
        let near = self.used_estimate() + 2 + 2 * self.reserve >= self.limit;
        let headroom = self.limit.saturating_sub(self.counted + self.reserve);
        let every = (headroom / 8).max(RECOUNT_EVERY as usize);
        near || self.since_count as usize >= every
    }

    /// Ok if one more placement (at most 2 new VMAs) still leaves the reserve free.
    pub(super) fn admit(&mut self) -> Result<()> {
        if self.recount_due() {
            self.recount()?;
        }
        let used = self.used_estimate();
        if used + 2 + self.reserve > self.limit {
            return Err(Error::VmaHeadroom {
                used,
                limit: self.limit,
                reserve: self.reserve,
            });
        }
        Ok(())
    }

    /// A placement was made (up to 2 new VMAs).
    pub(super) fn placed(&mut self) {
        self.since_count += 1;
        self.tally.fetch_add(2, Ordering::Relaxed);
    }

    /// `n` placements went back to background.
    pub(super) fn restored(&mut self, n: usize) {
        let vmas = i64::try_from(n).unwrap_or(i64::MAX / 2).saturating_mul(2);
        self.tally.fetch_sub(vmas, Ordering::Relaxed);
    }
}

impl Window {
    /// Overrides the VMA limit (default `vm.max_map_count`) and reserve, e.g. for tests.
    pub fn set_vma_limit(&self, limit: usize, reserve: usize) {
        let mut st = self.lock();
        st.budget.limit = limit;
        st.budget.reserve = reserve;
    }

    /// VMAs still available for placements: `limit - reserve - used`, from a fresh count.
    pub fn vma_headroom(&self) -> Result<usize> {
        let mut st = self.lock();
        st.budget.recount()?;
        let b = &st.budget;
        Ok(b.limit.saturating_sub(b.reserve + b.used_estimate()))
    }
}

impl Window {
    /// Checks the window against the kernel's view: the window is mapped from end to end
    /// (no hole), and the ranges of `/proc/self/maps` inside the window that are not the window's own memfd at its own offset (background) must
    /// be exactly the placement table's ranges. Adjacent ranges are merged on both sides,
    /// because the kernel merges adjacent placements of one file at contiguous offsets into
    /// one VMA. Background is recognised by inode and offset, not by name, which a placed
    /// file could copy.
    pub fn audit(&self) -> Result<()> {
        // Under the lock: a concurrent place/restore (which hold it across their mmap) can
        // not change the mappings between the two reads.
        let st = self.lock();
        let (start, len) = self.host_range();
        let ino = nix::sys::stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&self.memfd.as_fd()))
            .map_err(|e| Error::WindowMismatch(format!("fstat of the window memfd: {e}")))?
            .st_ino;
        let maps = procfs::maps_in_range(start, start + len)?;
        // No hole: the window's range is mapped from end to end (the kernel lists VMAs in
        // address order).
        let mut at = start;
        for m in &maps {
            if m.start > at {
                return Err(Error::WindowMismatch(format!(
                    "hole at {:#x}+{:#x}: nothing mapped there",
                    at - start,
                    m.start - at
                )));
            }
            at = at.max(m.end);
        }
        if at < start + len {
            return Err(Error::WindowMismatch(format!(
                "hole at {:#x}+{:#x}: nothing mapped there",
                at - start,
                start + len - at
            )));
        }
        let mut foreign = Vec::new();
        for m in &maps {
            let (s, e) = ((m.start - start) as u64, (m.end - start) as u64);
            if m.inode == ino && m.offset == s {
                continue;
            }
            foreign.push((s, e));
        }
        let covered = merge_ranges(foreign);
        let table = merge_ranges(
            st.placements
                .values()
                .map(|p| (p.offset, p.offset + p.len))
                .collect(),
        );
        if covered != table {
            return Err(Error::WindowMismatch(format!(
                "mapped over background {covered:x?}, placed {table:x?}"
            )));
        }
        Ok(())
    }
}

/// Sorts `(start, end)` ranges and joins the ones that touch.
fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_sees_every_window_of_the_process() {
        static TALLY: AtomicI64 = AtomicI64::new(0);
        let mut a = VmaBudget::new(1000, &TALLY);
        let mut b = VmaBudget::new(1000, &TALLY);
        a.counted = 100;
        b.counted = 100;
        for _ in 0..10 {
            a.placed();
        }
        // b was not counted again, yet it sees a's 10 placements.
        assert_eq!(b.used_estimate(), 120);
        assert_eq!(a.used_estimate(), 120);
        a.restored(4);
        assert_eq!(b.used_estimate(), 112);
        // Restores of what was there before the count never take the estimate below it.
        a.restored(50);
        assert_eq!(b.used_estimate(), 100);
    }

    #[test]
    fn counts_come_further_apart_with_more_headroom_and_always_near_the_limit() {
        static TALLY: AtomicI64 = AtomicI64::new(0);
        let mut far = VmaBudget::new(65530, &TALLY);
        far.counted = 600;
        // A quarter of (65530 - 600 - 128) VMAs is 8100 placements.
        far.since_count = 8099;
        assert!(!far.recount_due());
        far.since_count = 8100;
        assert!(far.recount_due());
        let mut small = VmaBudget::new(2000, &TALLY);
        small.counted = 600;
        small.since_count = 255;
        assert!(!small.recount_due());
        small.since_count = RECOUNT_EVERY;
        assert!(
            small.recount_due(),
            "never further apart than every 256 near the floor"
        );
        // Near the limit: every admission counts again.
        let mut near = VmaBudget::new(1000, &TALLY);
        near.counted = 1000 - 2 - 2 * DEFAULT_VMA_RESERVE;
        assert!(near.recount_due());
    }
}
