//! Placing: checking a placement, then mapping it with `MAP_FIXED` (or through the caller's
//! mapping function), with the background mapped back over a failed one.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd};
#[cfg(feature = "fault-injection")]
use std::sync::atomic::Ordering;

use nix::sys::mman::MapFlags;

use crate::mmap::{check_range, is_page_aligned, Prot};
use crate::shm::file_facts;
use crate::{Error, Result};

use super::{FixedTarget, MappedBy, Placement, Window, RESTORE_ATTEMPTS};

impl Window {
    /// Checks a placement against the window without any syscall: non-zero, page-aligned,
    /// inside the window with checked arithmetic, no overlap with a live placement.
    pub fn check_place(&self, offset: u64, len: u64) -> Result<()> {
        Self::check_place_in(&self.lock().placements, self.size(), offset, len)
    }

    fn check_place_in(
        placements: &BTreeMap<u64, Placement>,
        size: u64,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        if len == 0 {
            return Err(Error::InvalidSize(0));
        }
        for (what, value) in [("offset", offset), ("length", len)] {
            if !is_page_aligned(value) {
                return Err(Error::Misaligned { what, value });
            }
        }
        check_range(offset, len, size)?;
        let end = offset + len; // cannot overflow: check_range passed
                                // The only candidates for overlap: the last placement starting before `end`.
        if let Some((_, p)) = placements.range(..end).next_back() {
            if p.offset + p.len > offset {
                return Err(Error::Overlap {
                    offset,
                    len,
                    other: p.offset,
                    other_len: p.len,
                });
            }
        }
        Ok(())
    }

    /// Places `len` bytes of `fd` (from `fd_offset`) at window offset `offset` with
    /// MAP_FIXED | MAP_SHARED. Everything is checked before the syscall: the range, overlap,
    /// protection (never EXEC), that the fd is a regular file at least `fd_offset + len`
    /// long, and that the VMA budget leaves room to restore.
    pub fn place(
        &self,
        offset: u64,
        len: u64,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
        prot: Prot,
    ) -> Result<()> {
        self.place_with(offset, len, fd, fd_offset, prot, |_| Ok(false))
            .map(drop)
    }

    /// [`Window::place`] for a caller that has just read `fd`'s facts ([`file_facts`]) to
    /// check the request itself: the same checks on them, without a second `fstat` and
    /// `F_GET_SEALS` (the VMM's mapping service, once per placement).
    pub fn place_known(
        &self,
        offset: u64,
        len: u64,
        fd: BorrowedFd<'_>,
        facts: &crate::shm::FileFacts,
        fd_offset: u64,
        prot: Prot,
    ) -> Result<()> {
        self.place_inner(offset, len, fd, Some(facts), fd_offset, prot, |_| Ok(false))
            .map(drop)
    }

