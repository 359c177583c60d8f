//! vhost-user backend mode (`hostmem-gpu-device --vhost-user --socket-fd N`): the same
//! device core ([`VirtioGpu`] over [`Gpu`]) served to any vhost-user frontend (QEMU's
//! `vhost-user-test-device-pci`, our own VMM's `hostmem run --transport vhost-user`).
//!
//! # One thread
//!
//! The device stays single-threaded under seccomp (no `clone` in its policy): instead of
//! `vhost-user-backend`'s daemon, which spawns a worker thread per queue, the poll loop
//! ([`serve_connection`]) drives `vhost`'s [`BackendReqHandler`] itself. It polls the
//! frontend's socket, the backend channel and the queues' kick eventfds; a readable socket
//! is one `handle_request`, a kick serves its queue, a readable backend channel brings acks.
//! The backend channel's requests (`SHMEM_MAP`/`SHMEM_UNMAP`) are sent from inside the
//! command handler and **never waited for there**: QEMU 11.1 sends `ADD_MEM_REG` (and
//! waits for its reply) before it acks a `SHMEM_MAP`, so a device waiting for the ack would
//! deadlock with it. The command completes when its ack arrives (see "Placement").
//! After its last work the loop polls without sleeping for an [`IdlePoll`] window
//! ([`Options::idle_poll_max`], `--idle-poll-max-us`), as the native device's loop does, so
//! an ack or the guest's next command that comes soon costs no wake-up from sleep.
//!
//! # Messages
//!
//! * Virtio features offered: `VERSION_1`, `RING_EVENT_IDX`, `VIRGL`, `EDID`,
//!   `RESOURCE_UUID`, `RESOURCE_BLOB`, `CONTEXT_INIT`, plus `VHOST_USER_F_PROTOCOL_FEATURES`
//!   ([`OFFERED_FEATURES`]).
//! * Protocol features ([`protocol_features`]): `MQ` (`GET_QUEUE_NUM` = 2), `REPLY_ACK`,
//!   `BACKEND_REQ`, `BACKEND_SEND_FD`, `CONFIG` (`GET_CONFIG` answers
//!   `struct virtio_gpu_config`, 16 bytes, with the display's `num_scanouts` and
//!   `num_capsets`; bytes past it read 0),
//!   `SHMEM` (`GET_SHMEM_CONFIG`: one region, id [`SHMEM_ID`] = 1, `memory_sizes[1]` = the
//!   window size, as QEMU indexes the array by shmid), `CONFIGURE_MEM_SLOTS`
//!   (`ADD_MEM_REG`/`REM_MEM_REG`, [`MAX_MEM_SLOTS`]) and `RESET_DEVICE`.
//! * Guest memory: `SET_MEM_TABLE` / `ADD_MEM_REG` regions, each with its fd (a message
//!   whose fd count differs from its region count is refused by `vhost` and the connection
//!   is closed). Ring addresses arrive as frontend virtual addresses and are translated
//!   through the regions' `user_addr`. The memory the queues run on is taken when the first
//!   queue starts; regions added while queues run (QEMU adds one per `SHMEM_MAP`, since the
//!   mapping is fd-backed RAM in the guest's address space) are recorded, not applied: the
//!   rings and command buffers live in guest RAM that was there before. Those regions are
//!   never accepted as a 2D resource's backing ([`Gpu::set_backing_exclusions`]): they are
//!   the hostmem window's placements, not RAM.
//! * A queue starts when it has a size, ring addresses, kick and call eventfds and is
//!   enabled (`SET_VRING_ENABLE`, or at the kick when `PROTOCOL_FEATURES` was not acked).
//!   `SET_VRING_BASE` must be 0 (a fresh ring). `GET_VRING_BASE` stops the device: the
//!   core resets (it has no per-queue stop) and the answer is the queue's next avail index.
//!
//! # Placement
//!
//! A vhost-user frontend owns the shared memory region; the device has no mirror of it.
//! [`ShmemPlacer`] is the [`Placer`] of this mode, a pipelining one with asynchronous
//! verdicts ([`Placer::verdicts_async`]): `begin_map` sends
//! `SHMEM_MAP { shmid 1, shm_offset, len, fd_offset, flags: WRITABLE }` with the blob's fd
//! on the backend channel and returns; when the loop sees the channel readable,
//! [`ShmemPlacer::receive`] reads the acks (`REPLY_ACK`) and the loop settles one command
//! per ack ([`VirtioGpu::finish_one`]); commands behind an unsettled placement wait in the
//! handler, in order. A refusal (non-zero ack, broken channel, no channel) fails the guest's
//! command with `ERR_UNSPEC`. `begin_unmap` sends `SHMEM_UNMAP` likewise. The handler
//! ([`Gpu`]) checked the offset, the size and overlaps before the placer is asked.
//!
//! `vhost`'s `Backend` only sends and waits, and keeps its socket to itself, so the loop
//! takes `SET_BACKEND_REQ_FD` off the frontend's socket before the crate's handler sees it
//! (`take_backend_channel`) and the device writes the two messages itself
//! ([`BackendChannel`], with their layout). Everything else is the crate's.
//!
//! # Reset and disconnect
//!
//! Resets the frontend starts (`RESET_DEVICE`, `RESET_OWNER`, `GET_VRING_BASE`, a closed
//! socket) drop every blob and context locally without `SHMEM_UNMAP`: the frontend is
//! waiting for our reply on the main socket at that moment and would not read the backend
//! channel (a deadlock), and a frontend resets its own region with the device. Placements
//! in flight fail at once ([`ShmemPlacer::suspend`]); their acks, when they come, are
//! skipped. When the
//! frontend disconnects the device resets and [`serve_listener`] accepts the next
//! connection on the listening socket, with a fresh backend. A frontend that leaves a
//! request unacked past [`Options::ack_timeout`] is treated the same way: the poll loop's
//! timeout runs to that deadline, and then the connection is closed
//! ([`ConnectionEnd::AckTimeout`]).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use hostmem_base::mmap::{is_page_aligned, Prot};
use hostmem_ipc::protocol::QueueSetup;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, MsgFlags, SockType};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMMap, VhostUserMMapFlags, VhostUserMemoryRegion,
    VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{
    Backend as Channel, BackendReqHandler, Error as VuError, GpuBackend, Result as VuResult,
    VhostUserBackendReqHandlerMut,
};
use vhost::VhostUserMemoryRegionBase;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap, MmapRegion};

use crate::backend::Backend;
use crate::display::DisplayConfig;
use crate::gpu::{Gpu, MapRequest, PlaceError, Placer};
use crate::process::{IdlePoll, IDLE_POLL_MAX};
use crate::virtio::{GuestMemoryMmap, VirtioGpu, NUM_QUEUES, QUEUE_MAX_SIZE};
use crate::{Error, Result};

