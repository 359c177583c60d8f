//! The hostmem protocol: the versioned handshake, the mapping tube's messages and the
//! control queue's framing.
//!
//! Mapping tube (serde_json), after both sides sent [`Hello`]:
//! * VMM → device: [`VmmMsg::Hostmem`] with the window memfd, then one [`VmmMsg::Reply`]
//!   per placement event, [`VmmMsg::Shutdown`] to stop.
//! * device → VMM: [`DeviceMsg::Ready`] once the mirror is mapped, then
//!   [`DeviceMsg::Map`] (with the blob's fd) and [`DeviceMsg::Unmap`] events, each answered
//!   by a `Reply` with the same `seq` before the guest's command completes, or several of
//!   them in one [`DeviceMsg::Batch`] (the Map events' fds in event order, at most
//!   [`MAX_BATCH`]), answered by one [`VmmMsg::Replies`] in event order.
//!
//! Transport tube (serde_json), the virtio transport's channel to the device, the way a
//! vhost-user frontend's socket is (the guest's commands never cross it: they live in
//! virtqueues in guest RAM):
//! * VMM → device: [`TransportMsg::GuestMemory`] (guest RAM memfds) once the device is ready,
//!   [`TransportMsg::QueueEnable`] (ring addresses + kick and call eventfds) when the guest
//!   enables a queue, [`TransportMsg::Reset`] when it resets the device,
//!   [`TransportMsg::Stats`] to read the virtqueue counters.
//! * device → VMM: one [`TransportReply`] per message, same `seq`, before the transport lets
//!   the guest go on (a reset completes only when the device has dropped everything).
//!
//! Closing the transport tube asks the device to exit.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tube::{Error, Message, Result, Tube};

/// The protocol version both sides must speak.
pub const PROTOCOL_VERSION: u32 = 1;

/// Most events in one [`DeviceMsg::Batch`] (each Map carries one fd; SCM_RIGHTS carries up
/// to 253 per message, the tube allows [`crate::tube::MAX_FDS`]).
pub const MAX_BATCH: usize = crate::tube::MAX_FDS;

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process on the host (the jail makes
/// no time namespace), so stamps taken in the driver, the device and the VMM compare.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| {
            u64::try_from(t.tv_sec())
                .unwrap_or(0)
                .saturating_mul(1_000_000_000)
                .saturating_add(u64::try_from(t.tv_nsec()).unwrap_or(0))
        })
        .unwrap_or(0)
}

/// What the VMM's mapping service stamped for one event of a traced batch
/// ([`monotonic_ns`]; `hostmem bench`'s per-hop breakdown, never in a normal run).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmStamps {
    /// The message holding the event was received and parsed.
    pub received: u64,
    /// The event passed every check (fd facts, invariant 1), before the placement.
    pub checked: u64,
    /// The VMM's own placement (or restore) is done.
    pub placed: u64,
    /// The reply holding the verdict was sent.
    pub replied: u64,
}

/// What the device stamped for one placement of a traced run ([`monotonic_ns`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceStamps {
    /// The device's poll loop woke on the kick that brought the command.
    pub woke: u64,
    /// The command reached the placer (chain read, command parsed, blob exported).
    pub begin: u64,
    /// The event left for the VMM (sendmsg returned).
    pub sent: u64,
    /// The device's own mirror placement (or restore) is done.
    pub mirror_done: u64,
    /// The VMM's verdict was received.
    pub reply: u64,
    /// The response is in the used ring (and the call eventfd signalled if asked).
    pub used: u64,
}

/// One traced placement: the device's stamps and the VMM's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRecord {
    /// The event's sequence number.
    pub seq: u64,
    /// A Map (else an Unmap).
    pub map: bool,
    /// Events in the tube message that carried it.
    pub batch: u32,
    /// The device's stamps.
    pub device: DeviceStamps,
    /// The VMM's stamps.
    pub vmm: VmmStamps,
}

/// One verdict of a [`VmmMsg::Replies`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchReply {
    /// The event's sequence number.
    pub seq: u64,
    /// What the VMM did.
    pub outcome: Outcome,
    /// The VMM's stamps, when the batch asked for them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamps: Option<VmmStamps>,
}

