//! The hostmem `Window`: one memfd mapped once, MAP_SHARED, into which blobs are placed with
//! `MAP_FIXED` and out of which they are removed by mapping the window's own background
//! back (invariants 2 and 7 in docs/invariants.md).
//!
//! The same type serves the VMM (whose window KVM reads as one memslot) and the device
//! (whose *mirror* maps the same memfd). Bookkeeping keeps placements non-overlapping,
//! page-aligned and inside the window (checked arithmetic), and a VMA budget refuses new
//! placements before the process gets close enough to `vm.max_map_count` that a restore
//! could fail with ENOMEM and leave a hole.
//!
//! **A failed placement never leaves a hole.** Kernels before 6.12 unmap the old range
//! before a `mmap(MAP_FIXED)` that then fails returns, so every failure of a placement's or
//! a restore's MAP_FIXED is followed by mapping the window's own background back over the
//! range (up to [`RESTORE_ATTEMPTS`] times; the VMA reserve keeps room for it, and the
//! background can always be mapped read/write because the window memfd is sealed with
//! F_SEAL_SEAL and can never gain a write seal). What is known to fail is refused before the
//! syscall: a write-sealed fd for a read/write placement ([`Error::WriteSealed`]).
//! `Window::inject_map_failures` (cargo feature `fault-injection`, on in the tests only)
//! makes the next MAP_FIXEDs fail the way an old kernel's do (range unmapped, then an
//! error), so tests reach every failure path on any kernel.

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd};
#[cfg(feature = "fault-injection")]
use std::sync::atomic::AtomicU32;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;

use nix::sys::mman::MapFlags;

use crate::mmap::{check_range, is_page_aligned, MemoryMapping, Prot};
use crate::shm::{file_facts, SharedMemory};
use crate::{procfs, Error, Result};

/// VMAs kept free below the limit by default: enough for restores, thread stacks and malloc.
pub const DEFAULT_VMA_RESERVE: usize = 128;
/// Re-count `/proc/self/maps` after at least this many placements even when far from the
/// limit (further apart the more headroom there is: [`VmaBudget::recount_due`]).
const RECOUNT_EVERY: u32 = 256;

/// VMAs the windows of this process may have added: +2 per placement, -2 per placement
/// restored. A budget's estimate adds what every window added since its own last count, so
/// windows sharing a process (a VMM serving several devices) do not each count on the
/// whole headroom.
static WINDOW_VMAS: AtomicI64 = AtomicI64::new(0);
/// How often the background is mapped back over a range whose MAP_FIXED failed.
pub const RESTORE_ATTEMPTS: u32 = 3;

/// One live placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Window offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset inside the placed file.
    pub fd_offset: u64,
    /// Protection.
    pub prot: Prot,
}

/// The VMA budget: the limit, the reserve and an estimate of the process's VMA count: the
/// last count of `/proc/self/maps` plus what the process's windows placed since
/// ([`WINDOW_VMAS`]). It is counted again whenever the estimate gets close to the limit and
/// now and then in between, to see VMAs made outside the windows (threads, malloc).
#[derive(Debug)]
struct VmaBudget {
    limit: usize,
    reserve: usize,
    counted: usize,
    since_count: u32,
    /// The process's tally when it was last counted.
    tally_at_count: i64,
    tally: &'static AtomicI64,
}

impl VmaBudget {
    fn new(limit: usize, tally: &'static AtomicI64) -> Self {
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

    fn recount(&mut self) -> Result<()> {
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
    fn admit(&mut self) -> Result<()> {
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
    fn placed(&mut self) {
        self.since_count += 1;
        self.tally.fetch_add(2, Ordering::Relaxed);
    }

    /// `n` placements went back to background.
    fn restored(&mut self, n: usize) {
        let vmas = i64::try_from(n).unwrap_or(i64::MAX / 2).saturating_mul(2);
        self.tally.fetch_sub(vmas, Ordering::Relaxed);
    }
}

#[derive(Debug)]
struct State {
    placements: BTreeMap<u64, Placement>,
    budget: VmaBudget,
}

/// Who made a placement's mapping ([`Window::place_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MappedBy {
    /// The window's own MAP_FIXED of the fd.
    Window,
    /// The caller's function (e.g. virglrenderer's `map_fixed`).
    Caller,
}

/// The host address range of one checked placement, handed to the mapping function of
/// [`Window::place_with`] while the window's lock is held. Only the window makes one: the
/// range lies inside the window's own mapping, is page-aligned, overlaps no live
/// placement, and the VMA budget admitted it. That is what makes mapping over it (with
/// MAP_FIXED) sound, e.g. in `virgl::Renderer::map_fixed` (feature `virgl`).
#[derive(Debug)]
pub struct FixedTarget<'w> {
    addr: usize,
    len: usize,
    prot: Prot,
    _window: PhantomData<&'w Window>,
}

impl FixedTarget<'_> {
    /// Start address.
    pub fn addr(&self) -> usize {
        self.addr
    }

    /// Length in bytes (page-aligned, non-zero).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true (placements are non-empty).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The protection the placement asks for.
    pub fn prot(&self) -> Prot {
        self.prot
    }
}

/// Background data a restore zeroes by writing; more is punched
/// (`Window::zero_background`).
pub const ZERO_BY_WRITE_MAX: u64 = 64 * 1024;