/// The shared memory region's id: virtio-gpu's host-visible region.
pub const SHMEM_ID: u8 = 1;
/// Default size of the shared memory region (a power of two: QEMU makes it a PCI BAR).
pub const DEFAULT_SHMEM_SIZE: u64 = 256 << 20;
/// Memory slots offered with `CONFIGURE_MEM_SLOTS` (QEMU's x86 maximum).
pub const MAX_MEM_SLOTS: u64 = 509;
/// `sizeof(struct virtio_gpu_config)`: events_read, events_clear, num_scanouts,
/// num_capsets. QEMU's `vhost-user-test-device-pci` wants `config_size=16`.
pub const CONFIG_SIZE: usize = 16;
/// Largest config read answered (QEMU's `VHOST_USER_MAX_CONFIG_SIZE`).
const MAX_CONFIG_READ: usize = 256;

pub use crate::features::VIRTIO_F_RING_EVENT_IDX;
/// `VHOST_USER_F_PROTOCOL_FEATURES` (bit 30).
pub const VHOST_USER_F_PROTOCOL_FEATURES: u64 =
    vhost::vhost_user::message::VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
/// The virtio features the backend offers: the GPU's ([`crate::features`]), event
/// indexes and the protocol features.
pub const OFFERED_FEATURES: u64 =
    crate::features::GPU_FEATURES | VIRTIO_F_RING_EVENT_IDX | VHOST_USER_F_PROTOCOL_FEATURES;

/// The protocol features the backend offers (`vhost` adds `REPLY_ACK` itself too).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
        | VhostUserProtocolFeatures::BACKEND_SEND_FD
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::SHMEM
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::RESET_DEVICE
}

/// How the backend serves.
#[derive(Debug, Clone)]
pub struct Options {
    /// Renderer backend.
    pub backend: crate::backend::BackendKind,
    /// The backend's test ops.
    pub test_ops: bool,
    /// Size of shared memory region 1 (page-aligned).
    pub shmem_size: u64,
    /// Stop after this many connections (tests); `None`: serve forever.
    pub max_connections: Option<usize>,
    /// How long a `SHMEM_MAP`/`SHMEM_UNMAP` may wait for its ack before the frontend is
    /// taken for broken and its connection closed ([`ACK_TIMEOUT`]; shorter in tests).
    pub ack_timeout: Duration,
    /// The blob memory budget of each connection's device ([`Gpu::set_blob_budget`]).
    pub blob_budget: Option<u64>,
    /// The scanouts ([`Gpu::set_display`]).
    pub display: DisplayConfig,
    /// The tube flushed frames go to (the supervisor's control tube; a [`TubeSink`] per
    /// connection on it). `None`: frames are kept nowhere.
    ///
    /// [`TubeSink`]: crate::display::TubeSink
    pub frames: Option<Arc<hostmem_ipc::Tube>>,
    /// How long the poll loop may keep polling after its last work before it sleeps
    /// (`--idle-poll-max-us`; the window adapts up to this, [`IdlePoll`]). Zero: it sleeps
    /// at once.
    pub idle_poll_max: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            backend: crate::backend::BackendKind::Shm,
            test_ops: false,
            shmem_size: DEFAULT_SHMEM_SIZE,
            max_connections: None,
            ack_timeout: ACK_TIMEOUT,
            blob_budget: None,
            display: DisplayConfig::default(),
            frames: None,
            idle_poll_max: IDLE_POLL_MAX,
        }
    }
}

/// Counters of the backend channel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShmemStats {
    /// `SHMEM_MAP`s the frontend acked.
    pub maps: u64,
    /// `SHMEM_UNMAP`s the frontend acked.
    pub unmaps: u64,
    /// Requests refused (nack, broken or missing channel).
    pub refused: u64,
    /// Replies skipped: acks of requests a reset forgot.
    pub stale_replies: u64,
}

/// `VHOST_USER_BACKEND_SHMEM_MAP` (backend → frontend request 9).
pub const BACKEND_SHMEM_MAP: u32 = 9;
/// `VHOST_USER_BACKEND_SHMEM_UNMAP` (backend → frontend request 10).
pub const BACKEND_SHMEM_UNMAP: u32 = 10;
/// `VHOST_USER_SET_BACKEND_REQ_FD` (frontend → backend request 21).
pub const SET_BACKEND_REQ_FD: u32 = 21;
/// Bytes of a vhost-user message header: `request: u32`, `flags: u32`, `size: u32`.
pub const MSG_HEADER_SIZE: usize = 12;
/// Bytes of `VhostUserMMap`, the body of `SHMEM_MAP`/`SHMEM_UNMAP`.
pub const MMAP_BODY_SIZE: usize = 40;
/// Header flags: protocol version 1 (bits 0-1).
const FLAG_VERSION_1: u32 = 0x1;
/// Header flags: the version bits.
const FLAG_VERSION_MASK: u32 = 0x3;
/// Header flags: this message is a reply.
const FLAG_REPLY: u32 = 0x4;
/// Header flags: the sender wants a reply (`REPLY_ACK`).
const FLAG_NEED_REPLY: u32 = 0x8;
/// Largest body of a `SET_BACKEND_REQ_FD` the device reads (the message has none).
const MAX_BACKEND_REQ_FD_BODY: usize = 256;
/// How long a placement waits for the frontend's ack by default: a synchronous one
/// ([`Placer::map`]) inside the call, an asynchronous one in the poll loop
/// ([`serve_connection`] closes the connection when the oldest ack is this late).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// The backend channel (the socket `SET_BACKEND_REQ_FD` brought), driven by the device
/// itself rather than by `vhost`'s `Backend`, whose requests block until their ack: the
/// frontend may have to ask the device something first (QEMU 11.1 adds a memory region
/// per `SHMEM_MAP`, `ADD_MEM_REG`, and waits for that reply before it acks the map; a
/// device blocked on the ack would never read it). Here a request is only sent, and its
/// ack is read when the poll loop sees the channel readable.
///
/// Wire layout (vhost-user spec, "Back-end message types"), little-endian:
///
/// * header, 12 bytes: `request: u32` (9 `SHMEM_MAP`, 10 `SHMEM_UNMAP`), `flags: u32`
///   (version 1 in bits 0-1; bit 3 `NEED_REPLY` when `REPLY_ACK` was negotiated),
///   `size: u32` (40);
/// * body `VhostUserMMap`, 40 bytes: `shmid: u8`, 7 bytes padding, `fd_offset: u64`,
///   `shm_offset: u64`, `len: u64`, `flags: u64` (bit 0 `WRITABLE`); `SHMEM_MAP` carries
///   the blob's fd as `SCM_RIGHTS`;
/// * the ack: a header with the same `request`, flags version 1 | `REPLY` (bit 2),
///   `size` 8, and a `u64` body, 0 for success.
#[derive(Debug)]
pub struct BackendChannel {
    sock: UnixStream,
    need_reply: bool,
    /// Received bytes of a reply not complete yet.
    partial: Vec<u8>,
}

impl BackendChannel {
    /// A channel over `sock`; `need_reply` when `REPLY_ACK` was negotiated (every request
    /// then waits for its ack).
    pub fn new(sock: UnixStream, need_reply: bool) -> Self {
        BackendChannel {
            sock,
            need_reply,
            partial: Vec::new(),
        }
    }