/// Which end of the tube a peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The VMM's mapping service.
    Vmm,
    /// The GPU device process.
    Device,
}

/// First message in each direction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the sender.
    pub version: u32,
    /// The sender's role.
    pub role: Role,
    /// The sender's pid as it sees itself (informational: 1 inside a pid namespace).
    pub pid: u32,
}

impl Hello {
    /// Our hello for `role`.
    pub fn new(role: Role) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            role,
            pid: std::process::id(),
        }
    }
}

/// Why the VMM refused a placement event; maps onto a virtio-gpu error response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseCode {
    /// Limits (VMA headroom, live placements, fds) reached: `ERR_OUT_OF_MEMORY`.
    OutOfMemory,
    /// A field failed validation: `ERR_INVALID_PARAMETER`.
    InvalidParameter,
    /// Anything else: `ERR_UNSPEC`.
    Unspec,
}

/// The VMM's answer to one placement event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Done: the VMM's window matches.
    Ok,
    /// Refused, nothing changed in the VMM's window.
    Refused {
        /// Category.
        code: RefuseCode,
        /// Human-readable reason (also logged by the VMM).
        reason: String,
    },
}

/// VMM → device on the mapping tube.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmmMsg {
    /// Handshake.
    Hello(Hello),
    /// The hostmem window's memfd (1 fd) and its size.
    Hostmem {
        /// Window size in bytes.
        size: u64,
    },
    /// Answer to the placement event `seq`.
    Reply {
        /// The event's sequence number.
        seq: u64,
        /// What the VMM did.
        outcome: Outcome,
    },
    /// Stop serving and exit.
    Shutdown,
    /// The answers to one [`DeviceMsg::Batch`], in its event order.
    Replies {
        /// One per event.
        replies: Vec<BatchReply>,
    },
}

/// device → VMM on the mapping tube.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceMsg {
    /// Handshake.
    Hello(Hello),
    /// The mirror is mapped; the device serves commands from now on.
    Ready {
        /// Backend name.
        backend: String,
        /// Capsets the backend offers (`virtio_gpu_config.num_capsets`).
        num_capsets: u32,
        /// Scanouts the device serves (its `--display`; `virtio_gpu_config.num_scanouts`).
        /// Absent (a device from before the field, same protocol version: an addition
        /// both sides read with a default, like [`FrameMsg::blob`]): 1.
        #[serde(default = "one_scanout")]
        num_scanouts: u32,
    },
    /// A blob was placed in the mirror (1 fd: the blob).
    Map {
        /// Event sequence number (echoed in the reply).
        seq: u64,
        /// The resource id of the guest's MAP_BLOB command.
        resource_id: u32,
        /// Window offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Offset of the blob in its fd.
        fd_offset: u64,
        /// PROT_* bits.
        prot: u32,
        /// VIRTIO_GPU_MAP_CACHE_* of the blob.
        map_info: u32,
    },
    /// A blob was removed from the mirror.
    Unmap {
        /// Event sequence number.
        seq: u64,
        /// Resource id.
        resource_id: u32,
        /// Window offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Several Map/Unmap events in one message (the Maps' fds in event order), answered by
    /// one [`VmmMsg::Replies`]. Anything else inside is refused.
    Batch {
        /// The events, oldest first.
        events: Vec<DeviceMsg>,
        /// Stamp each event ([`VmmStamps`] in the replies): `hostmem bench`'s breakdown.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        trace: bool,
    },
    /// A scanout's flushed frame (1 fd: a sealed memfd holding a 2D resource's pixels, or
    /// the blob a `SET_SCANOUT_BLOB` shows). No reply: the supervisor checks it
    /// (`hostmem_vmm::display`) and keeps a copy of the latest per scanout.
    Frame(FrameMsg),
    /// The cursor changed (no fd, no reply).
    Cursor(CursorMsg),
}

fn one_scanout() -> u32 {
    1
}

