//! The VMM's hostmem state and the mapping service's checks (invariant 1 in docs/invariants.md).
//!
//! [`Hostmem`] owns the window and, when KVM is there, the VM whose memslots back it. In
//! `fixed` mode the window is one memslot for its whole life and every accepted placement
//! is repeated in it with MAP_FIXED; in `per-blob-slot` mode (the legacy way) each blob gets
//! a memslot of its own at `window_gpa + offset`.
//!
//! Nothing from the device is trusted: [`Hostmem::check_map`] runs every check before any
//! syscall (invariant 1 in docs/invariants.md). The VMM keeps no blob fd after a placement: the mapping
//! holds the file, and restoring the range releases it.
//!
//! ## What a compromised device can and cannot do to the guest
//!
//! The guest's commands live in virtqueues that only the guest and the device read (a real
//! virtio-gpu device: the VMM's transport never sees a MAP_BLOB), so the VMM cannot tell a
//! placement that answers a guest command from one the device makes up. What it enforces is
//! what holds whatever the device says:
//!
//! * **It can** map any valid fd (a regular file, sealed against shrinking, long enough)
//!   into a free, page-aligned range of the window at any time, under any resource id that
//!   is not live already, and unmap its own placements (same offset, length and resource id)
//!   at any time. That is: show the guest wrong bytes in the window, or take bytes away
//!   (they read as zeros again) — what a compromised renderer could do to the blobs it
//!   renders anyway.
//! * **It cannot** map outside the window or past its end (checked arithmetic), over a live
//!   placement, read-only or with `PROT_EXEC` (a guest write to a read-only placement would
//!   fail KVM_RUN with EFAULT), a write-sealed file (the VMM's read/write mapping would
//!   fail), a file that can shrink (a guest access would fault), a
//!   socket, pipe, directory or device node, an fd `mmap` would refuse for how it was
//!   opened or where it lives (read-only or write-only, `O_PATH`, hugetlbfs:
//!   [`FileFacts::mapping_refusal`], checked before the syscall), **any file the VMM gave
//!   it** (the window's memfd, guest RAM: [`Hostmem::note_given`], by `st_dev`/`st_ino`, so
//!   a dup or a `/proc` reopen is the same file), one resource id twice at once, more than
//!   [`Limits::max_live`] placements or past the VMA headroom (invariant 7); it cannot unmap
//!   what it did not place or part of a placement, and it cannot leave a hole: every range
//!   is background or a blob at every moment (invariant 2), and on its death every
//!   placement goes back to background (invariant 4).
//! * **Guest RAM**: the device holds guest RAM read/write (the memfds of
//!   `TransportMsg::GuestMemory`), as every virtio device process does in crosvm or a
//!   vhost-user backend: it must read the guest's requests and write its responses anywhere
//!   the driver points descriptors. It can therefore read and write any guest RAM; the
//!   jail (seccomp, namespaces, no other fds) keeps it from reaching anything beyond what
//!   virtio already gives a device. The hostmem window adds no access to guest RAM: a
//!   Map whose fd is guest RAM (or the window itself) is refused by the file's identity.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hostmem_base::kvm::Vm;
use hostmem_base::log_limit::LogLimiter;
use hostmem_base::mmap::{check_range, is_page_aligned, MemoryMapping, Prot};
use hostmem_base::shm::{file_facts, mapping_facts, FileFacts};
use hostmem_base::window::Window;
use hostmem_ipc::protocol::{Outcome, RefuseCode};
use serde::Serialize;

/// Guest physical address of the hostmem window (above 4 GiB, clear of guest RAM).
pub const DEFAULT_WINDOW_GPA: u64 = 1 << 32;
/// Memslot of the window in fixed mode (slot 0 is the probe's guest RAM).
pub const WINDOW_SLOT: u32 = 1;
/// First memslot used for blobs in per-blob-slot mode.
const FIRST_BLOB_SLOT: u32 = 2;
/// Default limit of live placements.
pub const DEFAULT_MAX_LIVE: usize = 16 * 1024;
/// How a refusal at [`Limits::max_placed_bytes`] starts.
const PLACED_BYTES: &str = "placed bytes limit";