    /// The socket, to poll.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Sends one `SHMEM_MAP`/`SHMEM_UNMAP` (see the layout above).
    fn send(
        &self,
        request: u32,
        m: &VhostUserMMap,
        fd: Option<BorrowedFd<'_>>,
    ) -> std::io::Result<()> {
        let flags = if self.need_reply {
            FLAG_VERSION_1 | FLAG_NEED_REPLY
        } else {
            FLAG_VERSION_1
        };
        let (shmid, fd_offset, shm_offset, len, mflags) =
            (m.shmid, m.fd_offset, m.shm_offset, m.len, m.flags);
        let mut b = Vec::with_capacity(MSG_HEADER_SIZE + MMAP_BODY_SIZE);
        b.extend_from_slice(&request.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&(MMAP_BODY_SIZE as u32).to_le_bytes());
        b.push(shmid);
        b.extend_from_slice(&[0u8; 7]);
        for v in [fd_offset, shm_offset, len, mflags] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        send_all(self.sock.as_fd(), &b, fd)
    }

    /// Reads what arrived without waiting and returns the complete replies as
    /// `(request, value)`. An error when the channel closed or a reply is malformed.
    fn receive(&mut self) -> std::result::Result<Vec<(u32, u64)>, String> {
        let mut buf = [0u8; 1024];
        loop {
            match hostmem_base::fd::try_recv_with_fds(self.sock.as_fd(), &mut buf) {
                // Fds that came along are closed with `got` (a reply carries none).
                Ok(got) if got.len == 0 => {
                    return Err("the frontend closed the backend channel".into())
                }
                Ok(got) => self
                    .partial
                    .extend_from_slice(buf.get(..got.len).unwrap_or_default()),
                Err(Errno::EAGAIN) => break,
                Err(e) => return Err(format!("backend channel: recvmsg: {e}")),
            }
        }
        let reply_len = MSG_HEADER_SIZE + 8;
        let mut out = Vec::new();
        while self.partial.len() >= reply_len {
            let rest = self.partial.split_off(reply_len);
            let r = std::mem::replace(&mut self.partial, rest);
            let word = |at: usize| {
                r.get(at..at + 4)
                    .and_then(|s| s.try_into().ok())
                    .map(u32::from_le_bytes)
                    .unwrap_or(0)
            };
            let (request, flags, size) = (word(0), word(4), word(8));
            if flags & FLAG_VERSION_MASK != FLAG_VERSION_1 || flags & FLAG_REPLY == 0 || size != 8 {
                return Err(format!(
                    "malformed reply on the backend channel: request {request}, flags {flags:#x}, size {size}"
                ));
            }
            let value = r
                .get(MSG_HEADER_SIZE..reply_len)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or(u64::MAX);
            out.push((request, value));
        }
        Ok(out)
    }
}

/// The [`Placer`] of vhost-user mode: `SHMEM_MAP`/`SHMEM_UNMAP` on the backend channel,
/// asynchronous ([`Placer::verdicts_async`]): `begin_map` sends, the poll loop calls
/// [`ShmemPlacer::receive`] when the channel is readable and then
/// [`VirtioGpu::finish_one`] once per verdict.
#[derive(Debug)]
pub struct ShmemPlacer {
    channel: Option<BackendChannel>,
    size: u64,
    stats: ShmemStats,
    next_ticket: u64,
    /// Requests sent and not acked, oldest first.
    inflight: VecDeque<Sent>,
    /// How long the oldest request may wait for its ack.
    ack_timeout: Duration,
    /// Verdicts received and not taken by `finish_next`, oldest first.
    verdicts: VecDeque<(u64, std::result::Result<(), PlaceError>)>,
    /// Acks still owed for requests a reset forgot: skipped when they arrive.
    stale: usize,
    /// During a reset the frontend started: nothing is sent (it waits for our reply on
    /// the main socket and would not read the backend channel).
    suspended: bool,
}

/// A request sent and not acked yet.
#[derive(Debug, Clone, Copy)]
struct Sent {
    ticket: u64,
    request: u32,
    shm_offset: u64,
    len: u64,
    at: Instant,
}

impl Sent {
    /// Names the request in a log line.
    fn describe(&self) -> String {
        format!(
            "{} #{} (shm offset {:#x}, {:#x} bytes)",
            request_name(self.request),
            self.ticket,
            self.shm_offset,
            self.len
        )
    }
}

impl ShmemPlacer {
    /// A placer for a region of `size` bytes, with no backend channel yet, waiting
    /// [`ACK_TIMEOUT`] for an ack.
    pub fn new(size: u64) -> Self {
        ShmemPlacer {
            channel: None,
            size,
            stats: ShmemStats::default(),
            next_ticket: 0,
            inflight: VecDeque::new(),
            ack_timeout: ACK_TIMEOUT,
            verdicts: VecDeque::new(),
            stale: 0,
            suspended: false,
        }
    }

    /// Sets how long a request may wait for its ack.
    pub fn set_ack_timeout(&mut self, timeout: Duration) {
        self.ack_timeout = timeout;
    }

    /// How long a request may wait for its ack.
    pub fn ack_timeout(&self) -> Duration {
        self.ack_timeout
    }

    /// When the oldest request in flight runs out of time; `None` with nothing in flight.
    pub fn ack_deadline(&self) -> Option<Instant> {
        // A timeout too large for an `Instant` is no deadline at all.
        self.inflight.front()?.at.checked_add(self.ack_timeout)
    }

    /// The oldest request in flight, named, when its deadline has passed at `now`: the
    /// frontend is not answering.
    pub fn overdue(&self, now: Instant) -> Option<String> {
        let deadline = self.ack_deadline()?;
        (now >= deadline).then(|| self.inflight.front().map(Sent::describe))?
    }

    /// Takes a (new) backend channel (`SET_BACKEND_REQ_FD`): requests in flight on the old
    /// one fail.
    pub fn set_channel(&mut self, channel: BackendChannel) {
        self.fail_inflight("the backend channel was replaced");
        self.stale = 0;
        self.channel = Some(channel);
    }