/// What [`DeviceMsg::Frame`] says about its fd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameMsg {
    /// The scanout.
    pub scanout_id: u32,
    /// The resource it shows.
    pub resource_id: u32,
    /// Framebuffer width in pixels.
    pub width: u32,
    /// Framebuffer height in pixels.
    pub height: u32,
    /// Bytes from one row to the next.
    pub stride: u32,
    /// `VIRTIO_GPU_FORMAT_*`.
    pub format: u32,
    /// Where the framebuffer's first byte is in the fd.
    pub offset: u64,
    /// What changed: `[x, y, width, height]` in framebuffer coordinates.
    pub rect: [u32; 4],
    /// The scanout's frame counter (1 for its first frame).
    pub seq: u64,
    /// The fd is a blob the guest may still write (a `SET_SCANOUT_BLOB`), not a sealed
    /// copy: the supervisor then does not ask for `F_SEAL_WRITE`.
    #[serde(default)]
    pub blob: bool,
}

/// What [`DeviceMsg::Cursor`] says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CursorMsg {
    /// The scanout.
    pub scanout_id: u32,
    /// Hot spot position.
    pub x: u32,
    /// Hot spot position.
    pub y: u32,
    /// The image's resource (0: hidden).
    pub resource_id: u32,
    /// Hot spot in the image.
    pub hot_x: u32,
    /// Hot spot in the image.
    pub hot_y: u32,
    /// [`image_hash`] of the image's pixels as the device copied them at `UPDATE_CURSOR`
    /// (0 when hidden; absent from an older device: 0).
    #[serde(default)]
    pub image_hash: u64,
}

/// The hash [`CursorMsg::image_hash`] carries: FNV-1a (64-bit) over the bytes.
pub fn image_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Message for VmmMsg {
    fn fd_count(&self) -> usize {
        usize::from(matches!(self, VmmMsg::Hostmem { .. }))
    }
}

impl Message for DeviceMsg {
    fn fd_count(&self) -> usize {
        match self {
            DeviceMsg::Map { .. } | DeviceMsg::Frame(_) => 1,
            DeviceMsg::Batch { events, .. } => events
                .iter()
                .filter(|e| matches!(e, DeviceMsg::Map { .. }))
                .count(),
            _ => 0,
        }
    }
}

/// One guest RAM region; each travels with its own fd (a memfd), in the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegion {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset of the region in its fd.
    pub fd_offset: u64,
}

/// Split-virtqueue setup as the driver wrote it to the common configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSetup {
    /// Queue index (0 controlq, 1 cursorq).
    pub index: u16,
    /// Queue size the driver chose.
    pub size: u16,
    /// Guest-physical address of the descriptor table.
    pub desc: u64,
    /// Guest-physical address of the available ring (driver area).
    pub avail: u64,
    /// Guest-physical address of the used ring (device area).
    pub used: u64,
    /// `VIRTIO_F_RING_EVENT_IDX` was negotiated.
    pub event_idx: bool,
}

/// VMM (virtio transport) → device on the transport tube.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransportMsg {
    /// Guest RAM, `regions.len()` fds in the same order. Replaces any earlier memory.
    GuestMemory {
        /// Sequence number (echoed in the reply).
        seq: u64,
        /// The regions.
        regions: Vec<GuestRegion>,
    },
    /// The driver enabled a queue (2 fds: its kick eventfd, then its call eventfd).
    QueueEnable {
        /// Sequence number.
        seq: u64,
        /// Where the rings are.
        queue: QueueSetup,
    },
    /// The driver reset the device (status 0): drop every queue, context and blob (blobs
    /// mapped in the window are unmapped through the mapping tube first).
    Reset {
        /// Sequence number.
        seq: u64,
    },
    /// Read the virtqueue counters.
    Stats {
        /// Sequence number.
        seq: u64,
    },
    /// `hostmem bench`'s breakdown: start (`on`, dropping older records) or stop stamping
    /// placements ([`TraceRecord`]). Answered `Done`. Only with the cargo feature `trace`.
    #[cfg(feature = "trace")]
    Trace {
        /// Sequence number.
        seq: u64,
        /// Stamp from now on.
        on: bool,
    },
    /// Hand over (and forget) the oldest trace records, as many as fit in one message:
    /// answered [`TransportReply::Trace`] (empty when there are no more). Only with the
    /// cargo feature `trace`.
    #[cfg(feature = "trace")]
    TraceTake {
        /// Sequence number.
        seq: u64,
    },
}

