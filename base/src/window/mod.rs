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
use std::os::fd::AsFd;
#[cfg(feature = "fault-injection")]
use std::sync::atomic::AtomicU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crate::mmap::{check_range, is_page_aligned, MemoryMapping, Prot};
use crate::shm::SharedMemory;
use crate::{procfs, Error, Result};

mod budget;
mod place;
mod restore;

use budget::{VmaBudget, WINDOW_VMAS};

/// VMAs kept free below the limit by default: enough for restores, thread stacks and malloc.
pub const DEFAULT_VMA_RESERVE: usize = 128;
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