    /// The backend channel's socket, to poll.
    pub fn channel_fd(&self) -> Option<BorrowedFd<'_>> {
        self.channel.as_ref().map(BackendChannel::as_fd)
    }

    /// Starts a reset the frontend started: requests in flight fail at once (their acks
    /// will be skipped when they come), unmaps are local only until [`ShmemPlacer::resume`].
    pub fn suspend(&mut self) {
        self.suspended = true;
        self.stale += self.inflight.len();
        self.fail_inflight("the device was reset");
    }

    /// Ends [`ShmemPlacer::suspend`]; verdicts nobody settled are dropped.
    pub fn resume(&mut self) {
        self.suspended = false;
        self.verdicts.clear();
    }

    /// The counters.
    pub fn stats(&self) -> ShmemStats {
        self.stats
    }

    /// Requests sent and not acked yet.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Verdicts ready for [`Placer::finish_next`].
    pub fn ready(&self) -> usize {
        self.verdicts.len()
    }

    /// Reads the acks that arrived (without waiting) and turns them into verdicts; returns
    /// how many verdicts are ready. A closed or broken channel fails everything in flight.
    pub fn receive(&mut self) -> usize {
        let Some(ch) = self.channel.as_mut() else {
            return self.verdicts.len();
        };
        match ch.receive() {
            Ok(replies) => {
                for (request, value) in replies {
                    if self.stale > 0 {
                        self.stale -= 1;
                        self.stats.stale_replies += 1;
                        continue;
                    }
                    let Some(sent) = self.inflight.pop_front() else {
                        self.break_channel(format!("an ack of request {request} nobody asked for"));
                        break;
                    };
                    if request != sent.request {
                        let expected = sent.request;
                        self.inflight.push_front(sent);
                        self.break_channel(format!(
                            "ack of request {request}, expected {expected}"
                        ));
                        break;
                    }
                    let r = self.verdict(sent.request, value);
                    self.verdicts.push_back((sent.ticket, r));
                }
            }
            Err(e) => self.break_channel(e),
        }
        self.verdicts.len()
    }

    fn verdict(&mut self, request: u32, value: u64) -> std::result::Result<(), PlaceError> {
        let what = request_name(request);
        if value != 0 {
            return Err(self.refused(what, format!("the frontend answered {value}")));
        }
        if request == BACKEND_SHMEM_MAP {
            self.stats.maps += 1;
        } else {
            self.stats.unmaps += 1;
        }
        Ok(())
    }

    /// Drops the channel: everything in flight fails, later maps are refused.
    fn break_channel(&mut self, why: String) {
        log::warn!("vhost-user: backend channel unusable: {why}");
        self.channel = None;
        self.stale = 0;
        self.fail_inflight(&why);
    }

    fn fail_inflight(&mut self, why: &str) {
        while let Some(sent) = self.inflight.pop_front() {
            let e = self.refused(request_name(sent.request), why);
            self.verdicts.push_back((sent.ticket, Err(e)));
        }
    }

    fn refused(&mut self, what: &str, e: impl std::fmt::Display) -> PlaceError {
        self.stats.refused += 1;
        VHOST_USER_WARNINGS.warn(
            "placement refused by the frontend",
            format_args!("vhost-user: {what} refused: {e}"),
        );
        PlaceError::Unspec(format!("frontend refused {what}: {e}"))
    }

    /// Sends a request; `Some(ticket)` when its ack is awaited.
    fn send(
        &mut self,
        request: u32,
        msg: &VhostUserMMap,
        fd: Option<BorrowedFd<'_>>,
    ) -> std::result::Result<Option<u64>, PlaceError> {
        let what = request_name(request);
        let Some(ch) = self.channel.as_ref() else {
            return Err(self.refused(what, "no backend channel (BACKEND_REQ)"));
        };
        if let Err(e) = ch.send(request, msg, fd) {
            let why = format!("send: {e}");
            self.break_channel(why.clone());
            return Err(self.refused(what, why));
        }
        if !ch.need_reply {
            // Without REPLY_ACK the frontend sends no ack: the request is final.
            if request == BACKEND_SHMEM_MAP {
                self.stats.maps += 1;
            } else {
                self.stats.unmaps += 1;
            }
            return Ok(None);
        }
        self.next_ticket += 1;
        self.inflight.push_back(Sent {
            ticket: self.next_ticket,
            request,
            shm_offset: msg.shm_offset,
            len: msg.len,
            at: Instant::now(),
        });
        Ok(Some(self.next_ticket))
    }

    /// Waits (at most the ack timeout) for the verdict of `ticket` and everything before it.
    fn wait_for(&mut self, ticket: Option<u64>) -> std::result::Result<(), PlaceError> {
        let Some(ticket) = ticket else { return Ok(()) };
        while let Some((t, r)) = self.finish_next() {
            if t == ticket {
                return r;
            }
        }
        Err(PlaceError::Unspec(format!(
            "request {ticket} was never sent"
        )))
    }
}

fn request_name(request: u32) -> &'static str {
    match request {
        BACKEND_SHMEM_MAP => "SHMEM_MAP",
        BACKEND_SHMEM_UNMAP => "SHMEM_UNMAP",
        _ => "backend request",
    }
}

impl Placer for ShmemPlacer {
    fn map(&mut self, req: &MapRequest<'_>) -> std::result::Result<(), PlaceError> {
        let ticket = self.begin_map(req)?;
        self.wait_for(ticket)
    }

    fn unmap(
        &mut self,
        resource_id: u32,
        offset: u64,
        len: u64,
    ) -> std::result::Result<(), PlaceError> {
        let ticket = self.begin_unmap(resource_id, offset, len)?;
        self.wait_for(ticket)
    }

    fn window_size(&self) -> u64 {
        self.size
    }

    fn begin_map(&mut self, req: &MapRequest<'_>) -> std::result::Result<Option<u64>, PlaceError> {
        if self.suspended {
            return Err(self.refused("SHMEM_MAP", "the device is being reset"));
        }
        let flags = if req.prot == Prot::READ_WRITE {
            VhostUserMMapFlags::WRITABLE
        } else {
            VhostUserMMapFlags::empty()
        };
        let msg = VhostUserMMap {
            shmid: SHMEM_ID,
            fd_offset: req.blob.fd_offset,
            shm_offset: req.offset,
            len: req.len,
            flags: flags.bits(),
            ..Default::default()
        };
        self.send(BACKEND_SHMEM_MAP, &msg, Some(req.blob.fd.as_fd()))
    }

    fn begin_unmap(
        &mut self,
        resource_id: u32,
        offset: u64,
        len: u64,
    ) -> std::result::Result<Option<u64>, PlaceError> {
        if self.suspended || self.channel.is_none() {
            // A reset the frontend started, or no channel: nothing to tell.
            log::debug!("vhost-user: resource {resource_id} dropped at {offset:#x} locally");
            return Ok(None);
        }
        let msg = VhostUserMMap {
            shmid: SHMEM_ID,
            shm_offset: offset,
            len,
            ..Default::default()
        };
        self.send(BACKEND_SHMEM_UNMAP, &msg, None)
    }

    fn finish_next(&mut self) -> Option<(u64, std::result::Result<(), PlaceError>)> {
        if let Some(v) = self.verdicts.pop_front() {
            return Some(v);
        }
        // Synchronous use (`map`/`unmap`): wait for the oldest ack.
        let timeout = self.ack_timeout;
        let start = Instant::now();
        loop {
            let ticket = self.inflight.front()?.ticket;
            let Some(fd) = self.channel_fd() else {
                self.fail_inflight("no backend channel");
                return self.verdicts.pop_front();
            };
            let left = timeout.saturating_sub(start.elapsed());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
            match poll(&mut pfd, PollTimeout::from(ms)) {
                Ok(0) => {
                    self.break_channel(format!("no ack for request {ticket} within {timeout:?}"));
                    return self.verdicts.pop_front();
                }
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    self.break_channel(format!("poll: {e}"));
                    return self.verdicts.pop_front();
                }
            }
            if self.receive() > 0 {
                return self.verdicts.pop_front();
            }
        }
    }

    fn verdicts_async(&self) -> bool {
        true
    }
}

/// One guest memory region as the frontend described it.
#[derive(Debug)]
struct MemRegion {
    gpa: u64,
    size: u64,
    user_addr: u64,
    fd_offset: u64,
    file: File,
    /// Added while queues ran (QEMU's region for a `SHMEM_MAP`): never backing.
    late: bool,
}

