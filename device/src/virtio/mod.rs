//! The device's virtio core: split virtqueues in guest RAM, served on `vm-memory` +
//! `virtio-queue`.
//!
//! The VMM's virtio-pci transport hands the device what a vhost-user frontend would
//! (transport tube, see `hostmem_ipc::protocol`): guest RAM as memfds ([`guest_memory`]),
//! and per enabled queue its ring addresses, a kick eventfd (KVM_IOEVENTFD on the notify
//! address) and a call eventfd (KVM_IRQFD). [`VirtioGpu`] owns the [`Gpu`] command handler,
//! the guest memory and the two queues:
//!
//! * **controlq (0)**: every available chain is walked descriptor by descriptor
//!   ([`read_chain`]): the device-readable part is copied out (at most [`MAX_REQUEST`]
//!   bytes) and handed to [`Gpu::submit`] with a token naming queue, head and reset
//!   generation ([`token`]); when [`Gpu::take_ready`] yields the response, it is written
//!   into the chain's device-writable part and the head goes to the used ring. Responses
//!   keep command order (the handler's pipeline guarantees it); MAP/UNMAP placements stay
//!   in flight while the device goes on serving, exactly as the old control-queue loop did.
//! * **cursorq (1)**: every chain is walked like a control chain (at most
//!   [`MAX_CURSOR_REQUEST`] readable bytes), its command (`UPDATE_CURSOR`, `MOVE_CURSOR`)
//!   handed to [`Gpu::cursor`], and the chain returned used with length 0 at once: cursor
//!   commands have no response. A refused chain is counted and returned the same way.
//!
//! After a batch of used entries the call eventfd is signalled only when the driver wants
//! it: `needs_notification` (event index) or, without event index, the avail ring's
//! `VRING_AVAIL_F_NO_INTERRUPT` flag (which virtio-queue 0.18 does not look at). Counted
//! as `interrupts` / `suppressed` in [`QueueStats`].
//!
//! # The guest is untrusted (invariant 8 in docs/invariants.md)
//!
//! Nothing in the rings is believed: the descriptor walk counts descriptors (a loop or a
//! chain longer than the queue is refused), checks `next` indices, refuses indirect
//! descriptors (not offered), sums lengths with checked arithmetic, checks every buffer
//! lies in guest RAM (the hostmem window is not guest RAM here, so a GPA inside it is
//! refused too), refuses readable descriptors after writable ones and requests over
//! [`MAX_REQUEST`]. Queue setups are checked (size a power of two ≤ [`QUEUE_MAX_SIZE`],
//! ring alignment, rings inside RAM and not overlapping each other). A head index that
//! is already in flight is dropped (it would be answered twice).
//!
//! A refused chain gets an error response (`ERR_UNSPEC`, or `ERR_INVALID_PARAMETER` for a
//! buffer outside RAM or a request too large) when its writable part holds a 24-byte
//! header, otherwise it is returned used with length 0; a head that cannot be returned
//! (out of range, already in flight) is dropped. Each kind of refusal is logged the 1st,
//! 2nd, 4th, 8th... time ([`LogLimiter`]), so a flood cannot fill the log.
//!
//! # Responses larger than the writable part
//!
//! Before a command runs, its writable part must hold the response's fixed part (24 bytes;
//! 32 for `RESOURCE_MAP_BLOB`, 40 for `GET_CAPSET_INFO` and `RESOURCE_ASSIGN_UUID`, 408 for
//! `GET_DISPLAY_INFO`, 1056 for `GET_EDID`), otherwise it is not run and gets
//! `ERR_UNSPEC` (or nothing, below 24 bytes). An `OK_NODATA` response longer than the
//! writable part (hostmem's `SUBMIT_3D` reply bytes) is cut to fit: a plain driver reads
//! the header only. Any other response that does not fit (a capset larger than the buffer)
//! is replaced by `ERR_UNSPEC`.
//!
//! # Lifecycle
//!
//! Guest memory can be replaced only while no queue is enabled (the transport sends it
//! before the driver enables queues, and again after each reset); a queue can be enabled
//! once per reset. [`VirtioGpu::reset`] settles the pipeline, unmaps every blob through
//! the placer, drops contexts, blobs, queues and guest memory, and starts a new token
//! generation, so nothing from before the reset can reach the new rings.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use hostmem_base::mmap::is_page_aligned;
use hostmem_ipc::protocol::{GuestRegion, QueueSetup, QueueStats};
use virtio_queue::{Queue, QueueT};
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

