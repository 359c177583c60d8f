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
//!
//! [`VirtioGpu`]: crate::virtio::VirtioGpu
//! [`Gpu`]: crate::gpu::Gpu
//! [`BackendReqHandler`]: vhost::vhost_user::BackendReqHandler
//! [`IdlePoll`]: crate::process::IdlePoll
//! [`Gpu::set_backing_exclusions`]: crate::gpu::Gpu::set_backing_exclusions
//! [`Placer`]: crate::gpu::Placer
//! [`VirtioGpu::finish_one`]: crate::virtio::VirtioGpu::finish_one
//! [`Placer::verdicts_async`]: crate::gpu::Placer::verdicts_async

use std::sync::Arc;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserProtocolFeatures;

use crate::display::DisplayConfig;
use crate::process::IDLE_POLL_MAX;

mod channel;
mod handler;
mod poll;

pub use channel::{
    BackendChannel, ShmemPlacer, ACK_TIMEOUT, BACKEND_SHMEM_MAP, BACKEND_SHMEM_UNMAP,
    MMAP_BODY_SIZE, MSG_HEADER_SIZE, SET_BACKEND_REQ_FD,
};
pub use handler::{VuGpu, VHOST_USER_WARNINGS};
pub use poll::{serve_connection, serve_listener, serve_listener_with, ConnectionEnd};

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
    ///
    /// [`Gpu::set_blob_budget`]: crate::gpu::Gpu::set_blob_budget
    pub blob_budget: Option<u64>,
    /// The scanouts ([`Gpu::set_display`]).
    ///
    /// [`Gpu::set_display`]: crate::gpu::Gpu::set_display
    pub display: DisplayConfig,
    /// The tube flushed frames go to (the supervisor's control tube; a [`TubeSink`] per
    /// connection on it). `None`: frames are kept nowhere.
    ///
    /// [`TubeSink`]: crate::display::TubeSink
    pub frames: Option<Arc<hostmem_ipc::Tube>>,
    /// How long the poll loop may keep polling after its last work before it sleeps
    /// (`--idle-poll-max-us`; the window adapts up to this, [`IdlePoll`]). Zero: it sleeps
    /// at once.
    ///
    /// [`IdlePoll`]: crate::process::IdlePoll
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