/// One ring's setup as it arrives, message by message.
#[derive(Debug, Default)]
struct Ring {
    size: u16,
    /// Frontend virtual addresses: descriptor table, used ring, avail ring.
    addrs: Option<(u64, u64, u64)>,
    kick: Option<OwnedFd>,
    call: Option<OwnedFd>,
    enabled: bool,
    started: bool,
    /// The next avail index when the ring was stopped (`GET_VRING_BASE`).
    stopped_at: u16,
}

/// The backend's state for one connection: the device core plus what the vhost-user
/// messages set up.
pub struct VuGpu {
    dev: VirtioGpu<ShmemPlacer>,
    num_capsets: u32,
    acked_features: u64,
    acked_protocol: u64,
    regions: Vec<MemRegion>,
    rings: [Ring; NUM_QUEUES],
    /// Memory changed since the queues' memory was taken.
    memory_dirty: bool,
}

impl std::fmt::Debug for VuGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VuGpu")
            .field("dev", &self.dev)
            .field("regions", &self.regions.len())
            .field("rings", &self.rings)
            .finish()
    }
}

/// What the frontend made the device refuse, by kind (logged the 1st, 2nd, 4th, … time).
pub static VHOST_USER_WARNINGS: hostmem_base::log_limit::LogLimiter =
    hostmem_base::log_limit::LogLimiter::new("hostmem_device::vhost_user");

fn bad<T>(why: impl std::fmt::Display) -> VuResult<T> {
    VHOST_USER_WARNINGS.warn(
        "frontend request refused",
        format_args!("vhost-user: refused: {why}"),
    );
    Err(VuError::InvalidParam)
}

impl VuGpu {
    /// A backend state around `backend` with a shared memory region of `shmem_size` bytes.
    pub fn new(backend: Box<dyn Backend>, shmem_size: u64) -> Self {
        let num_capsets = u32::try_from(backend.capsets().len()).unwrap_or(u32::MAX);
        VuGpu {
            dev: VirtioGpu::new(Gpu::new(backend, ShmemPlacer::new(shmem_size))),
            num_capsets,
            acked_features: 0,
            acked_protocol: 0,
            regions: Vec::new(),
            rings: Default::default(),
            memory_dirty: true,
        }
    }

    /// The device core.
    pub fn device(&self) -> &VirtioGpu<ShmemPlacer> {
        &self.dev
    }

    /// The device core, mutably.
    pub fn device_mut(&mut self) -> &mut VirtioGpu<ShmemPlacer> {
        &mut self.dev
    }

    /// `struct virtio_gpu_config`: no events, the display's scanouts, the backend's capsets.
    pub fn config(&self) -> [u8; CONFIG_SIZE] {
        let mut c = [0u8; CONFIG_SIZE];
        let scanouts = self.dev.gpu().display().num_scanouts();
        c[8..12].copy_from_slice(&scanouts.to_le_bytes());
        c[12..16].copy_from_slice(&self.num_capsets.to_le_bytes());
        c
    }

    /// A reset the frontend started (or a disconnect): every blob and context dropped
    /// without telling the frontend, rings stopped, the backend channel kept unless
    /// `drop_channel`.
    pub fn reset(&mut self, drop_channel: bool) {
        for (i, r) in self.rings.iter_mut().enumerate() {
            if let Some(n) = self.dev.next_avail(i as u16) {
                r.stopped_at = n;
            }
            r.started = false;
            r.enabled = false;
            r.kick = None;
        }
        self.dev.gpu_mut().placer_mut().suspend();
        self.dev.reset();
        let placer = self.dev.gpu_mut().placer_mut();
        placer.resume();
        if drop_channel {
            let timeout = placer.ack_timeout();
            *placer = ShmemPlacer::new(placer.window_size());
            placer.set_ack_timeout(timeout);
        }
        self.memory_dirty = true;
    }

    fn proto(&self, f: VhostUserProtocolFeatures) -> bool {
        self.acked_protocol & f.bits() != 0
    }

    /// Translates a frontend virtual address to a guest-physical one.
    fn translate(&self, va: u64) -> Option<u64> {
        self.regions.iter().find_map(|r| {
            let off = va.checked_sub(r.user_addr)?;
            (off < r.size).then(|| r.gpa.checked_add(off)).flatten()
        })
    }

    fn add_region(&mut self, r: &VhostUserMemoryRegion, file: File) -> VuResult<()> {
        let (gpa, size, user_addr, fd_offset) =
            (r.guest_phys_addr, r.memory_size, r.user_addr, r.mmap_offset);
        if size == 0 || !is_page_aligned(gpa) || !is_page_aligned(size) {
            return bad(format!("region {gpa:#x}+{size:#x} not page-aligned"));
        }
        if !is_page_aligned(fd_offset) {
            return bad(format!("region {gpa:#x}: mmap offset {fd_offset:#x}"));
        }
        let Some(end) = gpa.checked_add(size) else {
            return bad(format!("region {gpa:#x}+{size:#x} overflows"));
        };
        if user_addr.checked_add(size).is_none() || fd_offset.checked_add(size).is_none() {
            return bad(format!("region {gpa:#x}: address or offset overflows"));
        }
        if self.regions.len() as u64 >= MAX_MEM_SLOTS {
            return bad("no memory slot left");
        }
        if let Some(o) = self
            .regions
            .iter()
            .find(|o| o.gpa < end && gpa < o.gpa + o.size)
        {
            return bad(format!(
                "region {gpa:#x}+{size:#x} overlaps {:#x}+{:#x}",
                o.gpa, o.size
            ));
        }
        let late = self.rings.iter().any(|r| r.started);
        self.regions.push(MemRegion {
            gpa,
            size,
            user_addr,
            fd_offset,
            file,
            late,
        });
        self.memory_dirty = true;
        self.update_exclusions();
        Ok(())
    }

    /// Tells the handler which regions are never backing: those added while queues ran.
    fn update_exclusions(&mut self) {
        let late: Vec<(u64, u64)> = self
            .regions
            .iter()
            .filter(|r| r.late)
            .map(|r| (r.gpa, r.size))
            .collect();
        self.dev.gpu_mut().set_backing_exclusions(late);
    }

