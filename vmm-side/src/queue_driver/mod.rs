//! A virtio-gpu driver that runs in the **host**, for tests and the bench. `hostmem run`
//! does not use it: there the driver runs inside the KVM guest and talks to the device
//! through the VMM's virtio-pci transport.
//!
//! [`QueueDriver`] plays guest and transport at once, against a real device process: it
//! owns a small "guest RAM" (a sealed memfd, mapped here with `vm-memory`), lays out the
//! split virtqueues (controlq and cursorq, [`QUEUE_SIZE`] entries each) in it, and hands
//! the device the RAM ([`TransportMsg::GuestMemory`]) and each queue with its kick and
//! call eventfds ([`TransportMsg::QueueEnable`]) over the device's transport tube, exactly
//! as the VMM's transport does when a guest driver sets the device up. Then each command
//! becomes a descriptor chain (the request, device-readable, then a response buffer,
//! device-writable) made available and kicked; the device answers through the used ring
//! and the call eventfd. Many commands may be in flight ([`QueueDriver::submit`] then
//! [`QueueDriver::wait`]); the device may complete them in any order.
//!
//! Waiting polls the used ring for [`REPLY_SPIN`] (for a lone command:
//! [`QueueDriver::set_lone_reply_spin`]) and then sleeps on the call eventfd (the host can
//! take the "interrupt"). A device that answers nothing within the timeout,
//! whose transport tube hangs up, or that puts a descriptor in the used ring that is not in
//! flight is lost ([`CmdError::device_lost`]); every later command fails at once.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostmem_base::shm::SharedMemory;
use hostmem_device::wire::ErrorCode;
#[cfg(feature = "trace")]
use hostmem_ipc::protocol::TraceRecord;
use hostmem_ipc::protocol::{
    monotonic_ns, GuestRegion, QueueSetup, QueueStats, TransportMsg, TransportReply,
};
use hostmem_ipc::{Tube, REPLY_SPIN};
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap};

use crate::hostmem::Hostmem;

mod commands;

/// Default time a command (or a transport message) may take before the device is declared
/// lost.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Entries per virtqueue (the transport's maximum).
pub const QUEUE_SIZE: u16 = 256;
/// The control queue's index.
pub const CONTROLQ: u16 = 0;
/// The cursor queue's index.
pub const CURSORQ: u16 = 1;
/// Largest request one command may have, in bytes.
pub const MAX_REQUEST: usize = 64 * 1024;
/// Size of each command's response buffer, in bytes.
pub const MAX_RESPONSE: usize = 64 * 1024;

/// Guest-physical address of our guest RAM's first byte.
const RAM_GPA: u64 = 0;
/// Each queue's rings: descriptors at +0, available ring at +4 KiB, used ring at +8 KiB.
const RING_STRIDE: u64 = 0x4000;
const AVAIL_OFF: u64 = 0x1000;
const USED_OFF: u64 = 0x2000;
/// Request and response buffers start here, one pair per slot.
const BUF_BASE: u64 = 0x1_0000;
const SLOT_STRIDE: u64 = (MAX_REQUEST + MAX_RESPONSE) as u64;
/// Two descriptors per command: at most this many in flight.
const SLOTS: u16 = QUEUE_SIZE / 2;
/// Guest RAM size: the rings and every slot's buffers.
const RAM_SIZE: u64 = SCRATCH_GPA + SCRATCH_SIZE;
/// Where the scratch area starts ([`QueueDriver::write_scratch`]): after every slot.
pub const SCRATCH_GPA: u64 = BUF_BASE + SLOTS as u64 * SLOT_STRIDE;
/// Bytes of guest RAM no queue or slot uses: a test's 2D backing.
pub const SCRATCH_SIZE: u64 = 1 << 20;

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// How long one sleep on the call eventfd lasts before the used ring is looked at again (a
/// device that forgets to notify still completes, only slower).
const WAKE_SLICE: Duration = Duration::from_millis(10);