/// How blobs reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// One memslot for the window, MAP_FIXED placements (the default).
    Fixed,
    /// One memslot per mapped blob (legacy, for comparison).
    PerBlobSlot,
}

impl Mode {
    /// The name used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Fixed => "fixed",
            Mode::PerBlobSlot => "per-blob-slot",
        }
    }
}

/// A refused event: the category for the virtio-gpu error and the reason for the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refusal {
    /// Category.
    pub code: RefuseCode,
    /// Why.
    pub reason: String,
}

impl Refusal {
    fn invalid(reason: impl Into<String>) -> Self {
        Refusal {
            code: RefuseCode::InvalidParameter,
            reason: reason.into(),
        }
    }
    fn oom(reason: impl Into<String>) -> Self {
        Refusal {
            code: RefuseCode::OutOfMemory,
            reason: reason.into(),
        }
    }
    fn unspec(reason: impl Into<String>) -> Self {
        Refusal {
            code: RefuseCode::Unspec,
            reason: reason.into(),
        }
    }
    /// The reply to send to the device.
    pub fn outcome(&self) -> Outcome {
        Outcome::Refused {
            code: self.code,
            reason: self.reason.clone(),
        }
    }
}

/// A placement event as the device sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEvent {
    /// Resource id.
    pub resource_id: u32,
    /// Window offset.
    pub offset: u64,
    /// Length.
    pub len: u64,
    /// Offset inside the blob's fd.
    pub fd_offset: u64,
    /// PROT_* bits.
    pub prot: u32,
}

/// Limits on what the device can make the VMM hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Live placements.
    pub max_live: usize,
    /// Bytes of live placements together: the blob memory the VMM lets the guest reach
    /// (and so touch, which charges the pages to the VMM) at once, whatever the device
    /// says. `hostmem run` sets the device's memory limit; default: no bound beyond the
    /// window.
    pub max_placed_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_live: DEFAULT_MAX_LIVE,
            max_placed_bytes: u64::MAX,
        }
    }
}

/// A live placement in the VMM.
#[derive(Debug)]
struct Live {
    resource_id: u32,
    len: u64,
    /// Per-blob-slot mode: the slot and the mapping that backs it.
    slot: Option<(u32, Arc<MemoryMapping>)>,
}

/// A file the VMM handed the device (the window's memfd, guest RAM): never accepted back
/// as a blob, by identity.
#[derive(Debug, Clone, Copy)]
struct Given {
    /// `(st_dev, st_ino)`.
    id: (u64, u64),
    what: &'static str,
}

#[derive(Debug, Default)]
struct State {
    live: BTreeMap<u64, Live>,
    /// Every file the VMM gave a device ([`Hostmem::note_given`]), kept for the life of
    /// the `Hostmem` (a device may hold them as long).
    given: Vec<Given>,
    /// Window offset of each live resource id (a device places a resource once at a time).
    by_resource: HashMap<u32, u64>,
    free_slots: Vec<u32>,
    next_slot: u32,
    max_live_seen: usize,
    /// Bytes of live placements now and at most so far, and maps refused at
    /// [`Limits::max_placed_bytes`].
    placed_bytes: u64,
    placed_bytes_max: u64,
    placed_bytes_refused: u64,
}

/// Counters the run reports.
#[derive(Debug, Default, Serialize, Clone, Copy)]
pub struct Counters {
    /// Placement events accepted.
    pub maps_ok: u64,
    /// Unmap events accepted.
    pub unmaps_ok: u64,
    /// Events refused.
    pub refused: u64,
    /// Messages that were not valid events (malformed, wrong fds …).
    pub protocol_errors: u64,
    /// Times the whole window was reset after a device death.
    pub resets: u64,
}