use crate::gpu::{Gpu, Placer};
use crate::wire::{CtrlHdr, SUBMIT_3D_SIZE};
use crate::{Error, Result};

mod chain;
mod queue;
mod used;

pub use chain::{min_response, read_chain, write_segments, BadChain, Chain, Refused, Segment};

/// Guest RAM as the device maps it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// The control queue's index.
pub const CONTROLQ: u16 = 0;
/// The cursor queue's index.
pub const CURSORQ: u16 = 1;
/// Queues the device has.
pub const NUM_QUEUES: usize = 2;
/// Largest queue size the device accepts (the transport's `queue_size` maximum).
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Most guest RAM regions (each travels with its fd; a tube message holds 4 fds).
pub const MAX_REGIONS: usize = 4;
/// Largest device-readable part of a control chain: a `SUBMIT_3D` with a 1 MiB command
/// stream. (`RESOURCE_CREATE_BLOB` with the handler's 16384 mem entries needs 256 KiB.)
pub const MAX_REQUEST: usize = (1 << 20) + SUBMIT_3D_SIZE;

/// Largest device-readable part of a cursor chain (`struct virtio_gpu_update_cursor` is 56
/// bytes; the rest of a longer chain is not read).
pub const MAX_CURSOR_REQUEST: usize = 4096;

/// Rounds of "take every chain, re-enable notifications, look again" per kick.
pub const MAX_ROUNDS: usize = 16;

/// `VRING_AVAIL_F_NO_INTERRUPT`: the driver does not want used-buffer notifications.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Size of one split-ring descriptor.
const DESC_SIZE: u64 = 16;

/// Maps guest RAM from the transport's regions and their fds (same order).
///
/// Refuses: no region or more than [`MAX_REGIONS`], a fd count that differs, a size of
/// zero, a GPA, size or fd offset that is not page-aligned, `gpa + size` or
/// `fd_offset + size` overflowing, overlapping regions, and a fd shorter than
/// `fd_offset + size` (mapping past its end would fault on access).
pub fn guest_memory(regions: &[GuestRegion], fds: Vec<OwnedFd>) -> Result<GuestMemoryMmap> {
    let bad = |why: String| Error::GuestMemory(why);
    if regions.is_empty() || regions.len() > MAX_REGIONS {
        return Err(bad(format!(
            "{} regions (1 to {MAX_REGIONS})",
            regions.len()
        )));
    }
    if fds.len() != regions.len() {
        return Err(bad(format!(
            "{} regions but {} fds",
            regions.len(),
            fds.len()
        )));
    }
    let mut sorted: Vec<(GuestRegion, OwnedFd)> = regions.iter().copied().zip(fds).collect();
    sorted.sort_by_key(|(r, _)| r.gpa);
    let mut prev_end: Option<u64> = None;
    let mut built = Vec::with_capacity(sorted.len());
    for (r, fd) in sorted {
        let GuestRegion {
            gpa,
            size,
            fd_offset,
        } = r;
        if size == 0 || !is_page_aligned(size) || !is_page_aligned(gpa) {
            return Err(bad(format!(
                "region {gpa:#x}+{size:#x}: must be non-empty and page-aligned"
            )));
        }
        if !is_page_aligned(fd_offset) {
            return Err(bad(format!(
                "region {gpa:#x}: fd offset {fd_offset:#x} is not page-aligned"
            )));
        }
        let end = gpa
            .checked_add(size)
            .ok_or_else(|| bad(format!("region {gpa:#x}+{size:#x} overflows")))?;
        if let Some(pe) = prev_end {
            if gpa < pe {
                return Err(bad(format!(
                    "region {gpa:#x}+{size:#x} overlaps the one ending at {pe:#x}"
                )));
            }
        }
        prev_end = Some(end);
        let need = fd_offset
            .checked_add(size)
            .ok_or_else(|| bad(format!("region {gpa:#x}: fd offset + size overflows")))?;
        let file = File::from(fd);
        let have = file
            .metadata()
            .map_err(|e| bad(format!("region {gpa:#x}: fstat: {e}")))?
            .len();
        if have < need {
            return Err(bad(format!(
                "region {gpa:#x}: fd holds {have:#x} bytes, needs {need:#x}"
            )));
        }
        let len = usize::try_from(size)
            .map_err(|_| bad(format!("region {gpa:#x}: size {size:#x} too large")))?;
        let mapping = MmapRegion::from_file(FileOffset::new(file, fd_offset), len)
            .map_err(|e| bad(format!("region {gpa:#x}: mmap: {e}")))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(gpa))
            .ok_or_else(|| bad(format!("region {gpa:#x}+{size:#x} overflows")))?;
        built.push(region);
    }
    GuestMemoryMmap::from_regions(built).map_err(|e| bad(e.to_string()))
}

