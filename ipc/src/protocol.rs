//! The hostmem protocol: the versioned handshake, the mapping tube's messages and the
//! control queue's framing.
//!
//! Mapping tube (serde_json), after both sides sent [`Hello`]:
//! * VMM → device: [`VmmMsg::Hostmem`] with the window memfd, then one [`VmmMsg::Reply`]
//!   per placement event, [`VmmMsg::Shutdown`] to stop.
//! * device → VMM: [`DeviceMsg::Ready`] once the mirror is mapped, then
//!   [`DeviceMsg::Map`] (with the blob's fd) and [`DeviceMsg::Unmap`] events, each answered
//!   by a `Reply` with the same `seq` before the guest's command completes.
//!
//! Control queue (raw bytes, the stand-in for a virtqueue): each request is an 8-byte
//! little-endian tag followed by one virtio-gpu command in its wire layout; each response
//! is the same tag followed by the response bytes.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tube::{Error, Message, Result, Tube};

/// The protocol version both sides must speak.
pub const PROTOCOL_VERSION: u32 = 1;

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
}

impl Message for VmmMsg {
    fn fd_count(&self) -> usize {
        usize::from(matches!(self, VmmMsg::Hostmem { .. }))
    }
}

impl Message for DeviceMsg {
    fn fd_count(&self) -> usize {
        usize::from(matches!(self, DeviceMsg::Map { .. }))
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

/// Control queue framing: `tag` then the command or response bytes.
pub fn frame(tag: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + payload.len());
    v.extend_from_slice(&tag.to_le_bytes());
    v.extend_from_slice(payload);
    v
}

/// Splits a control-queue frame into its tag and payload.
pub fn unframe(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let (tag, rest) = bytes.split_first_chunk::<8>()?;
    Some((u64::from_le_bytes(*tag), rest))
}