/// The hostmem window (or the device's mirror of it).
#[derive(Debug)]
pub struct Window {
    memfd: SharedMemory,
    map: MemoryMapping,
    state: Mutex<State>,
    /// Test hook ([`Window::inject_map_failures`]): MAP_FIXEDs still to fail.
    #[cfg(feature = "fault-injection")]
    fail_next: AtomicU32,
    /// ... and whether they unmap the range first, as kernels before 6.12 do.
    #[cfg(feature = "fault-injection")]
    fail_unmaps: AtomicBool,
    /// Restores punch the background back to zeros ([`Window::set_zero_on_restore`]).
    zero_on_restore: AtomicBool,
}

impl Window {
    /// Creates the window's memfd (`size` bytes) and maps it: the VMM's side. The memfd is
    /// sealed for sharing ([`SharedMemory::seal_for_sharing`]: size fixed, no further seals)
    /// before anyone else can hold it, so a device can never take the VMM's ability to map
    /// its background read/write away.
    pub fn new(size: u64) -> Result<Self> {
        if size == 0 || !is_page_aligned(size) {
            return Err(Error::InvalidSize(size));
        }
        let memfd = SharedMemory::new("hostmem-window", size)?;
        memfd.seal_for_sharing()?;
        Self::from_memfd(memfd)
    }

    /// The device's mirror of the VMM's window (`memfd` is the VMM's): as
    /// [`Window::from_memfd`], but its restores leave zeroing the shared background to the
    /// owner ([`Window::set_zero_on_restore`]), so the device needs no `fallocate`.
    pub fn mirror_of(memfd: SharedMemory) -> Result<Self> {
        let w = Self::from_memfd(memfd)?;
        w.set_zero_on_restore(false);
        Ok(w)
    }

    /// Maps an existing window memfd.
    pub fn from_memfd(memfd: SharedMemory) -> Result<Self> {
        let size = memfd.size();
        if size == 0 || !is_page_aligned(size) {
            return Err(Error::InvalidSize(size));
        }
        let len = usize::try_from(size).map_err(|_| Error::InvalidSize(size))?;
        let map = MemoryMapping::from_fd(memfd.as_fd(), 0, len, Prot::READ_WRITE)?;
        let mut budget = VmaBudget::new(procfs::max_map_count()?, &WINDOW_VMAS);
        budget.recount()?;
        Ok(Window {
            memfd,
            map,
            state: Mutex::new(State {
                placements: BTreeMap::new(),
                budget,
            }),
            #[cfg(feature = "fault-injection")]
            fail_next: AtomicU32::new(0),
            #[cfg(feature = "fault-injection")]
            fail_unmaps: AtomicBool::new(false),
            zero_on_restore: AtomicBool::new(true),
        })
    }

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

    /// Whether [`Window::restore`] and [`Window::restore_all`] zero the background they
    /// map back (default: yes). The device's mirror turns it off: it shares the VMM's
    /// memfd, whose owner zeroes it after its own restore, so a second punch of the same
    /// pages is only cost (it walks every mapping of the range, KVM's included), and the
    /// device's policy then needs no `fallocate` at all.
    pub fn set_zero_on_restore(&self, on: bool) {
        self.zero_on_restore.store(on, Ordering::Relaxed);
    }

    /// Test hook: the next `count` MAP_FIXEDs of this window (placements, restores and the
    /// background mapped back after a failure) fail with ENOMEM; with `unmap_first` they
    /// first unmap their range, as a failing MAP_FIXED does on kernels before 6.12. Only
    /// with the cargo feature `fault-injection` (the tests' builds).
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn inject_map_failures(&self, count: u32, unmap_first: bool) {
        self.fail_unmaps.store(unmap_first, Ordering::SeqCst);
        self.fail_next.store(count, Ordering::SeqCst);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the table half-updated (every update
        // is a single insert/remove after the syscall), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Window size in bytes.
    pub fn size(&self) -> u64 {
        self.memfd.size()
    }

    /// The window's memfd (to send to the device, or to register as a memslot).
    pub fn memfd(&self) -> &SharedMemory {
        &self.memfd
    }

    /// The host address range of the window: `(start, len)`.
    pub fn host_range(&self) -> (usize, usize) {
        (self.map.as_ptr() as usize, self.map.size())
    }

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
    fn map_fixed(
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
    fn map_background(&self, offset: u64, len: u64) -> bool {
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

    /// The live placements, by offset.
    pub fn placements(&self) -> Vec<Placement> {
        self.lock().placements.values().copied().collect()
    }

    /// Number of live placements.
    pub fn live(&self) -> usize {
        self.lock().placements.len()
    }

    /// Copies bytes out of the window (host view).
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        self.map.read_slice(offset as usize, buf)
    }

    /// Copies bytes into the window (host view; only valid over writable placements or
    /// background).
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        check_range(offset, data.len() as u64, self.size())?;
        let st = self.lock();
        let end = offset + data.len() as u64;
        let read_only = st
            .placements
            .range(..end)
            .rev()
            .take_while(|(_, p)| p.offset + p.len > offset)
            .find(|(_, p)| p.prot != Prot::READ_WRITE);
        if let Some((_, p)) = read_only {
            return Err(Error::BadProtection(p.prot.bits()));
        }
        self.map.write_slice(offset as usize, data)
    }

    /// The window's mapping (for registering it as a memslot).
    pub fn mapping(&self) -> &MemoryMapping {
        &self.map
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