/// What went wrong driving the device.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The transport tube failed (hang-up, timeout, …).
    #[error("transport tube: {0}")]
    Transport(#[from] hostmem_ipc::Error),
    /// The device refused a transport message.
    #[error("the device refused {what}: {reason}")]
    Refused {
        /// Which message.
        what: &'static str,
        /// Its reason.
        reason: String,
    },
    /// The device answered a transport message with something else.
    #[error("transport reply {got} to {what}")]
    BadReply {
        /// Which message.
        what: &'static str,
        /// The reply.
        got: String,
    },
    /// Creating or mapping guest RAM failed.
    #[error("guest RAM: {0}")]
    Memory(String),
    /// Creating, reading or polling an eventfd failed.
    #[error("eventfd: {0}")]
    EventFd(Errno),
    /// No used buffer within the timeout: the device is hung.
    #[error("timed out: no response within {0:?} (the device is hung)")]
    Timeout(Duration),
    /// The device's transport tube hung up: it is gone.
    #[error("the device hung up")]
    Hangup,
    /// The device put a descriptor in the used ring that is not a command in flight.
    #[error("used ring names descriptor {0}, which is not in flight")]
    UnknownHead(u32),
    /// The device claims to have written more than the response buffer holds.
    #[error("used length {len} exceeds the response buffer of {max} bytes")]
    UsedTooLong {
        /// The used element's length.
        len: u32,
        /// The buffer.
        max: usize,
    },
    /// The device was lost earlier; nothing is sent to it any more.
    #[error("device lost earlier: {0}")]
    Lost(String),
    /// The request does not fit in a request buffer (the caller's mistake).
    #[error("request of {len} bytes exceeds {max}")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// [`QueueDriver::wait`] for a tag that was never submitted or was already collected.
    #[error("tag {0} is not in flight")]
    NotInFlight(u64),
}

impl DriverError {
    /// True if the device must be restarted (as opposed to a mistake of the caller).
    pub fn device_lost(&self) -> bool {
        !matches!(
            self,
            DriverError::TooLarge { .. } | DriverError::NotInFlight(_)
        )
    }
}

/// A command that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CmdError {
    /// The device answered with a virtio-gpu error response.
    #[error("device answered {0}")]
    Device(ErrorCode),
    /// The queue or the transport failed: the device is gone or hung.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The response is not what the command calls for.
    #[error("bad response: {0}")]
    BadResponse(String),
}

impl CmdError {
    /// True if the device must be restarted (as opposed to a refused command).
    pub fn device_lost(&self) -> bool {
        matches!(self, CmdError::Driver(e) if e.device_lost())
    }
}

/// One split virtqueue in our guest RAM.
#[derive(Debug)]
struct Ring {
    index: u16,
    desc: u64,
    avail: u64,
    used: u64,
    /// Our next available index (free-running).
    avail_idx: u16,
    /// The used index up to which we have collected.
    last_used: u16,
    kick: EventFd,
    call: EventFd,
}

impl Ring {
    /// `used_event` (VIRTIO_RING_F_EVENT_IDX): the avail ring's last field.
    fn used_event_addr(&self) -> GuestAddress {
        GuestAddress(self.avail + 4 + 2 * u64::from(QUEUE_SIZE))
    }

    /// `avail_event` (VIRTIO_RING_F_EVENT_IDX): the used ring's last field.
    fn avail_event_addr(&self) -> GuestAddress {
        GuestAddress(self.used + 4 + 8 * u64::from(QUEUE_SIZE))
    }

    fn new(index: u16) -> Result<Ring, DriverError> {
        let base = RAM_GPA + u64::from(index) * RING_STRIDE;
        let efd = || {
            EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(DriverError::EventFd)
        };
        Ok(Ring {
            index,
            desc: base,
            avail: base + AVAIL_OFF,
            used: base + USED_OFF,
            avail_idx: 0,
            last_used: 0,
            kick: efd()?,
            call: efd()?,
        })
    }

    fn setup(&self) -> QueueSetup {
        QueueSetup {
            index: self.index,
            size: QUEUE_SIZE,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
            // VIRTIO_RING_F_EVENT_IDX: a waiter says after which completion it wants the
            // call eventfd (`used_event`), so a wait for the 16th of 16 commands in flight
            // is one wake-up, not sixteen; and the device says after which entry it wants a
            // kick (`avail_event`), so a burst is one kick. A device that takes the queue
            // must honour both.
            event_idx: true,
        }
    }
}

/// A command in flight.
#[derive(Debug, Clone, Copy)]
struct Pending {
    slot: u16,
}