/// What the device counted on its virtqueues since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStats {
    /// Kicks: the sum of the kick eventfds' counters the device read.
    pub kicks: u64,
    /// Wake-ups on a kick eventfd.
    pub wakeups: u64,
    /// Descriptor chains taken from the available rings.
    pub chains: u64,
    /// Chains answered with an error response or dropped as malformed.
    pub bad_chains: u64,
    /// Call eventfd signals (used-buffer notifications the driver asked for).
    pub interrupts: u64,
    /// Used-buffer notifications the driver suppressed (`VRING_AVAIL_F_NO_INTERRUPT` or
    /// event index): it polls the used ring.
    pub suppressed: u64,
    /// What the device refused of the guest (bad chains, bad commands, refused transport
    /// messages), by kind: every one counted, logged only the 1st, 2nd, 4th, … time. The
    /// device's own claim; the VMM keeps at most `log_limit::MAX_KINDS` kinds of it.
    #[serde(default)]
    pub warnings: std::collections::BTreeMap<String, u64>,
    /// The device's blob memory budget in bytes (0: none): CREATE_BLOB past it is refused.
    #[serde(default)]
    pub blob_budget: u64,
    /// Most bytes its live blobs held at once.
    #[serde(default)]
    pub blob_bytes_max: u64,
    /// CREATE_BLOBs it refused at the budget.
    #[serde(default)]
    pub blob_budget_refusals: u64,
}

/// device → VMM on the transport tube: the answer to the [`TransportMsg`] with `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransportReply {
    /// Done (`error: None`) or refused with the reason (also logged by the device).
    Done {
        /// The message's sequence number.
        seq: u64,
        /// Why it was refused.
        error: Option<String>,
    },
    /// The counters.
    Stats {
        /// The message's sequence number.
        seq: u64,
        /// The counters.
        stats: QueueStats,
    },
    /// The trace records, oldest first (cargo feature `trace`).
    #[cfg(feature = "trace")]
    Trace {
        /// The message's sequence number.
        seq: u64,
        /// The records.
        records: Vec<TraceRecord>,
    },
}

impl Message for TransportMsg {
    fn fd_count(&self) -> usize {
        match self {
            TransportMsg::GuestMemory { regions, .. } => regions.len(),
            TransportMsg::QueueEnable { .. } => 2,
            _ => 0,
        }
    }
}

impl Message for TransportReply {
    fn fd_count(&self) -> usize {
        0
    }
}

/// Any message that can carry a `Hello`.
pub trait HelloMessage: Message {
    /// Wraps a hello.
    fn hello(h: Hello) -> Self;
    /// The hello inside, if this is one.
    fn as_hello(&self) -> Option<&Hello>;
}

impl HelloMessage for VmmMsg {
    fn hello(h: Hello) -> Self {
        VmmMsg::Hello(h)
    }
    fn as_hello(&self) -> Option<&Hello> {
        match self {
            VmmMsg::Hello(h) => Some(h),
            _ => None,
        }
    }
}

impl HelloMessage for DeviceMsg {
    fn hello(h: Hello) -> Self {
        DeviceMsg::Hello(h)
    }
    fn as_hello(&self) -> Option<&Hello> {
        match self {
            DeviceMsg::Hello(h) => Some(h),
            _ => None,
        }
    }
}

/// Sends our `Hello` as `Out` and waits (up to `timeout`) for the peer's as `In`. Refuses
/// a peer of another protocol version or of our own role.
pub fn handshake<Out: HelloMessage, In: HelloMessage>(
    tube: &Tube,
    role: Role,
    timeout: Duration,
) -> Result<Hello> {
    tube.send(&Out::hello(Hello::new(role)), &[])?;
    tube.set_recv_timeout(Some(timeout))?;
    let got = tube.recv::<In>();
    tube.set_recv_timeout(None)?;
    let (msg, _fds) = got?;
    let hello = msg
        .as_hello()
        .ok_or_else(|| Error::Handshake("first message is not Hello".into()))?
        .clone();
    if hello.version != PROTOCOL_VERSION {
        return Err(Error::Handshake(format!(
            "peer speaks protocol {}, we speak {PROTOCOL_VERSION}",
            hello.version
        )));
    }
    if hello.role == role {
        return Err(Error::Handshake(format!(
            "peer claims our own role {role:?}"
        )));
    }
    Ok(hello)
}