/// The token of a control chain in flight: reset generation, queue and head index, so that
/// a head can be in flight once and a response from before a reset is recognised.
pub fn token(generation: u32, queue: u16, head: u16) -> u64 {
    (u64::from(generation) << 32) | (u64::from(queue) << 16) | u64::from(head)
}

/// The parts of a [`token`]: `(generation, queue, head)`.
pub fn split_token(token: u64) -> (u32, u16, u16) {
    ((token >> 32) as u32, (token >> 16) as u16, token as u16)
}

pub use hostmem_base::log_limit::LogLimiter;

/// One enabled queue.
#[derive(Debug)]
struct VirtQueue {
    queue: Queue,
    kick: File,
    call: File,
    /// Heads taken from the avail ring and not returned used yet.
    heads: BTreeSet<u16>,
    /// The driver broke the avail index: the queue is ignored until reset.
    broken: bool,
    /// Used entries were added since the last notification decision.
    dirty: bool,
    /// Chains were left in the avail ring after [`MAX_ROUNDS`].
    more: bool,
}

/// A control chain whose command is in the handler.
#[derive(Debug)]
struct Pending {
    writable: Vec<Segment>,
    writable_len: usize,
    hdr: Option<CtrlHdr>,
}

/// The virtio-gpu device core: guest memory, the two split queues and the command handler.
pub struct VirtioGpu<P: Placer> {
    gpu: Gpu<P>,
    mem: Option<GuestMemoryMmap>,
    queues: [Option<VirtQueue>; NUM_QUEUES],
    pending: BTreeMap<u64, Pending>,
    generation: u32,
    stats: QueueStats,
    limiter: LogLimiter,
}

impl<P: Placer> std::fmt::Debug for VirtioGpu<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioGpu")
            .field("memory", &self.mem.is_some())
            .field("queues", &self.queues)
            .field("pending", &self.pending.len())
            .field("generation", &self.generation)
            .field("stats", &self.stats)
            .finish()
    }
}

impl<P: Placer> VirtioGpu<P> {
    /// A device core around `gpu`, with no memory and no queue yet.
    pub fn new(gpu: Gpu<P>) -> Self {
        VirtioGpu {
            gpu,
            mem: None,
            queues: [None, None],
            pending: BTreeMap::new(),
            generation: 0,
            stats: QueueStats::default(),
            limiter: LogLimiter::new("hostmem_device::virtio"),
        }
    }

    /// The command handler.
    pub fn gpu(&self) -> &Gpu<P> {
        &self.gpu
    }

    /// The command handler, mutably.
    pub fn gpu_mut(&mut self) -> &mut Gpu<P> {
        &mut self.gpu
    }

    /// The counters since the device started (a reset keeps them).
    pub fn stats(&self) -> QueueStats {
        let mut s = self.stats.clone();
        let blobs = self.gpu.blob_memory();
        s.blob_budget = blobs.budget.unwrap_or(0);
        s.blob_bytes_max = blobs.bytes_max;
        s.blob_budget_refusals = blobs.refused;
        s.warnings = self.limiter.counts();
        for l in [
            &crate::gpu::COMMAND_WARNINGS,
            &crate::process::TRANSPORT_WARNINGS,
        ] {
            hostmem_base::log_limit::merge_counts(&mut s.warnings, &l.counts());
        }
        s
    }

    /// The guest memory, once the transport sent it.
    pub fn memory(&self) -> Option<&GuestMemoryMmap> {
        self.mem.as_ref()
    }

    /// How many chains of kind `kind` were refused so far.
    pub fn refused(&self, kind: BadChain) -> u64 {
        self.limiter.count(kind.describe())
    }

    /// Control chains whose response is not in the used ring yet.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Placements in flight in the handler's pipeline.
    pub fn in_flight(&self) -> usize {
        self.gpu.in_flight()
    }

    /// True when queue `index` is enabled.
    pub fn queue_enabled(&self, index: u16) -> bool {
        matches!(self.queues.get(usize::from(index)), Some(Some(_)))
    }