    /// [`Window::place`], but the mapping itself may be made by `map`: after every check
    /// passed, and under the window's lock, `map` gets the [`FixedTarget`] (the host range
    /// `offset..offset+len` of this window) and may map `fd` there itself, as
    /// virglrenderer's `virgl_renderer_resource_map_fixed` does. It answers `Ok(true)` when
    /// it mapped, `Ok(false)` to decline; the window then maps `fd` itself, and it does the
    /// same after an `Err` (logged), since a failed MAP_FIXED may have left the range
    /// unmapped. Returns who mapped.
    ///
    /// `map` must map `fd` from `fd_offset` over exactly the target, read/write when `prot`
    /// is; the window cannot check that cheaply ([`Window::audit`] checks ranges), so
    /// `map` is for code that maps the same file (the renderer's own mapping of the blob
    /// fd handed in here).
    pub fn place_with<F>(
        &self,
        offset: u64,
        len: u64,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
        prot: Prot,
        map: F,
    ) -> Result<MappedBy>
    where
        F: FnOnce(&FixedTarget<'_>) -> std::result::Result<bool, String>,
    {
        self.place_inner(offset, len, fd, None, fd_offset, prot, map)
    }

    /// [`Window::place_with`] with `fd`'s facts when the caller has them (`None`: read here).
    #[allow(clippy::too_many_arguments)]
    fn place_inner<F>(
        &self,
        offset: u64,
        len: u64,
        fd: BorrowedFd<'_>,
        known: Option<&crate::shm::FileFacts>,
        fd_offset: u64,
        prot: Prot,
        map: F,
    ) -> Result<MappedBy>
    where
        F: FnOnce(&FixedTarget<'_>) -> std::result::Result<bool, String>,
    {
        let mut st = self.lock();
        Self::check_place_in(&st.placements, self.size(), offset, len)?;
        if !is_page_aligned(fd_offset) {
            return Err(Error::Misaligned {
                what: "fd offset",
                value: fd_offset,
            });
        }
        let facts = match known {
            Some(f) => *f,
            None => file_facts(fd)?,
        };
        if !facts.is_regular() {
            return Err(Error::NotRegularFile { mode: facts.mode });
        }
        let need = fd_offset.checked_add(len).ok_or(Error::OutOfRange {
            offset: fd_offset,
            len,
            limit: facts.size,
        })?;
        if facts.size < need {
            return Err(Error::FileTooSmall {
                need,
                have: facts.size,
            });
        }
        // A read/write MAP_SHARED of a write-sealed file fails (EPERM): refuse it before the
        // syscall, as an invalid placement and not as a failed mmap.
        if prot == Prot::READ_WRITE && facts.write_sealed() {
            return Err(Error::WriteSealed(facts.seals.unwrap_or(0)));
        }
        if let Some(why) = facts.mapping_refusal(prot) {
            return Err(Error::Unmappable(why));
        }
        st.budget.admit()?;
        let target = FixedTarget {
            addr: self.map.as_ptr() as usize + offset as usize, // inside the window: checked
            len: len as usize,
            prot,
            _window: PhantomData,
        };
        let by = match map(&target) {
            Ok(true) => MappedBy::Caller,
            Ok(false) => MappedBy::Window,
            Err(why) => {
                log::warn!(
                    "place {offset:#x}+{len:#x}: the caller's mapping failed ({why}); \
                     mapping the fd instead"
                );
                MappedBy::Window
            }
        };
        if by == MappedBy::Window {
            if let Err(e) = self.map_fixed(offset, len, fd, fd_offset, prot) {
                // Whatever the failed call (or the caller's) left there, the range must not
                // be a hole: the background goes back before the error is returned.
                self.map_background(offset, len);
                return Err(e);
            }
        }
        st.budget.placed();
        st.placements.insert(
            offset,
            Placement {
                offset,
                len,
                fd_offset,
                prot,
            },
        );
        Ok(by)
    }

    /// The one MAP_FIXED in hostmem (a caller's mapping through [`Window::place_with`]
    /// aside). `offset..offset+len` must have been checked to lie
    /// inside the window.
    pub(super) fn map_fixed(
        &self,
        offset: u64,
        len: u64,
        fd: BorrowedFd<'_>,
        fd_offset: u64,
        prot: Prot,
    ) -> Result<()> {
        let err = |errno| Error::MapFixed { offset, len, errno };
        let size = NonZeroUsize::new(len as usize).ok_or(Error::InvalidSize(len))?;
        let file_off = i64::try_from(fd_offset).map_err(|_| Error::InvalidSize(fd_offset))?;
        debug_assert!(check_range(offset, len, self.size()).is_ok());
        let addr = self.map.as_ptr() as usize + offset as usize;
        let want = NonZeroUsize::new(addr).ok_or(Error::InvalidSize(offset))?;
        #[cfg(feature = "fault-injection")]
        if self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            if self.fail_unmaps.load(Ordering::SeqCst) {
                let ptr = std::ptr::NonNull::new(addr as *mut std::ffi::c_void)
                    .ok_or(Error::InvalidSize(offset))?;
                // SAFETY: addr..addr+len lies inside this window's own mapping (see the
                // mmap below); unmapping it only makes the range a hole, which is what an
                // old kernel's failing MAP_FIXED leaves and what the caller repairs. Nothing
                // holds a reference into the window's memory.
                unsafe { nix::sys::mman::munmap(ptr, len as usize) }.map_err(err)?;
            }
            return Err(err(nix::errno::Errno::ENOMEM));
        }
        // SAFETY: addr..addr+len lies inside this window's own mapping (checked by every
        // caller with check_range against the window size), which this object owns for its
        // whole life. Replacing those pages with another MAP_SHARED file mapping cannot
        // invalidate any Rust reference: the window's memory is only ever accessed through
        // copies (MemoryMapping's API), by other processes, or by KVM, never via references.
        let got = unsafe {
            nix::sys::mman::mmap(
                Some(want),
                size,
                prot.flags(),
                MapFlags::MAP_SHARED | MapFlags::MAP_FIXED,
                fd,
                file_off,
            )
        }
        .map_err(err)?;
        if got.as_ptr() as usize != addr {
            // MAP_FIXED never moves a mapping; treat anything else as a failed placement.
            return Err(err(nix::errno::Errno::EINVAL));
        }
        Ok(())
    }

    /// Maps the window's background (its own memfd, read/write) back over
    /// `offset..offset+len` after a failed MAP_FIXED there, trying [`RESTORE_ATTEMPTS`]
    /// times. True if it is back (no hole).
    pub(super) fn map_background(&self, offset: u64, len: u64) -> bool {
        for attempt in 1..=RESTORE_ATTEMPTS {
            match self.map_fixed(offset, len, self.memfd.as_fd(), offset, Prot::READ_WRITE) {
                Ok(()) => return true,
                Err(e) => log::error!(
                    "window {offset:#x}+{len:#x}: mapping the background back failed \
                     (attempt {attempt} of {RESTORE_ATTEMPTS}): {e}"
                ),
            }
        }
        false
    }
}