/// The host-side virtio-gpu driver (see the module doc).
#[derive(Debug)]
pub struct QueueDriver {
    transport: Arc<Tube>,
    /// Our mapping of guest RAM (the memfd's mapping keeps the file).
    mem: GuestMemoryMmap,
    /// Guest RAM, kept to hand the device again after a reset.
    ram: SharedMemory,
    ctrl: Ring,
    cursor: Ring,
    timeout: Duration,
    /// How long a wait for the only command in flight polls the used ring before it
    /// sleeps on the call eventfd (with more in flight: [`REPLY_SPIN`]).
    lone_reply_spin: Duration,
    /// The same with more than one command in flight.
    multi_reply_spin: Duration,
    next_seq: u64,
    next_tag: u64,
    pending: HashMap<u64, Pending>,
    /// Descriptor head → tag.
    by_head: HashMap<u16, u64>,
    free_slots: Vec<u16>,
    done: HashMap<u64, Vec<u8>>,
    /// Why the device was declared lost.
    lost: Option<String>,
    stats: DriverStats,
    /// Tracing: kick and used-ring stamps ([`monotonic_ns`]) per tag.
    trace: bool,
    stamps: HashMap<u64, (u64, u64)>,
    last_kick: u64,
    seen_at: u64,
}

/// What the driver counted.
#[derive(Debug, Default, Clone, Copy)]
pub struct DriverStats {
    /// Commands made available.
    pub submitted: u64,
    /// Used buffers collected.
    pub completed: u64,
    /// Kicks written (only those the device's `avail_event` asked for).
    pub kicks: u64,
    /// Sleeps on the call eventfd (the spin did not see the response).
    pub sleeps: u64,
}