    /// Takes guest RAM. Refused while a queue is enabled (their rings and in-flight chains
    /// live in the old memory): the transport sends memory before queues, and after a
    /// reset.
    pub fn set_memory(&mut self, mem: GuestMemoryMmap) -> Result<()> {
        if self.queues.iter().any(Option::is_some) {
            return Err(Error::GuestMemory(
                "queues are enabled: reset the device before replacing guest memory".into(),
            ));
        }
        self.gpu.set_guest_memory(Some(mem.clone()));
        self.mem = Some(mem);
        Ok(())
    }

    /// Enables queue `setup.index` with its kick and call eventfds. Refused (and nothing
    /// kept) for an unknown index, a queue already enabled, no guest memory yet, a size that
    /// is zero, not a power of two or over [`QUEUE_MAX_SIZE`], misaligned rings, rings
    /// outside guest RAM or overlapping each other.
    pub fn enable_queue(&mut self, setup: &QueueSetup, kick: OwnedFd, call: OwnedFd) -> Result<()> {
        let index = setup.index;
        let bad = |reason: String| Error::QueueSetup { index, reason };
        let slot = usize::from(index);
        if slot >= NUM_QUEUES {
            return Err(bad(format!("no such queue (the device has {NUM_QUEUES})")));
        }
        if self.queue_enabled(index) {
            return Err(bad("already enabled (reset the device first)".into()));
        }
        let Some(mem) = self.mem.as_ref() else {
            return Err(bad("no guest memory yet".into()));
        };
        let mut q = Queue::new(QUEUE_MAX_SIZE)
            .map_err(|e| bad(format!("queue of {QUEUE_MAX_SIZE}: {e}")))?;
        q.try_set_size(setup.size).map_err(|e| {
            bad(format!(
                "size {}: {e} (a power of two, 1 to {QUEUE_MAX_SIZE})",
                setup.size
            ))
        })?;
        q.try_set_desc_table_address(GuestAddress(setup.desc))
            .map_err(|e| bad(format!("descriptor table {:#x}: {e}", setup.desc)))?;
        q.try_set_avail_ring_address(GuestAddress(setup.avail))
            .map_err(|e| bad(format!("avail ring {:#x}: {e}", setup.avail)))?;
        q.try_set_used_ring_address(GuestAddress(setup.used))
            .map_err(|e| bad(format!("used ring {:#x}: {e}", setup.used)))?;
        q.set_event_idx(setup.event_idx);
        rings_disjoint(setup).map_err(bad)?;
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err(bad(format!(
                "rings outside guest RAM (desc {:#x}, avail {:#x}, used {:#x}, size {})",
                setup.desc, setup.avail, setup.used, setup.size
            )));
        }
        if let Some(s) = self.queues.get_mut(slot) {
            *s = Some(VirtQueue {
                queue: q,
                kick: File::from(kick),
                call: File::from(call),
                heads: BTreeSet::new(),
                broken: false,
                dirty: false,
                more: false,
            });
        }
        log::info!(
            "queue {index} enabled: size {}, desc {:#x}, avail {:#x}, used {:#x}, event_idx {}",
            setup.size,
            setup.desc,
            setup.avail,
            setup.used,
            setup.event_idx
        );
        Ok(())
    }

    /// Replaces the call eventfd of enabled queue `index` (a vhost-user frontend sends a new
    /// one when it masks or unmasks the queue's interrupt). Refused for a disabled queue.
    pub fn set_call(&mut self, index: u16, call: OwnedFd) -> Result<()> {
        match self.queues.get_mut(usize::from(index)) {
            Some(Some(q)) => {
                q.call = File::from(call);
                Ok(())
            }
            _ => Err(Error::QueueSetup {
                index,
                reason: "not enabled".into(),
            }),
        }
    }

    /// The next avail index queue `index` will read (`None` when it is not enabled): what a
    /// vhost-user backend answers to `GET_VRING_BASE`.
    pub fn next_avail(&self, index: u16) -> Option<u16> {
        match self.queues.get(usize::from(index)) {
            Some(Some(q)) => Some(q.queue.next_avail()),
            _ => None,
        }
    }

    /// The kick eventfds of the enabled queues, to poll.
    pub fn kick_fds(&self) -> Vec<(u16, BorrowedFd<'_>)> {
        self.queues
            .iter()
            .enumerate()
            .filter_map(|(i, q)| Some((i as u16, q.as_ref()?.kick.as_fd())))
            .collect()
    }

    /// Waits up to `timeout` for `other` (the transport) or a kick eventfd to be readable:
    /// whether `other` is, and the queues kicked. `Ok(None)` when a signal cut the wait
    /// short (EINTR): the caller loops.
    pub fn wait(
        &self,
        other: BorrowedFd<'_>,
        timeout: nix::poll::PollTimeout,
    ) -> std::result::Result<Option<(bool, Vec<u16>)>, nix::errno::Errno> {
        use nix::poll::{poll, PollFd, PollFlags};
        let kicks = self.kick_fds();
        let mut fds = vec![PollFd::new(other, PollFlags::POLLIN)];
        fds.extend(
            kicks
                .iter()
                .map(|(_, fd)| PollFd::new(*fd, PollFlags::POLLIN)),
        );
        // Parked fences wake the loop too (it then calls poll_fences); without an fd to
        // wait on, they are polled every millisecond.
        let fences = self.gpu.fence_fds();
        let timeout = if self.gpu.parked() > 0 && fences.is_empty() {
            timeout.min(nix::poll::PollTimeout::from(1u8))
        } else {
            timeout
        };
        fds.extend(fences.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)));
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(None),
            Err(e) => return Err(e),
        }
        let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
        let other_ready = fds.first().is_some_and(ready);
        let kicked = kicks
            .iter()
            .zip(fds.iter().skip(1))
            .filter(|(_, f)| ready(f))
            .map(|((i, _), _)| *i)
            .collect();
        Ok(Some((other_ready, kicked)))
    }

    /// Device reset: settles the pipeline, drops every response not delivered, unmaps every
    /// blob through the placer, unrefs blobs, destroys contexts ([`Gpu::reset_all`]), drops
    /// the queues and starts a new token generation. Guest memory stays: it belongs to the
    /// VM, not to the device's state (as a vhost-user backend keeps its memory table across
    /// a reset), so the driver can enable queues again at once.
    pub fn reset(&mut self) {
        let sum = self.gpu.reset_all();
        let undelivered = self.pending.len();
        self.pending.clear();
        self.queues = [None, None];
        self.generation = self.generation.wrapping_add(1);
        log::info!(
            "virtio reset: {undelivered} chains not answered, {} placements undone",
            sum.unmapped
        );
    }
}