    /// Maps the regions for the device core.
    fn build_memory(&self) -> Result<GuestMemoryMmap> {
        let gm = |why: String| Error::GuestMemory(why);
        let mut built = Vec::with_capacity(self.regions.len());
        for r in &self.regions {
            let need = r.fd_offset.saturating_add(r.size);
            let have = r
                .file
                .metadata()
                .map_err(|e| gm(format!("region {:#x}: fstat: {e}", r.gpa)))?
                .len();
            if have < need {
                return Err(gm(format!(
                    "region {:#x}: fd holds {have:#x} bytes, needs {need:#x}",
                    r.gpa
                )));
            }
            let file = r
                .file
                .try_clone()
                .map_err(|e| gm(format!("region {:#x}: dup: {e}", r.gpa)))?;
            let len = usize::try_from(r.size).map_err(|_| gm("region too large".into()))?;
            let mapping = MmapRegion::from_file(FileOffset::new(file, r.fd_offset), len)
                .map_err(|e| gm(format!("region {:#x}: mmap: {e}", r.gpa)))?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.gpa))
                .ok_or_else(|| gm(format!("region {:#x} overflows", r.gpa)))?;
            built.push(region);
        }
        GuestMemoryMmap::from_regions(built).map_err(|e| gm(e.to_string()))
    }

    /// Starts ring `index` once everything it needs is there.
    fn try_start(&mut self, index: usize) -> VuResult<()> {
        let Some(r) = self.rings.get(index) else {
            return bad(format!("no queue {index}"));
        };
        if r.started || !r.enabled || r.kick.is_none() || r.call.is_none() {
            return Ok(());
        }
        let Some((desc, used, avail)) = r.addrs else {
            return Ok(());
        };
        let (Some(desc), Some(used), Some(avail)) = (
            self.translate(desc),
            self.translate(used),
            self.translate(avail),
        ) else {
            return bad(format!(
                "queue {index}: ring addresses outside guest memory"
            ));
        };
        let any_started = self.rings.iter().any(|r| r.started);
        if self.memory_dirty && !any_started {
            let mem = self.build_memory().or_else(bad)?;
            self.dev.set_memory(mem).or_else(bad)?;
            self.memory_dirty = false;
        }
        let setup = QueueSetup {
            index: index as u16,
            size: r.size,
            desc,
            avail,
            used,
            event_idx: self.acked_features & VIRTIO_F_RING_EVENT_IDX != 0,
        };
        let dup = |fd: &Option<OwnedFd>| fd.as_ref().map(|f| f.try_clone());
        let (Some(Ok(kick)), Some(Ok(call))) = (dup(&r.kick), dup(&r.call)) else {
            return bad("dup of the ring's eventfds failed");
        };
        self.dev.enable_queue(&setup, kick, call).or_else(bad)?;
        if let Some(r) = self.rings.get_mut(index) {
            r.started = true;
        }
        Ok(())
    }

    fn ring_mut(&mut self, index: u32) -> VuResult<&mut Ring> {
        match self.rings.get_mut(index as usize) {
            Some(r) => Ok(r),
            None => bad(format!("no queue {index}")),
        }
    }

    /// Kick fds of the started queues, to poll.
    pub fn kick_fds(&self) -> Vec<(u16, BorrowedFd<'_>)> {
        self.dev.kick_fds()
    }
}