/// The virtio spec's `vring_need_event`: whether moving an index from `old` to `new`
/// passed `event` (all free-running u16).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl QueueDriver {
    /// A driver for the device behind `transport` (see [`crate::device::Device::transport`]):
    /// creates guest RAM and both queues and hands them to the device. The RAM is recorded
    /// with `hostmem` first ([`Hostmem::note_given`]), so that the device cannot hand it
    /// back as a blob.
    pub fn new(transport: Arc<Tube>, hostmem: &Hostmem) -> Result<QueueDriver, DriverError> {
        let ram = SharedMemory::new("hostmem-guest-ram", RAM_SIZE)
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        hostmem
            .note_given("guest RAM", ram.as_fd())
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        // The device maps it too: it must not be able to shrink it under our mapping, nor
        // add a seal (F_SEAL_SEAL).
        ram.seal_for_sharing()
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        let file = File::from(
            ram.try_clone_fd()
                .map_err(|e| DriverError::Memory(e.to_string()))?,
        );
        let size = usize::try_from(RAM_SIZE).map_err(|e| DriverError::Memory(e.to_string()))?;
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(RAM_GPA),
            size,
            Some(FileOffset::new(file, 0)),
        )])
        .map_err(|e| DriverError::Memory(e.to_string()))?;
        let mut d = QueueDriver {
            transport,
            mem,
            ram,
            ctrl: Ring::new(CONTROLQ)?,
            cursor: Ring::new(CURSORQ)?,
            timeout: COMMAND_TIMEOUT,
            lone_reply_spin: REPLY_SPIN,
            multi_reply_spin: REPLY_SPIN,
            next_seq: 1,
            next_tag: 1,
            pending: HashMap::new(),
            by_head: HashMap::new(),
            free_slots: (0..SLOTS).rev().collect(),
            done: HashMap::new(),
            lost: None,
            stats: DriverStats::default(),
            trace: false,
            stamps: HashMap::new(),
            last_kick: 0,
            seen_at: 0,
        };
        d.set_up()?;
        Ok(d)
    }

    /// Hands the device guest RAM and enables both queues (fresh rings).
    fn set_up(&mut self) -> Result<(), DriverError> {
        // Zeroed rings: idx 0, flags 0 (we want used-buffer notifications).
        let zeros = vec![0u8; (2 * RING_STRIDE) as usize];
        self.write(RAM_GPA, &zeros)?;
        let regions = vec![GuestRegion {
            gpa: RAM_GPA,
            size: RAM_SIZE,
            fd_offset: 0,
        }];
        let seq = self.seq();
        let ram_fd = self.ram.as_fd();
        let transport = self.transport.clone();
        transport_call(
            &transport,
            self.timeout,
            "GuestMemory",
            seq,
            &TransportMsg::GuestMemory { seq, regions },
            &[ram_fd],
        )?;
        for ring in [&mut self.ctrl, &mut self.cursor] {
            ring.avail_idx = 0;
            ring.last_used = 0;
        }
        for i in 0..2 {
            let seq = self.seq();
            let ring = if i == 0 { &self.ctrl } else { &self.cursor };
            let msg = TransportMsg::QueueEnable {
                seq,
                queue: ring.setup(),
            };
            transport_call(
                &transport,
                self.timeout,
                "QueueEnable",
                seq,
                &msg,
                &[ring.kick.as_fd(), ring.call.as_fd()],
            )?;
        }
        Ok(())
    }

    fn seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    /// Writes `data` at `offset` into the scratch area ([`SCRATCH_GPA`]: guest RAM no queue
    /// uses, e.g. a 2D resource's backing).
    pub fn write_scratch(&self, offset: u64, data: &[u8]) -> Result<(), DriverError> {
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|e| e > SCRATCH_SIZE) {
            return Err(DriverError::Memory(format!(
                "{} bytes at {offset:#x}: past the scratch area",
                data.len()
            )));
        }
        self.write(SCRATCH_GPA + offset, data)
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), DriverError> {
        self.mem
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| DriverError::Memory(e.to_string()))
    }

    fn lose(&mut self, e: DriverError) -> DriverError {
        if e.device_lost() && self.lost.is_none() {
            self.lost = Some(e.to_string());
        }
        e
    }

    fn check_lost(&self) -> Result<(), DriverError> {
        match &self.lost {
            Some(why) => Err(DriverError::Lost(why.clone())),
            None => Ok(()),
        }
    }

    /// Changes how long a command or transport message may take before the device is
    /// declared lost.
    pub fn set_timeout(&mut self, t: Duration) -> Result<(), DriverError> {
        self.timeout = t;
        Ok(())
    }

    /// Sets how long a wait for the only command in flight polls the used ring before it
    /// sleeps on the call eventfd ([`REPLY_SPIN`] by default; zero: sleep at once, as a
    /// halted vCPU waits for its interrupt). Waits with more in flight follow
    /// [`QueueDriver::set_multi_reply_spin`].
    pub fn set_lone_reply_spin(&mut self, t: Duration) {
        self.lone_reply_spin = t;
    }

    /// Sets how long a wait with more than one command in flight polls before it sleeps
    /// ([`REPLY_SPIN`] by default). Zero for a driver that shares its CPU with the thread
    /// that must answer (the device, or the VMM's mapping service): under EEVDF a
    /// `sched_yield` loop does not hand the CPU to a task that has run ahead of its share,
    /// so a yielding poller can keep that thread off its CPU until the next tick (decision
    /// 045). The sleep then ends with the
    /// call eventfd after the completion it waits for (`used_event`), one wake-up per wait.
    pub fn set_multi_reply_spin(&mut self, t: Duration) {
        self.multi_reply_spin = t;
    }

    /// Resets the device ([`TransportMsg::Reset`]: it drops every queue, context and blob;
    /// commands in flight are gone) and sets guest RAM and both queues up again.
    pub fn reset(&mut self) -> Result<(), DriverError> {
        self.transport_request("Reset", |seq| TransportMsg::Reset { seq })?;
        self.pending.clear();
        self.by_head.clear();
        self.done.clear();
        self.free_slots = (0..SLOTS).rev().collect();
        self.set_up().map_err(|e| self.lose(e))
    }

    /// Sends `msg(seq)` on the transport and waits for its reply; a failure loses the
    /// device.
    fn transport_request(
        &mut self,
        what: &'static str,
        msg: impl FnOnce(u64) -> TransportMsg,
    ) -> Result<TransportReply, DriverError> {
        self.check_lost()?;
        let seq = self.seq();
        let transport = self.transport.clone();
        transport_call(&transport, self.timeout, what, seq, &msg(seq), &[])
            .map_err(|e| self.lose(e))
    }

    /// The device's virtqueue counters ([`TransportMsg::Stats`]).
    pub fn device_stats(&mut self) -> Result<QueueStats, DriverError> {
        match self.transport_request("Stats", |seq| TransportMsg::Stats { seq })? {
            TransportReply::Stats { stats, .. } => Ok(stats),
            other => Err(DriverError::BadReply {
                what: "Stats",
                got: format!("{other:?}"),
            }),
        }
    }

    /// Starts (`on`, forgetting older stamps) or stops tracing, here and in the device
    /// ([`TransportMsg::Trace`]): each command's kick and used-ring stamps, each placement's
    /// device and VMM stamps (`hostmem bench`'s per-hop breakdown). Cargo feature `trace`.
    #[cfg(feature = "trace")]
    pub fn set_trace(&mut self, on: bool) -> Result<(), DriverError> {
        self.transport_request("Trace", |seq| TransportMsg::Trace { seq, on })?;
        self.trace = on;
        self.stamps.clear();
        Ok(())
    }

    /// The kick and used-ring stamps ([`monotonic_ns`]) of traced command `tag`, once it
    /// completed.
    pub fn stamps(&self, tag: u64) -> Option<(u64, u64)> {
        self.stamps.get(&tag).copied().filter(|s| s.1 != 0)
    }

    /// The device's trace records so far, oldest first ([`TransportMsg::TraceTake`] until
    /// one answers none). Cargo feature `trace`.
    #[cfg(feature = "trace")]
    pub fn take_trace(&mut self) -> Result<Vec<TraceRecord>, DriverError> {
        let mut all = Vec::new();
        loop {
            let part = self.take_trace_part()?;
            if part.is_empty() {
                return Ok(all);
            }
            all.extend(part);
        }
    }

    #[cfg(feature = "trace")]
    fn take_trace_part(&mut self) -> Result<Vec<TraceRecord>, DriverError> {
        match self.transport_request("TraceTake", |seq| TransportMsg::TraceTake { seq })? {
            TransportReply::Trace { records, .. } => Ok(records),
            other => Err(DriverError::BadReply {
                what: "TraceTake",
                got: format!("{other:?}"),
            }),
        }
    }

    /// What this driver counted.
    pub fn stats(&self) -> DriverStats {
        self.stats
    }

    /// Makes one command available on the control queue and kicks when the device asked
    /// for it (`avail_event`); returns its tag. With every slot in flight, waits for a
    /// completion first.
    pub fn submit(&mut self, cmd: &[u8]) -> Result<u64, DriverError> {
        self.check_lost()?;
        if cmd.len() > MAX_REQUEST {
            return Err(DriverError::TooLarge {
                len: cmd.len(),
                max: MAX_REQUEST,
            });
        }
        while self.free_slots.is_empty() {
            self.collect(1)?;
        }
        let slot = self.free_slots.pop().ok_or(DriverError::NotInFlight(0))?;
        let r = self.make_available(slot, cmd);
        if let Err(e) = r {
            self.free_slots.push(slot);
            return Err(self.lose(e));
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        if self.trace {
            self.stamps.insert(tag, (self.last_kick, 0));
        }
        self.pending.insert(tag, Pending { slot });
        self.by_head.insert(slot * 2, tag);
        self.stats.submitted += 1;
        Ok(tag)
    }

    fn make_available(&mut self, slot: u16, cmd: &[u8]) -> Result<(), DriverError> {
        let req = BUF_BASE + u64::from(slot) * SLOT_STRIDE;
        let resp = req + MAX_REQUEST as u64;
        self.write(req, cmd)?;
        let head = slot * 2;
        // struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; } (x86: LE).
        let mut descs = Vec::with_capacity(32);
        for (addr, len, flags, next) in [
            (req, cmd.len(), VIRTQ_DESC_F_NEXT, head + 1),
            (resp, MAX_RESPONSE, VIRTQ_DESC_F_WRITE, 0),
        ] {
            descs.extend_from_slice(&addr.to_le_bytes());
            descs.extend_from_slice(&(len as u32).to_le_bytes());
            descs.extend_from_slice(&flags.to_le_bytes());
            descs.extend_from_slice(&next.to_le_bytes());
        }
        self.write(self.ctrl.desc + u64::from(head) * 16, &descs)?;
        let pos = self.ctrl.avail_idx % QUEUE_SIZE;
        self.write(
            self.ctrl.avail + 4 + u64::from(pos) * 2,
            &head.to_le_bytes(),
        )?;
        let old = self.ctrl.avail_idx;
        self.ctrl.avail_idx = old.wrapping_add(1);
        // The ring entry and the descriptors before the index that publishes them.
        self.mem
            .store(
                self.ctrl.avail_idx,
                GuestAddress(self.ctrl.avail + 2),
                Ordering::Release,
            )
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        // The index before avail_event is read: a device that set avail_event and then
        // looked at the index has seen this entry, or we see its new avail_event.
        fence(Ordering::SeqCst);
        if self.trace {
            // "Kick" in the trace means "made available", kick sent or not.
            self.last_kick = monotonic_ns();
        }
        // VIRTIO_RING_F_EVENT_IDX (negotiated): the device asks for a kick only when the
        // index passes avail_event, as Linux's virtqueue_kick_prepare_split() reads it. A
        // device busy with earlier chains leaves it behind, so a burst costs one kick.
        let avail_event: u16 = self
            .mem
            .load(self.ctrl.avail_event_addr(), Ordering::Acquire)
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        if need_event(avail_event, self.ctrl.avail_idx, old) {
            self.ctrl.kick.write(1).map_err(DriverError::EventFd)?;
            self.stats.kicks += 1;
        }
        Ok(())
    }

    /// Collects at least one used buffer (spinning, then sleeping on the call eventfd until
    /// `want` more have been used).
    fn collect(&mut self, want: u16) -> Result<(), DriverError> {
        let r = self.collect_inner(want.max(1));
        r.map_err(|e| self.lose(e))
    }

    /// The controlq's used index, as the device last published it.
    fn used_idx(&self) -> Result<u16, DriverError> {
        self.mem
            .load(GuestAddress(self.ctrl.used + 2), Ordering::Acquire)
            .map_err(|e| DriverError::Memory(e.to_string()))
    }

    fn collect_inner(&mut self, want: u16) -> Result<(), DriverError> {
        let t0 = Instant::now();
        let deadline = t0 + self.timeout;
        loop {
            let used_idx = self.used_idx()?;
            if used_idx != self.ctrl.last_used {
                self.seen_at = if self.trace { monotonic_ns() } else { 0 };
                while self.ctrl.last_used != used_idx {
                    self.take_used()?;
                }
                return Ok(());
            }
            let now = Instant::now();
            let spin = if self.pending.len() > 1 {
                self.multi_reply_spin
            } else {
                self.lone_reply_spin
            };
            if now.duration_since(t0) < spin {
                std::thread::yield_now();
                continue;
            }
            if now >= deadline {
                return Err(DriverError::Timeout(self.timeout));
            }
            // used_event: notify once the used index passes last_used + want - 1; then look
            // once more (a completion the device published before it read used_event).
            let used_event = self.ctrl.last_used.wrapping_add(want - 1);
            self.mem
                .store(used_event, self.ctrl.used_event_addr(), Ordering::Release)
                .map_err(|e| DriverError::Memory(e.to_string()))?;
            fence(Ordering::SeqCst);
            if self.used_idx()? != self.ctrl.last_used {
                continue;
            }
            self.sleep(deadline.saturating_duration_since(now).min(WAKE_SLICE))?;
        }
    }

    /// Sleeps until the call eventfd fires, the transport tube hangs up or `t` passes.
    fn sleep(&mut self, t: Duration) -> Result<(), DriverError> {
        self.stats.sleeps += 1;
        let ms = u16::try_from(t.as_millis().max(1)).unwrap_or(u16::MAX);
        let mut fds = [
            PollFd::new(self.ctrl.call.as_fd(), PollFlags::POLLIN),
            // No events asked: only POLLHUP/POLLERR, i.e. the device's end is gone.
            PollFd::new(self.transport.as_fd(), PollFlags::empty()),
        ];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(_) | Err(Errno::EINTR) => {}
            Err(e) => return Err(DriverError::EventFd(e)),
        }
        let hup = fds[1]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR));
        // Drain the counter (non-blocking: EAGAIN when it did not fire).
        match self.ctrl.call.read() {
            Ok(_) | Err(Errno::EAGAIN) => {}
            Err(e) => return Err(DriverError::EventFd(e)),
        }
        if hup {
            // The device may have completed our command before it went: look once more.
            if self.used_idx()? == self.ctrl.last_used {
                return Err(DriverError::Hangup);
            }
        }
        Ok(())
    }

    /// Takes the used element at `last_used`: its response becomes done.
    fn take_used(&mut self) -> Result<(), DriverError> {
        let pos = self.ctrl.last_used % QUEUE_SIZE;
        // struct virtq_used_elem { le32 id; le32 len; } after flags and idx.
        let mut elem = [0u8; 8];
        self.mem
            .read_slice(
                &mut elem,
                GuestAddress(self.ctrl.used + 4 + u64::from(pos) * 8),
            )
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        let id = u32::from_le_bytes([elem[0], elem[1], elem[2], elem[3]]);
        let len = u32::from_le_bytes([elem[4], elem[5], elem[6], elem[7]]);
        let tag = u16::try_from(id)
            .ok()
            .and_then(|h| self.by_head.remove(&h))
            .ok_or(DriverError::UnknownHead(id))?;
        self.ctrl.last_used = self.ctrl.last_used.wrapping_add(1);
        let Some(p) = self.pending.remove(&tag) else {
            return Err(DriverError::UnknownHead(id));
        };
        self.free_slots.push(p.slot);
        let n = len as usize;
        if n > MAX_RESPONSE {
            return Err(DriverError::UsedTooLong {
                len,
                max: MAX_RESPONSE,
            });
        }
        let resp = BUF_BASE + u64::from(p.slot) * SLOT_STRIDE + MAX_REQUEST as u64;
        let mut bytes = vec![0u8; n];
        self.mem
            .read_slice(&mut bytes, GuestAddress(resp))
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        self.done.insert(tag, bytes);
        if let Some(st) = self.stamps.get_mut(&tag) {
            st.1 = self.seen_at;
        }
        self.stats.completed += 1;
        Ok(())
    }

    /// Waits for the response to `tag` (responses to other tags are kept for later).
    pub fn wait(&mut self, tag: u64) -> Result<Vec<u8>, DriverError> {
        loop {
            if let Some(r) = self.done.remove(&tag) {
                return Ok(r);
            }
            if !self.pending.contains_key(&tag) {
                return Err(DriverError::NotInFlight(tag));
            }
            self.check_lost()?;
            // In command order (this device completes in order; if not, the wait only
            // wakes later): the commands before `tag` and `tag` itself.
            let want = self.pending.keys().filter(|t| **t <= tag).count();
            self.collect(u16::try_from(want).unwrap_or(u16::MAX))?;
        }
    }

    /// Sends one command and waits for its response.
    pub fn call(&mut self, cmd: &[u8]) -> Result<Vec<u8>, DriverError> {
        let tag = self.submit(cmd)?;
        self.wait(tag)
    }

    /// Commands in flight.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

