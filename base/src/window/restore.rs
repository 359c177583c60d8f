//! Restoring: the background mapped back over one range or a run of them, and zeroed.

use std::os::fd::AsFd;
use std::sync::atomic::Ordering;

use crate::mmap::Prot;
use crate::{Error, Result};

use super::{Placement, Window, ZERO_BY_WRITE_MAX};

impl Window {
    /// Makes the background of `offset..offset+len` read zeros again, the cheapest way:
    /// nothing where no page holds data (`SEEK_DATA`; the usual case), a write of zeros
    /// over the few pages that do (up to [`ZERO_BY_WRITE_MAX`]), a punch otherwise. A punch
    /// walks every mapping of the range in every process (the device's mirror too: a
    /// TLB-shootdown IPI to its CPU) and KVM's MMU notifier; a write touches no mapping. The
    /// written pages stay allocated, as pages a guest merely read there do.
    fn zero_background(&self, offset: u64, len: u64) -> Result<()> {
        match self.memfd.data_extents(offset, len, 16) {
            Some(ext) if ext.iter().map(|e| e.1).sum::<u64>() <= ZERO_BY_WRITE_MAX => {
                for (o, l) in ext {
                    self.memfd.write_zeros(o, l)?;
                }
                Ok(())
            }
            _ => self.memfd.punch_hole(offset, len),
        }
    }
}

impl Window {
    /// Removes the live placement at exactly `offset..offset+len`: the window's background
    /// (its own memfd at the same offset, read/write) is mapped back and made to read
    /// zeros. On failure the placement stays recorded.
    pub fn restore(&self, offset: u64, len: u64) -> Result<Placement> {
        self.restore_many(&[(offset, len)])
            .pop()
            .unwrap_or(Err(Error::NotPlaced { offset, len }))
    }

    /// Removes several live placements at once, each named exactly as [`Window::restore`]
    /// wants it; one result per range, in the order given. Ranges with nothing else live
    /// between them go back to background together, in one MAP_FIXED over the span from
    /// the first to the last (the gaps between them are background already): a burst of
    /// unmaps costs one page-table update and one MMU-notifier round instead of one each,
    /// and the span ends as one VMA. A span whose MAP_FIXED fails is mapped back
    /// (`Window::map_back`); if even that fails, its placements stay recorded and each
    /// of them gets the error.
    pub fn restore_many(&self, ranges: &[(u64, u64)]) -> Vec<Result<Placement>> {
        let mut out: Vec<Result<Placement>> = ranges
            .iter()
            .map(|&(offset, len)| Err(Error::NotPlaced { offset, len }))
            .collect();
        let mut st = self.lock();
        // The ranges that name a live placement exactly (each once), by offset.
        let mut ok: Vec<(u64, u64, usize)> = Vec::with_capacity(ranges.len());
        for (i, &(offset, len)) in ranges.iter().enumerate() {
            let named = matches!(st.placements.get(&offset), Some(p) if p.len == len);
            if named && !ok.iter().any(|&(o, _, _)| o == offset) {
                ok.push((offset, len, i));
            }
        }
        ok.sort_unstable();
        let mut spans: Vec<Vec<(u64, u64, usize)>> = Vec::new();
        for r in ok {
            let joins = spans
                .last()
                .and_then(|sp| sp.last())
                .is_some_and(|&(o, l, _)| {
                    // Nothing live from the previous range's end to this one's start.
                    st.placements.range(o + l..r.0).next().is_none()
                });
            match spans.last_mut() {
                Some(sp) if joins => sp.push(r),
                _ => spans.push(vec![r]),
            }
        }
        let mut zero = Vec::new();
        for sp in spans {
            let (Some(&(start, _, _)), Some(&(last, last_len, _))) = (sp.first(), sp.last()) else {
                continue;
            };
            let errno = self
                .map_back(start, last + last_len - start)
                .err()
                .map(|e| match e {
                    Error::MapFixed { errno, .. } => errno,
                    _ => nix::errno::Errno::EIO,
                });
            for &(offset, len, i) in &sp {
                out[i] = match errno {
                    None => {
                        st.budget.restored(1);
                        zero.push((offset, len));
                        st.placements
                            .remove(&offset)
                            .ok_or(Error::NotPlaced { offset, len })
                    }
                    Some(errno) => Err(Error::MapFixed { offset, len, errno }),
                };
            }
        }
        drop(st);
        if self.zero_on_restore.load(Ordering::Relaxed) {
            for (offset, len) in zero {
                if let Err(e) = self.zero_background(offset, len) {
                    // The background is mapped back (no hole); only stale bytes may remain.
                    log::warn!("restore {offset:#x}+{len:#x}: {e}; zeroing through the mapping");
                    if let Err(e) = self.map.fill(offset as usize, len as usize, 0) {
                        log::error!("restore {offset:#x}+{len:#x}: {e}; background not zeroed");
                    }
                }
            }
        }
        out
    }

    /// Maps the background over `offset..offset+len`. On an old kernel a failed MAP_FIXED
    /// has unmapped the range: it is a hole unless the background goes back now
    /// ([`Window::map_background`]), and then it is restored after all.
    fn map_back(&self, offset: u64, len: u64) -> Result<()> {
        match self.map_fixed(offset, len, self.memfd.as_fd(), offset, Prot::READ_WRITE) {
            Err(e) if !self.map_background(offset, len) => Err(e),
            _ => Ok(()),
        }
    }

    /// Restores the whole window to background in one MAP_FIXED (which can only lower the
    /// VMA count) and zeroes it; returns the placements that were live.
    pub fn restore_all(&self) -> Result<Vec<Placement>> {
        let mut st = self.lock();
        self.map_back(0, self.size())?;
        let was: Vec<Placement> = std::mem::take(&mut st.placements).into_values().collect();
        st.budget.restored(was.len());
        st.budget.recount()?;
        drop(st);
        if self.zero_on_restore.load(Ordering::Relaxed) {
            self.zero_background(0, self.size())?;
        }
        Ok(was)
    }
}