impl VhostUserBackendReqHandlerMut for VuGpu {
    fn set_owner(&mut self) -> VuResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset(false);
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.reset(false);
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(OFFERED_FEATURES)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !OFFERED_FEATURES != 0 {
            return bad(format!("features {features:#x} not offered"));
        }
        self.acked_features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if files.len() != ctx.len() || ctx.is_empty() {
            return bad(format!("{} regions with {} fds", ctx.len(), files.len()));
        }
        let old = std::mem::take(&mut self.regions);
        for (r, f) in ctx.iter().zip(files) {
            if let Err(e) = self.add_region(r, f) {
                self.regions = old;
                self.update_exclusions();
                return Err(e);
            }
        }
        self.memory_dirty = true;
        log::info!("vhost-user: memory table of {} regions", self.regions.len());
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let size = match u16::try_from(num) {
            Ok(n) if n.is_power_of_two() && n <= QUEUE_MAX_SIZE => n,
            _ => return bad(format!("queue {index}: size {num}")),
        };
        self.ring_mut(index)?.size = size;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.ring_mut(index)?.addrs = Some((descriptor, used, available));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let r = self.ring_mut(index)?;
        if r.started {
            return bad(format!("queue {index}: SET_VRING_BASE while running"));
        }
        if base != 0 {
            return bad(format!("queue {index}: base {base} (only fresh rings)"));
        }
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.ring_mut(index)?;
        if self.rings.iter().any(|r| r.started) {
            log::info!("vhost-user: GET_VRING_BASE {index}: the device stops (reset)");
            self.reset(false);
        }
        let num = self.ring_mut(index)?.stopped_at;
        Ok(VhostUserVringState::new(index, u32::from(num)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let Some(fd) = fd else {
            return bad(format!("queue {index}: polling mode (no kick fd)"));
        };
        let proto = self.acked_features & VHOST_USER_F_PROTOCOL_FEATURES != 0;
        let r = self.ring_mut(u32::from(index))?;
        if r.started {
            return bad(format!("queue {index}: new kick fd while running"));
        }
        r.kick = Some(OwnedFd::from(fd));
        // Without PROTOCOL_FEATURES a ring starts enabled at its kick fd (vhost-user spec).
        if !proto {
            r.enabled = true;
        }
        self.try_start(usize::from(index))
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let Some(fd) = fd else {
            return bad(format!("queue {index}: no call fd"));
        };
        let fd = OwnedFd::from(fd);
        let r = self.ring_mut(u32::from(index))?;
        if r.started {
            let copy = fd.try_clone().or_else(bad)?;
            r.call = Some(fd);
            self.dev.set_call(u16::from(index), copy).or_else(bad)?;
            return Ok(());
        }
        r.call = Some(fd);
        self.try_start(usize::from(index))
    }

    fn set_vring_err(&mut self, _index: u8, _fd: Option<File>) -> VuResult<()> {
        // The device never reports ring errors through an eventfd.
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        if features & !protocol_features().bits() != 0 {
            return bad(format!("protocol features {features:#x} not offered"));
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(NUM_QUEUES as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        let r = self.ring_mut(index)?;
        if !enable {
            if r.started {
                log::info!("vhost-user: queue {index} disabled: the device stops (reset)");
                self.reset(false);
            }
            return Ok(());
        }
        r.enabled = true;
        self.try_start(index as usize)
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let (off, len) = (offset as usize, size as usize);
        let Some(end) = off.checked_add(len).filter(|&e| e <= MAX_CONFIG_READ) else {
            return bad(format!("config read {offset}+{size}"));
        };
        let mut all = [0u8; MAX_CONFIG_READ];
        all[..CONFIG_SIZE].copy_from_slice(&self.config());
        Ok(all[off..end].to_vec())
    }

    fn set_config(
        &mut self,
        offset: u32,
        buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        // events_clear (offset 4) is the only writable field; there are no events to clear.
        log::debug!("vhost-user: config write {offset}+{} ignored", buf.len());
        Ok(())
    }

    fn set_backend_req_fd(&mut self, _channel: Channel) {
        // Never reached: the poll loop takes SET_BACKEND_REQ_FD off the socket itself
        // ([`take_backend_channel`]), because `vhost`'s `Backend` keeps the socket to itself
        // and blocks on every ack (see [`BackendChannel`]).
        log::warn!("vhost-user: SET_BACKEND_REQ_FD through vhost's handler: ignored");
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        bad("GPU_SET_SOCKET (vhost-user-gpu's display protocol) is not supported")
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        bad("GET_SHARED_OBJECT is not supported")
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        bad("INFLIGHT_SHMFD is not offered")
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        bad("INFLIGHT_SHMFD is not offered")
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        _postcopy: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        let r: VhostUserMemoryRegion = **region;
        self.add_region(&r, fd)?;
        if self.rings.iter().any(|r| r.started) {
            let (gpa, size) = (r.guest_phys_addr, r.memory_size);
            log::debug!(
                "vhost-user: region {gpa:#x}+{size:#x} added while queues run: recorded only"
            );
        }
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (gpa, size) = (region.guest_phys_addr, region.memory_size);
        let before = self.regions.len();
        self.regions.retain(|r| !(r.gpa == gpa && r.size == size));
        if self.regions.len() == before {
            return bad(format!("no region {gpa:#x}+{size:#x} to remove"));
        }
        self.memory_dirty = true;
        self.update_exclusions();
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        bad("DEVICE_STATE (migration) is not offered")
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        bad("DEVICE_STATE (migration) is not offered")
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        let size = self.dev.gpu().placer().window_size();
        let mut sizes = [0u64; 2];
        sizes[usize::from(SHMEM_ID)] = size;
        Ok(VhostUserShMemConfig::new(1, &sizes))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        bad("LOG_SHMFD is not offered")
    }
}

/// Locks the shared state; a poisoned lock (a panic elsewhere) still yields the state.
fn lock(vu: &Mutex<VuGpu>) -> MutexGuard<'_, VuGpu> {
    vu.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a connection ended.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The frontend closed its socket.
    Disconnected,
    /// The frontend broke the protocol (the connection was closed).
    ProtocolError(String),
    /// The frontend left a `SHMEM_MAP`/`SHMEM_UNMAP` (named here) unacked past the ack
    /// timeout: taken for broken, the connection was closed.
    AckTimeout(String),
}

/// Sends all of `bytes` with `sendmsg` (the device's seccomp policy has no `sendto`, which
/// `UnixStream`'s `write` uses), `fd` attached to the first byte.
fn send_all(sock: BorrowedFd<'_>, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let raw: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let mut sent = 0usize;
    while sent < bytes.len() {
        let iov = [IoSlice::new(bytes.get(sent..).unwrap_or_default())];
        let c = if sent == 0 { cmsgs } else { &[] };
        match sendmsg::<()>(sock.as_raw_fd(), &iov, c, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Fills `buf` with `recvmsg` (no `recvfrom` in the policy), returning the fds that came.
fn recv_exact(sock: &UnixStream, buf: &mut [u8]) -> std::result::Result<Vec<OwnedFd>, String> {
    let mut fds = Vec::new();
    let mut got = 0usize;
    while got < buf.len() {
        let part = buf.get_mut(got..).unwrap_or_default();
        let r = hostmem_base::fd::recv_with_fds(sock.as_fd(), part)
            .map_err(|e| format!("recvmsg: {e}"))?;
        if r.len == 0 {
            return Err("the frontend closed the socket mid-message".into());
        }
        got += r.len;
        fds.extend(r.fds);
    }
    Ok(fds)
}

/// The request code of the next message on the frontend's socket, without taking it
/// (`MSG_PEEK`); `None` when fewer than 4 bytes are there.
fn peek_request(sock: &UnixStream) -> Option<u32> {
    let mut b = [0u8; 4];
    let mut iov = [IoSliceMut::new(&mut b)];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    match recvmsg::<()>(sock.as_raw_fd(), &mut iov, None, flags) {
        Ok(m) if m.bytes == 4 => Some(u32::from_le_bytes(b)),
        _ => None,
    }
}

/// Takes a `SET_BACKEND_REQ_FD` off the frontend's socket (the poll loop saw its request
/// code with [`peek_request`]): the header with its one fd (an `AF_UNIX` stream socket),
/// the body (none expected), the ack when the frontend asked for one. The channel then
/// belongs to the placer ([`BackendChannel`]). An error breaks the connection.
fn take_backend_channel(sock: &UnixStream, vu: &Mutex<VuGpu>) -> std::result::Result<(), String> {
    let mut hdr = [0u8; MSG_HEADER_SIZE];
    let mut fds = recv_exact(sock, &mut hdr).map_err(|e| format!("SET_BACKEND_REQ_FD: {e}"))?;
    let word = |at: usize| u32::from_le_bytes([hdr[at], hdr[at + 1], hdr[at + 2], hdr[at + 3]]);
    let (flags, size) = (word(4), word(8) as usize);
    if size > MAX_BACKEND_REQ_FD_BODY {
        return Err(format!("SET_BACKEND_REQ_FD with a body of {size} bytes"));
    }
    let mut body = vec![0u8; size];
    fds.extend(recv_exact(sock, &mut body).map_err(|e| format!("SET_BACKEND_REQ_FD: {e}"))?);
    let fd = match (fds.pop(), fds.is_empty()) {
        (Some(fd), true) => fd,
        _ => return Err(format!("SET_BACKEND_REQ_FD with {} fds", fds.len() + 1)),
    };
    match getsockopt(&fd, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        other => {
            return Err(format!(
                "SET_BACKEND_REQ_FD: not a stream socket ({other:?})"
            ))
        }
    }
    {
        let mut g = lock(vu);
        if !g.proto(VhostUserProtocolFeatures::BACKEND_REQ) {
            return Err("SET_BACKEND_REQ_FD without BACKEND_REQ negotiated".into());
        }
        let need_reply = g.proto(VhostUserProtocolFeatures::REPLY_ACK);
        let channel = BackendChannel::new(UnixStream::from(fd), need_reply);
        g.dev.gpu_mut().placer_mut().set_channel(channel);
        log::info!("vhost-user: backend channel set (acks: {need_reply})");
    }
    if flags & FLAG_NEED_REPLY != 0 {
        let mut reply = Vec::with_capacity(MSG_HEADER_SIZE + 8);
        reply.extend_from_slice(&SET_BACKEND_REQ_FD.to_le_bytes());
        reply.extend_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&0u64.to_le_bytes());
        send_all(sock.as_fd(), &reply, None)
            .map_err(|e| format!("SET_BACKEND_REQ_FD: ack: {e}"))?;
    }
    Ok(())
}

/// Serves one frontend connection until it ends: the poll loop over the socket, the
/// backend channel and the started queues' kick eventfds. The frontend's requests are
/// served whenever they come, also while `SHMEM_MAP`/`SHMEM_UNMAP` acks are outstanding
/// (QEMU asks `ADD_MEM_REG`/`REM_MEM_REG` before it acks); a readable backend channel
/// settles the commands whose acks arrived. The oldest outstanding request bounds the
/// poll's timeout: once its ack is later than the placer's ack timeout the frontend is
/// taken for broken and the connection ends ([`ConnectionEnd::AckTimeout`]). The caller
/// resets the state afterwards (the requests in flight fail as on a disconnect).
///
/// After its last work (a request, an ack, a kick, a fence) the loop keeps polling without
/// sleeping for `poll`'s window ([`IdlePoll`], as the native device's loop does), acks
/// outstanding or not: acks and the guest's next command come sooner than a wake-up from
/// sleep (decision 039). Past the window it sleeps as before (up to the oldest ack's
/// deadline), so a slow frontend (QEMU's ack waits for its `ADD_MEM_REG` round trip) costs
/// at most one window of polling per burst.
pub fn serve_connection(
    stream: UnixStream,
    vu: &Arc<Mutex<VuGpu>>,
    mut poll_window: IdlePoll,
) -> Result<ConnectionEnd> {
    let mut handler = BackendReqHandler::from_stream(stream, vu.clone());
    // The handler keeps its socket to itself; a duplicate (same open file description)
    // is what the loop polls.
    let sock = handler
        .try_clone_connection()
        .map_err(|e| Error::Protocol(format!("dup of the vhost-user socket: {e}")))?;
    let mut last_work: Option<Instant> = None;
    loop {
        let spinning = last_work.is_some_and(|t| t.elapsed() < poll_window.window());
        let (socket_ready, channel_ready, kicked, busy) = {
            let g = lock(vu);
            let busy = g.dev.busy();
            let kicks = g.kick_fds();
            let channel = g.dev.gpu().placer().channel_fd();
            let mut fds = vec![PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
            fds.extend(channel.map(|fd| PollFd::new(fd, PollFlags::POLLIN)));
            let first_kick = fds.len();
            fds.extend(
                kicks
                    .iter()
                    .map(|(_, fd)| PollFd::new(*fd, PollFlags::POLLIN)),
            );
            // Parked fences wake the loop (poll_fences below); without an fd they are
            // polled every millisecond.
            let fences = g.dev.gpu().fence_fds();
            let fence_timer = g.dev.gpu().parked() > 0 && fences.is_empty();
            fds.extend(fences.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)));
            let sink_waits = g.dev.gpu().display().sink_pending();
            let timeout = if busy || spinning {
                PollTimeout::ZERO
            } else if fence_timer || sink_waits {
                PollTimeout::from(1u8)
            } else {
                match g.dev.gpu().placer().ack_deadline() {
                    // Rounded up to whole milliseconds (no spinning just before the
                    // deadline); a wait beyond u16 ms is cut short and recomputed.
                    Some(d) => {
                        let left = d.saturating_duration_since(Instant::now());
                        let ms = left.as_micros().div_ceil(1000);
                        PollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX))
                    }
                    None => PollTimeout::NONE,
                }
            };
            let sleeps = timeout != PollTimeout::ZERO;
            if sleeps {
                poll_window.sleeping(Instant::now());
            }
            let polled = poll(&mut fds, timeout);
            if sleeps {
                poll_window.woke(Instant::now());
            }
            let ready_fds = match polled {
                Ok(0) if spinning && !busy && !fence_timer && !sink_waits => {
                    // Nothing yet: poll again (the CPU to whoever else wants it first).
                    // Parked fences without an fd and a waiting frame go on below.
                    std::thread::yield_now();
                    continue;
                }
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(Error::Poll(e)),
            };
            if ready_fds > 0 || busy {
                // Something came (or the device works): poll a window again before
                // sleeping. A timed wake-up with nothing ready (a fence timer, a
                // deadline) is no work.
                last_work = Some(Instant::now());
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            let s = fds.first().is_some_and(ready);
            let c = channel.is_some() && fds.get(1).is_some_and(ready);
            let k: Vec<u16> = kicks
                .iter()
                .zip(fds.iter().skip(first_kick))
                .filter(|(_, f)| ready(f))
                .map(|((i, _), _)| *i)
                .collect();
            (s, c, k, busy)
        };
        if socket_ready {
            let r = if peek_request(&sock) == Some(SET_BACKEND_REQ_FD) {
                take_backend_channel(&sock, vu)
                    .map_err(|e| VuError::ReqHandlerError(std::io::Error::other(e)))
            } else {
                handler.handle_request()
            };
            match r {
                Ok(()) => {}
                Err(VuError::Disconnected) | Err(VuError::PartialMessage) => {
                    return Ok(ConnectionEnd::Disconnected)
                }
                Err(VuError::SocketBroken(e)) if e.raw_os_error() == Some(libc_econnreset()) => {
                    return Ok(ConnectionEnd::Disconnected)
                }
                Err(e) => {
                    log::warn!("vhost-user: frontend broke the protocol: {e}: closing");
                    return Ok(ConnectionEnd::ProtocolError(e.to_string()));
                }
            }
        }
        let mut g = lock(vu);
        if channel_ready {
            g.dev.gpu_mut().placer_mut().receive();
        }
        // Settle every command whose ack arrived (this also starts the commands that
        // waited behind them, which may send more requests).
        while g.dev.in_flight() > 0 && g.dev.gpu().placer().ready() > 0 {
            g.dev.finish_one();
        }
        if let Some(what) = g.dev.gpu().placer().overdue(Instant::now()) {
            let limit = g.dev.gpu().placer().ack_timeout();
            log::warn!(
                "vhost-user: no ack for {what} within {limit:?}: the frontend is broken, closing the connection"
            );
            return Ok(ConnectionEnd::AckTimeout(what));
        }
        g.dev.poll_fences();
        if g.dev.gpu().display().sink_pending() {
            g.dev.gpu_mut().display_mut().retry_sink();
        }
        if busy {
            g.dev.process_busy();
        }
        for index in kicked {
            g.dev.kick(index);
        }
    }
}

/// `ECONNRESET`, as `vhost` reports a peer that went away mid-message.
fn libc_econnreset() -> i32 {
    Errno::ECONNRESET as i32
}

/// Accepts frontends on `listener` one after the other, each with a fresh backend; after a
/// disconnect the device has reset (every blob and mapping dropped). Returns after
/// `opts.max_connections` connections, or never.
pub fn serve_listener(listener: &UnixListener, opts: &Options) -> Result<()> {
    serve_listener_with(listener, opts, None)
}

/// [`serve_listener`], the first frontend served by `first` (a backend made before, e.g.
/// on a render server's socket) instead of a fresh one.
pub fn serve_listener_with(
    listener: &UnixListener,
    opts: &Options,
    mut first: Option<Box<dyn Backend>>,
) -> Result<()> {
    let mut served = 0usize;
    loop {
        if opts.max_connections.is_some_and(|m| served >= m) {
            return Ok(());
        }
        let (stream, _) = listener
            .accept()
            .map_err(|e| Error::Protocol(format!("accept on the vhost-user socket: {e}")))?;
        served += 1;
        let backend = match first.take() {
            Some(b) => b,
            None => crate::process::make_backend_with(opts.backend, opts.test_ops, None)?,
        };
        log::info!(
            "vhost-user: frontend {served} connected (backend {}, region {:#x} bytes)",
            backend.name(),
            opts.shmem_size
        );
        let vu = Arc::new(Mutex::new(VuGpu::new(backend, opts.shmem_size)));
        lock(&vu)
            .device_mut()
            .gpu_mut()
            .placer_mut()
            .set_ack_timeout(opts.ack_timeout);
        lock(&vu)
            .device_mut()
            .gpu_mut()
            .set_blob_budget(opts.blob_budget);
        lock(&vu)
            .device_mut()
            .gpu_mut()
            .set_display(opts.display.clone());
        if let Some(tube) = &opts.frames {
            lock(&vu)
                .device_mut()
                .gpu_mut()
                .set_frame_sink(Box::new(crate::display::TubeSink::new(tube.clone())));
        }
        let end = serve_connection(stream, &vu, IdlePoll::new(opts.idle_poll_max))?;
        let mut g = lock(&vu);
        let st = g.dev.gpu().placer().stats();
        g.reset(true);
        log::info!(
            "vhost-user: frontend {served} gone ({end:?}): device reset; SHMEM_MAP acked {}, \
             SHMEM_UNMAP acked {}, refused {}, stale acks skipped {}",
            st.maps,
            st.unmaps,
            st.refused,
            st.stale_replies
        );
    }
}