/// Checks the three rings of `setup` do not overlap (checked arithmetic).
fn rings_disjoint(setup: &QueueSetup) -> std::result::Result<(), String> {
    let n = u64::from(setup.size);
    let areas = [
        ("descriptor table", setup.desc, DESC_SIZE * n),
        ("avail ring", setup.avail, 6 + 2 * n),
        ("used ring", setup.used, 6 + 8 * n),
    ];
    let mut ends = [0u64; 3];
    for (i, (what, start, len)) in areas.iter().enumerate() {
        let end = start
            .checked_add(*len)
            .ok_or_else(|| format!("{what} at {start:#x} overflows"))?;
        if let Some(e) = ends.get_mut(i) {
            *e = end;
        }
    }
    for i in 0..areas.len() {
        for j in i + 1..areas.len() {
            let (Some(a), Some(b), Some(ea), Some(eb)) =
                (areas.get(i), areas.get(j), ends.get(i), ends.get(j))
            else {
                continue;
            };
            if a.1 < *eb && b.1 < *ea {
                return Err(format!(
                    "{} {:#x}..{ea:#x} overlaps {} {:#x}..{eb:#x}",
                    a.0, a.1, b.0, b.1
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip() {
        let t = token(7, 1, 255);
        assert_eq!(split_token(t), (7, 1, 255));
        assert_ne!(token(0, 0, 3), token(1, 0, 3));
    }

    #[test]
    fn overlapping_rings_are_refused() {
        let ok = QueueSetup {
            index: 0,
            size: 16,
            desc: 0x1000,
            avail: 0x2000,
            used: 0x3000,
            event_idx: false,
        };
        assert!(rings_disjoint(&ok).is_ok());
        // desc table is 256 bytes: an avail ring inside it overlaps.
        let bad = QueueSetup {
            avail: 0x1080,
            ..ok
        };
        assert!(rings_disjoint(&bad).unwrap_err().contains("overlaps"));
        let bad = QueueSetup { used: 0x2004, ..ok };
        assert!(rings_disjoint(&bad).is_err());
        let wrap = QueueSetup {
            used: u64::MAX - 8,
            ..ok
        };
        assert!(rings_disjoint(&wrap).unwrap_err().contains("overflows"));
    }
}