/// Points in event handling where a fault-injection hook runs (tests: kill the device
/// exactly there; `Hostmem::set_fault_hook`, cargo feature `fault-injection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultPoint {
    /// A map event arrived (the device has placed the blob in its mirror); the VMM has not.
    MapReceived,
    /// The VMM placed the blob; its reply is not sent yet.
    MapPlaced,
    /// An unmap event arrived (the device has restored its mirror); the VMM has not.
    UnmapReceived,
    /// The VMM restored the range; its reply is not sent yet.
    UnmapDone,
}

/// A fault-injection hook: called with the point and the event's resource id.
#[cfg(feature = "fault-injection")]
pub type FaultHook = Box<dyn Fn(FaultPoint, u32) + Send + Sync>;

/// The fault hook; without the cargo feature `fault-injection` there is none to set.
#[derive(Default)]
struct Faults(#[cfg(feature = "fault-injection")] Mutex<Option<FaultHook>>);

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Faults")
    }
}

/// An unmap must name a live placement exactly (resource, offset, length).
fn check_unmap(st: &State, resource_id: u32, offset: u64, len: u64) -> Result<(), Refusal> {
    match st.live.get(&offset) {
        Some(l) if l.len == len && l.resource_id == resource_id => Ok(()),
        Some(l) => Err(Refusal::invalid(format!(
            "live placement at {offset:#x} is resource {} (+{:#x})",
            l.resource_id, l.len
        ))),
        None => Err(Refusal::invalid("no live placement there")),
    }
}

/// Drops the live placement at `offset` from the tables (its range is already background).
fn forget_live(st: &mut State, offset: u64) {
    if let Some(l) = st.live.remove(&offset) {
        st.by_resource.remove(&l.resource_id);
        st.placed_bytes = st.placed_bytes.saturating_sub(l.len);
    }
}

/// A window restore that failed, as the unmap's refusal.
fn restore_refused(e: hostmem_base::Error) -> Refusal {
    Refusal::unspec(format!("restore: {e}"))
}

impl Faults {
    #[cfg(feature = "fault-injection")]
    fn is_set(&self) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    #[cfg(not(feature = "fault-injection"))]
    fn is_set(&self) -> bool {
        false
    }

    #[cfg(feature = "fault-injection")]
    fn at(&self, point: FaultPoint, resource_id: u32) {
        if let Some(h) = &*self.0.lock().unwrap_or_else(|p| p.into_inner()) {
            h(point, resource_id);
        }
    }

    #[cfg(not(feature = "fault-injection"))]
    fn at(&self, _point: FaultPoint, _resource_id: u32) {}
}

/// The VMM's hostmem: window, VM, mode and live placements.
#[derive(Debug)]
pub struct Hostmem {
    window: Arc<Window>,
    vm: Option<Arc<Vm>>,
    window_gpa: u64,
    mode: Mode,
    limits: Limits,
    state: Mutex<State>,
    maps_ok: AtomicU64,
    unmaps_ok: AtomicU64,
    refused: AtomicU64,
    protocol_errors: AtomicU64,
    resets: AtomicU64,
    /// Memslot changes made for the window (adds and deletes), not counting other users
    /// of the VM such as the guest probe's RAM.
    slot_changes: AtomicU64,
    faults: Faults,
    /// What the device made the VMM refuse (events, protocol errors), by kind: logged the
    /// 1st, 2nd, 4th, … time, all counted ([`Hostmem::warnings`]).
    warnings: LogLimiter,
    frames: crate::display::Frames,
}

impl Hostmem {
    /// Creates the window (`size` bytes) and, with a VM in fixed mode, registers it as one
    /// memslot at `window_gpa`.
    pub fn new(
        size: u64,
        vm: Option<Arc<Vm>>,
        window_gpa: u64,
        mode: Mode,
        limits: Limits,
    ) -> anyhow::Result<Self> {
        let window = Arc::new(Window::new(size)?);
        let window_id = file_facts(window.memfd().as_fd())?.id;
        let mut slot_changes = 0;
        if let (Some(vm), Mode::Fixed) = (&vm, mode) {
            vm.set_region(WINDOW_SLOT, window_gpa, window.clone(), 0, size as usize)?;
            slot_changes = 1;
        }
        Ok(Hostmem {
            window,
            vm,
            window_gpa,
            mode,
            limits,
            state: Mutex::new(State {
                next_slot: FIRST_BLOB_SLOT,
                given: vec![Given {
                    id: window_id,
                    what: "window memfd",
                }],
                ..State::default()
            }),
            maps_ok: AtomicU64::new(0),
            unmaps_ok: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            slot_changes: AtomicU64::new(slot_changes),
            faults: Faults::default(),
            warnings: LogLimiter::new("hostmem_vmm::hostmem"),
            frames: crate::display::Frames::new(),
        })
    }