/// Sends one transport message and waits for its reply (same `seq`, in order).
fn transport_call(
    tube: &Tube,
    timeout: Duration,
    what: &'static str,
    seq: u64,
    msg: &TransportMsg,
    fds: &[BorrowedFd<'_>],
) -> Result<TransportReply, DriverError> {
    tube.set_send_timeout(Some(timeout))?;
    tube.set_recv_timeout(Some(timeout))?;
    tube.send(msg, fds)?;
    let (reply, _) = tube.recv::<TransportReply>()?;
    match &reply {
        TransportReply::Done { seq: s, error } if *s == seq => match error {
            None => Ok(reply),
            Some(reason) => Err(DriverError::Refused {
                what,
                reason: reason.clone(),
            }),
        },
        TransportReply::Stats { seq: s, .. } if *s == seq => Ok(reply),
        #[cfg(feature = "trace")]
        TransportReply::Trace { seq: s, .. } if *s == seq => Ok(reply),
        other => Err(DriverError::BadReply {
            what,
            got: format!("{other:?}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::need_event;

    #[test]
    fn a_kick_is_needed_only_when_the_index_passes_avail_event() {
        // The device waits for entry 5: moving 5 -> 6 passes it, 6 -> 7 does not.
        assert!(need_event(5, 6, 5));
        assert!(!need_event(5, 7, 6));
        // A burst 3 -> 9 that passes it.
        assert!(need_event(5, 9, 3));
        assert!(!need_event(9, 9, 3));
        // Across the u16 wrap.
        assert!(need_event(u16::MAX, 0, u16::MAX));
        assert!(need_event(0, 2, u16::MAX));
        assert!(!need_event(u16::MAX - 3, 1, 0));
    }
}