    /// Records that the VMM gives `fd`'s file to a device (`what`: "guest RAM", for logs):
    /// a placement event whose fd is that file (any fd of it: a dup, a reopen through
    /// `/proc`) is refused from then on as `InvalidParameter`. The window's memfd is recorded
    /// by [`Hostmem::new`]; whoever hands the device any other file records it before it
    /// does (the transport's guest RAM, the host-side queue driver's).
    pub fn note_given(&self, what: &'static str, fd: BorrowedFd<'_>) -> anyhow::Result<()> {
        let id = file_facts(fd)?.id;
        let mut st = self.lock();
        if !st.given.iter().any(|g| g.id == id) {
            st.given.push(Given { id, what });
        }
        Ok(())
    }

    /// What the file `(st_dev, st_ino)` is if the VMM gave it to the device
    /// ([`Hostmem::note_given`]): frames are checked against it as placements are.
    pub fn given_as(&self, id: (u64, u64)) -> Option<&'static str> {
        self.lock()
            .given
            .iter()
            .find(|g| g.id == id)
            .map(|g| g.what)
    }

    /// The frames the device sent ([`crate::display::Frames`]): kept here so that every
    /// device of this window (restarts too) feeds the same display.
    pub fn frames(&self) -> &crate::display::Frames {
        &self.frames
    }

    /// How many files are recorded as given to the device ([`Hostmem::note_given`]).
    pub fn given_files(&self) -> usize {
        self.lock().given.len()
    }

    /// Installs (or with `None` removes) a fault-injection hook, run at each
    /// [`FaultPoint`] of event handling. For tests: only with the cargo feature
    /// `fault-injection`.
    #[cfg(feature = "fault-injection")]
    pub fn set_fault_hook(&self, hook: Option<FaultHook>) {
        *self.faults.0.lock().unwrap_or_else(|p| p.into_inner()) = hook;
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The window.
    pub fn window(&self) -> &Arc<Window> {
        &self.window
    }

    /// The VM, if KVM is in use.
    pub fn vm(&self) -> Option<&Arc<Vm>> {
        self.vm.as_ref()
    }

    /// Mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Guest physical address of the window.
    pub fn window_gpa(&self) -> u64 {
        self.window_gpa
    }

    /// Live placements now.
    pub fn live(&self) -> usize {
        self.lock().live.len()
    }

    /// Most live placements seen at once.
    pub fn max_live_seen(&self) -> usize {
        self.lock().max_live_seen
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Bytes of live placements now, at most so far, and maps refused at
    /// [`Limits::max_placed_bytes`].
    pub fn placed_bytes(&self) -> (u64, u64, u64) {
        let st = self.lock();
        (
            st.placed_bytes,
            st.placed_bytes_max,
            st.placed_bytes_refused,
        )
    }

    /// `(offset, len)` of every live placement.
    pub fn live_ranges(&self) -> Vec<(u64, u64)> {
        self.lock().live.iter().map(|(o, l)| (*o, l.len)).collect()
    }

    /// Checks the VMM's view against the kernel's: the window's mappings in
    /// `/proc/self/maps` are exactly the window's placement table
    /// ([`Window::audit`](hostmem_base::window::Window::audit)), and that table is this
    /// table (fixed mode) or empty (per-blob-slot mode, where blobs live outside the window).
    pub fn audit(&self) -> anyhow::Result<()> {
        // Under our lock, which every placement and restore holds across the window's
        // change and our table's, so the three views are read at one moment.
        let st = self.lock();
        self.window.audit()?;
        let mut ours: Vec<(u64, u64)> = match self.mode {
            Mode::PerBlobSlot => vec![],
            Mode::Fixed => st.live.iter().map(|(o, l)| (*o, l.len)).collect(),
        };
        let mut window: Vec<(u64, u64)> = self
            .window
            .placements()
            .iter()
            .map(|p| (p.offset, p.len))
            .collect();
        ours.sort_unstable();
        window.sort_unstable();
        anyhow::ensure!(
            ours == window,
            "the VMM's placement table {ours:x?} is not the window's {window:x?}"
        );
        Ok(())
    }

    /// The counters.
    pub fn counters(&self) -> Counters {
        Counters {
            maps_ok: self.maps_ok.load(Ordering::Relaxed),
            unmaps_ok: self.unmaps_ok.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            protocol_errors: self.protocol_errors.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
        }
    }

    /// Records a protocol error (a message that is not a valid event).
    pub fn note_protocol_error(&self) {
        self.protocol_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Logs a warning the device caused, rate-limited per `kind` (1st, 2nd, 4th, …) and
    /// counted ([`Hostmem::warnings`]). Everything the device can repeat at will goes here.
    pub fn warn(&self, kind: &'static str, what: std::fmt::Arguments<'_>) -> bool {
        self.warnings.warn(kind, what)
    }

    /// [`Hostmem::warn`] at INFO, for what the guest may report once but also without end.
    pub fn info(&self, kind: &'static str, what: std::fmt::Arguments<'_>) -> bool {
        self.warnings.log(log::Level::Info, kind, what)
    }

    /// Every warning the device caused so far, by kind (logged or not).
    pub fn warnings(&self) -> std::collections::BTreeMap<String, u64> {
        self.warnings.counts()
    }

    /// Memslot changes made for the window so far (0 without KVM): 1 in fixed mode for the
    /// whole run, two per blob in per-blob-slot mode.
    pub fn memslot_changes(&self) -> u64 {
        self.slot_changes.load(Ordering::Relaxed)
    }

    /// Every check of invariant 1 on a placement event, before any syscall: alignment,
    /// range (checked arithmetic), overlap, protection, the fd's kind, size and seals, the
    /// live-placement limit, and that the resource id is not live already.
    pub fn check_map(&self, ev: &MapEvent, facts: &FileFacts) -> Result<Prot, Refusal> {
        let st = self.lock();
        check_map_in(&st, &self.limits, self.window.size(), ev, facts)
    }

    /// Handles a placement event: checks it, then repeats the placement (MAP_FIXED in fixed
    /// mode, a new memslot in per-blob-slot mode). The fd is dropped (closed) either way.
    pub fn handle_map(&self, ev: &MapEvent, fd: Option<OwnedFd>) -> Outcome {
        self.faults.at(FaultPoint::MapReceived, ev.resource_id);
        let res = self.try_map(ev, fd);
        if res.is_ok() {
            self.faults.at(FaultPoint::MapPlaced, ev.resource_id);
        }
        self.finish(res, &self.maps_ok, "map", ev.resource_id, ev.offset, ev.len)
    }

    fn finish(
        &self,
        res: Result<(), Refusal>,
        ok: &AtomicU64,
        what: &str,
        resource_id: u32,
        offset: u64,
        len: u64,
    ) -> Outcome {
        match res {
            Ok(()) => {
                ok.fetch_add(1, Ordering::Relaxed);
                Outcome::Ok
            }
            Err(r) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                let kind = match (what, r.code) {
                    ("map", RefuseCode::InvalidParameter) => "map refused: invalid parameter",
                    ("map", RefuseCode::OutOfMemory) => "map refused: out of memory",
                    ("map", _) => "map refused: other",
                    (_, RefuseCode::InvalidParameter) => "unmap refused: invalid parameter",
                    (_, RefuseCode::OutOfMemory) => "unmap refused: out of memory",
                    _ => "unmap refused: other",
                };
                self.warnings.warn(
                    kind,
                    format_args!(
                        "refused {what} of resource {resource_id} at {offset:#x}+{len:#x}: {}",
                        r.reason
                    ),
                );
                r.outcome()
            }
        }
    }

    fn try_map(&self, ev: &MapEvent, fd: Option<OwnedFd>) -> Result<(), Refusal> {
        let fd = fd.ok_or_else(|| Refusal::invalid("placement event without an fd"))?;
        let facts = mapping_facts(fd.as_fd()).map_err(|e| Refusal::invalid(format!("fd: {e}")))?;
        let mut st = self.lock();
        let prot = match check_map_in(&st, &self.limits, self.window.size(), ev, &facts) {
            Ok(p) => p,
            Err(r) => {
                if r.code == RefuseCode::OutOfMemory && r.reason.starts_with(PLACED_BYTES) {
                    st.placed_bytes_refused += 1;
                }
                return Err(r);
            }
        };
        let slot = match (self.mode, &self.vm) {
            (Mode::Fixed, _) => {
                self.window
                    .place_known(ev.offset, ev.len, fd.as_fd(), &facts, ev.fd_offset, prot)
                    .map_err(|e| match e {
                        // A failed MAP_FIXED has had the background put back (no hole): the
                        // guest reads zeros there, as if nothing had been placed.
                        hostmem_base::Error::VmaHeadroom { .. } => Refusal::oom(e.to_string()),
                        hostmem_base::Error::MapFixed { .. } => Refusal::oom(e.to_string()),
                        _ => Refusal::invalid(e.to_string()),
                    })?;
                None
            }
            (Mode::PerBlobSlot, vm) => {
                let map = MemoryMapping::from_fd(fd.as_fd(), ev.fd_offset, ev.len as usize, prot)
                    .map_err(|e| Refusal::oom(format!("mapping blob: {e}")))?;
                let map = Arc::new(map);
                let slot = st.free_slots.pop().unwrap_or_else(|| {
                    st.next_slot += 1;
                    st.next_slot - 1
                });
                if let Some(vm) = vm {
                    let gpa = self.window_gpa + ev.offset;
                    if let Err(e) = vm.set_region(slot, gpa, map.clone(), 0, ev.len as usize) {
                        st.free_slots.push(slot);
                        return Err(Refusal::oom(format!("memslot {slot}: {e}")));
                    }
                    self.slot_changes.fetch_add(1, Ordering::Relaxed);
                }
                Some((slot, map))
            }
        };
        st.by_resource.insert(ev.resource_id, ev.offset);
        st.live.insert(
            ev.offset,
            Live {
                resource_id: ev.resource_id,
                len: ev.len,
                slot,
            },
        );
        st.max_live_seen = st.max_live_seen.max(st.live.len());
        st.placed_bytes = st.placed_bytes.saturating_add(ev.len);
        st.placed_bytes_max = st.placed_bytes_max.max(st.placed_bytes);
        Ok(())
    }

    /// Handles an unmap event: the range must be exactly a live placement of that resource
    /// (same offset, length and resource id). The background is back in the VMM's window (or
    /// the blob's memslot is gone) before this returns, i.e. before the guest's command can
    /// complete.
    pub fn handle_unmap(&self, resource_id: u32, offset: u64, len: u64) -> Outcome {
        self.faults.at(FaultPoint::UnmapReceived, resource_id);
        let res = self.try_unmap(resource_id, offset, len);
        if res.is_ok() {
            self.faults.at(FaultPoint::UnmapDone, resource_id);
        }
        self.finish(res, &self.unmaps_ok, "unmap", resource_id, offset, len)
    }

    /// Several unmaps that arrived together (a run of Unmap events in one batch), each
    /// `(resource_id, offset, len)`: one outcome each, in order, exactly as
    /// [`Hostmem::handle_unmap`] would give them one by one, but in fixed mode the accepted
    /// ones go back to background together ([`Window::restore_many`]: one MAP_FIXED for
    /// ranges with nothing else live between them). The per-event path is kept for the
    /// per-blob-slot mode, a single event and a set fault hook (tests stop at each event).
    pub fn handle_unmaps(&self, reqs: &[(u32, u64, u64)]) -> Vec<Outcome> {
        if reqs.len() < 2 || self.mode != Mode::Fixed || self.faults.is_set() {
            return reqs
                .iter()
                .map(|&(r, o, l)| self.handle_unmap(r, o, l))
                .collect();
        }
        let mut res: Vec<Result<(), Refusal>> = Vec::with_capacity(reqs.len());
        let mut st = self.lock();
        let mut ranges = Vec::new();
        let mut which = Vec::new();
        for (i, &(resource_id, offset, len)) in reqs.iter().enumerate() {
            // Named twice: the second finds nothing there, as it would one by one.
            let check = if ranges.iter().any(|&(o, _)| o == offset) {
                Err(Refusal::invalid("no live placement there"))
            } else {
                check_unmap(&st, resource_id, offset, len)
            };
            if check.is_ok() {
                ranges.push((offset, len));
                which.push(i);
            }
            res.push(check);
        }
        for (i, r) in which.into_iter().zip(self.window.restore_many(&ranges)) {
            res[i] = match r {
                Ok(_) => {
                    forget_live(&mut st, reqs[i].1);
                    Ok(())
                }
                Err(e) => Err(restore_refused(e)),
            };
        }
        drop(st);
        reqs.iter()
            .zip(res)
            .map(|(&(resource_id, offset, len), r)| {
                self.finish(r, &self.unmaps_ok, "unmap", resource_id, offset, len)
            })
            .collect()
    }

    fn try_unmap(&self, resource_id: u32, offset: u64, len: u64) -> Result<(), Refusal> {
        let mut st = self.lock();
        check_unmap(&st, resource_id, offset, len)?;
        self.remove_live(&mut st, offset)
    }

    fn remove_live(&self, st: &mut State, offset: u64) -> Result<(), Refusal> {
        let Some(live) = st.live.get(&offset) else {
            return Err(Refusal::invalid("no live placement there"));
        };
        match &live.slot {
            None => {
                self.window
                    .restore(offset, live.len)
                    .map_err(restore_refused)?;
            }
            Some((slot, _)) => {
                if let Some(vm) = &self.vm {
                    vm.remove_region(*slot)
                        .map_err(|e| Refusal::unspec(format!("memslot {slot} delete: {e}")))?;
                    self.slot_changes.fetch_add(1, Ordering::Relaxed);
                }
                st.free_slots.push(*slot);
            }
        }
        forget_live(st, offset);
        Ok(())
    }

    /// After a device death: every placement goes (window restored to background in one
    /// MAP_FIXED, per-blob memslots deleted). Returns how many
    /// placements were live.
    pub fn reset(&self) -> anyhow::Result<usize> {
        let mut st = self.lock();
        let n = st.live.len();
        let offsets: Vec<u64> = st.live.keys().copied().collect();
        for off in offsets {
            if let Some(Live {
                slot: Some((slot, _)),
                ..
            }) = st.live.get(&off)
            {
                let slot = *slot;
                if let Some(vm) = &self.vm {
                    vm.remove_region(slot)?;
                    self.slot_changes.fetch_add(1, Ordering::Relaxed);
                }
                st.free_slots.push(slot);
                st.live.remove(&off);
            }
        }
        st.live.clear();
        st.by_resource.clear();
        st.placed_bytes = 0;
        // Still under our lock, so that an audit never sees the table emptied before the
        // window is.
        self.window.restore_all()?;
        drop(st);
        self.resets.fetch_add(1, Ordering::Relaxed);
        Ok(n)
    }
}

fn check_map_in(
    st: &State,
    limits: &Limits,
    window_size: u64,
    ev: &MapEvent,
    facts: &FileFacts,
) -> Result<Prot, Refusal> {
    if ev.len == 0 {
        return Err(Refusal::invalid("zero length"));
    }
    for (what, v) in [
        ("offset", ev.offset),
        ("length", ev.len),
        ("fd offset", ev.fd_offset),
    ] {
        if !is_page_aligned(v) {
            return Err(Refusal::invalid(format!("{what} {v:#x} not page-aligned")));
        }
    }
    check_range(ev.offset, ev.len, window_size).map_err(|e| Refusal::invalid(e.to_string()))?;
    let end = ev.offset + ev.len;
    if let Some((o, l)) = st.live.range(..end).next_back() {
        if o + l.len > ev.offset {
            return Err(Refusal::invalid(format!(
                "overlaps live placement {o:#x}+{:#x} (resource {})",
                l.len, l.resource_id
            )));
        }
    }
    let prot = Prot::from_bits(ev.prot).map_err(|e| Refusal::invalid(e.to_string()))?;
    // The guest may write anywhere in the window (it is one read/write memslot): a guest
    // write to a read-only host mapping makes KVM_RUN fail with EFAULT. So only read/write
    // placements are accepted, in either mode (no memslot is ever KVM_MEM_READONLY).
    if prot != Prot::READ_WRITE {
        return Err(Refusal::invalid(format!(
            "protection {:#x}: only READ|WRITE placements (a guest write to a read-only \
             one would fail KVM_RUN with EFAULT)",
            ev.prot
        )));
    }
    if !facts.is_regular() {
        return Err(Refusal::invalid(format!(
            "fd is not a regular mappable file (mode {:#o})",
            facts.mode
        )));
    }
    // How the fd was opened (read-only, O_PATH) or where it lives (hugetlbfs) would make
    // the MAP_FIXED fail: refuse it here, named, rather than as out of memory.
    if let Some(why) = facts.mapping_refusal(prot) {
        return Err(Refusal::invalid(why));
    }
    // An fd the VMM handed the device (guest RAM, the window itself) would alias that memory
    // in the window: guest RAM at a blob's address, or the window's background through a
    // placement no restore zeroes.
    if let Some(g) = st.given.iter().find(|g| g.id == facts.id) {
        return Err(Refusal::invalid(format!(
            "fd is the VMM's own {} (st_dev {:#x}, st_ino {}): no fd the VMM gave the \
             device is accepted back as a blob",
            g.what, facts.id.0, facts.id.1
        )));
    }
    let need = ev
        .fd_offset
        .checked_add(ev.len)
        .ok_or_else(|| Refusal::invalid("fd offset + length overflows"))?;
    if facts.size < need {
        return Err(Refusal::invalid(format!(
            "fd holds {} bytes, placement needs {need}",
            facts.size
        )));
    }
    // A file that can shrink could turn a guest access into SIGBUS in the VMM: refuse it.
    if facts.seals.is_none_or(|s| s & libc::F_SEAL_SHRINK == 0) {
        return Err(Refusal::invalid(
            "fd is not sealed against shrinking (F_SEAL_SHRINK)",
        ));
    }
    // A write-sealed file cannot be mapped read/write shared (EPERM): refuse it here, as
    // an invalid parameter, rather than as a failed MAP_FIXED.
    if facts.write_sealed() {
        return Err(Refusal::invalid(format!(
            "fd is sealed against writes (seals {:#x})",
            facts.seals.unwrap_or(0)
        )));
    }
    let placed = st.placed_bytes.saturating_add(ev.len);
    if placed > limits.max_placed_bytes {
        return Err(Refusal::oom(format!(
            "{PLACED_BYTES}: {} live + {} > {}",
            st.placed_bytes, ev.len, limits.max_placed_bytes
        )));
    }
    if st.live.len() >= limits.max_live {
        return Err(Refusal::oom(format!(
            "{} live placements is the limit",
            limits.max_live
        )));
    }
    // A device maps a resource once at a time (MAP_BLOB of a mapped blob is an error): a
    // second placement under a live id would let unmaps of "that resource" become ambiguous.
    if let Some(o) = st.by_resource.get(&ev.resource_id) {
        return Err(Refusal::invalid(format!(
            "resource {} is already placed at {o:#x}",
            ev.resource_id
        )));
    }
    Ok(prot)
}
