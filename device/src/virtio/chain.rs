//! Checking descriptor chains: [`read_chain`] gathers a request within its limits or says why
//! not ([`BadChain`]); [`write_segments`] writes a response into the writable part.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::wire::{
    CtrlHdr, ErrorCode, CTRL_HDR_SIZE, RESP_CAPSET_INFO_SIZE, RESP_DISPLAY_INFO_SIZE,
    RESP_EDID_SIZE, RESP_MAP_INFO_SIZE, RESP_RESOURCE_UUID_SIZE, VIRTIO_GPU_CMD_GET_CAPSET_INFO,
    VIRTIO_GPU_CMD_GET_DISPLAY_INFO, VIRTIO_GPU_CMD_GET_EDID, VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID,
    VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB,
};

use super::DESC_SIZE;

/// One device-writable buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A well-formed control chain: the request bytes and where the response goes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// The device-readable part, concatenated.
    pub request: Vec<u8>,
    /// The device-writable part, in order.
    pub writable: Vec<Segment>,
    /// Total bytes of `writable`.
    pub writable_len: usize,
}

/// Why a descriptor chain was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BadChain {
    /// The head index is not below the queue size (cannot be returned used: dropped).
    HeadOutOfRange,
    /// The head is already in flight (answering it twice would corrupt the used ring:
    /// dropped).
    HeadInFlight,
    /// More descriptors than the queue has: a loop, or a chain longer than the queue.
    TooLong,
    /// A `next` index not below the queue size.
    NextOutOfRange,
    /// A descriptor could not be read (descriptor table outside RAM).
    DescriptorUnreadable,
    /// An indirect descriptor (VIRTIO_RING_F_INDIRECT_DESC is not offered).
    Indirect,
    /// `addr + len` or the sum of lengths overflows.
    LengthOverflow,
    /// A buffer lies (partly) outside guest RAM.
    OutsideRam,
    /// A device-readable descriptor after a device-writable one.
    WritableBeforeReadable,
    /// The device-readable part exceeds [`MAX_REQUEST`].
    ///
    /// [`MAX_REQUEST`]: super::MAX_REQUEST
    RequestTooLarge,
    /// The writable part cannot hold the response's fixed part.
    ResponseTooSmall,
    /// The avail ring's index runs more than a queue size ahead: the queue is dropped until
    /// the next reset.
    AvailIndex,
    /// Writing the used ring failed.
    UsedRing,
}

impl BadChain {
    /// Every kind, for counters.
    pub const ALL: [BadChain; 13] = [
        BadChain::HeadOutOfRange,
        BadChain::HeadInFlight,
        BadChain::TooLong,
        BadChain::NextOutOfRange,
        BadChain::DescriptorUnreadable,
        BadChain::Indirect,
        BadChain::LengthOverflow,
        BadChain::OutsideRam,
        BadChain::WritableBeforeReadable,
        BadChain::RequestTooLarge,
        BadChain::ResponseTooSmall,
        BadChain::AvailIndex,
        BadChain::UsedRing,
    ];

    /// The error response a refused chain gets when it has room for one.
    pub fn code(self) -> ErrorCode {
        match self {
            BadChain::OutsideRam | BadChain::RequestTooLarge => ErrorCode::InvalidParameter,
            _ => ErrorCode::Unspec,
        }
    }

    /// A short description for the log.
    pub fn describe(self) -> &'static str {
        match self {
            BadChain::HeadOutOfRange => "head index beyond the queue",
            BadChain::HeadInFlight => "head index already in flight",
            BadChain::TooLong => "descriptor loop or chain longer than the queue",
            BadChain::NextOutOfRange => "next index beyond the queue",
            BadChain::DescriptorUnreadable => "descriptor outside guest RAM",
            BadChain::Indirect => "indirect descriptor (not negotiated)",
            BadChain::LengthOverflow => "descriptor lengths overflow",
            BadChain::OutsideRam => "buffer outside guest RAM",
            BadChain::WritableBeforeReadable => "readable descriptor after a writable one",
            BadChain::RequestTooLarge => "request larger than the device accepts",
            BadChain::ResponseTooSmall => "writable part too small for the response",
            BadChain::AvailIndex => "avail index more than a queue size ahead",
            BadChain::UsedRing => "used ring not writable",
        }
    }
}

impl std::fmt::Display for BadChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

/// A refused chain and what of it can still carry an error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// Why.
    pub kind: BadChain,
    /// Writable buffers seen (in RAM, after the readable part) before or besides the error.
    pub writable: Vec<Segment>,
    /// Their total length.
    pub writable_len: usize,
    /// The request's header, if 24 readable bytes were read (its fence is echoed).
    pub hdr: Option<CtrlHdr>,
}

/// Walks the chain at `head` in the descriptor table at `desc_table` of a queue of
/// `queue_size` entries, copying its readable part (at most `max_request` bytes). Never
/// panics and never reads outside `mem`, whatever the descriptors say.
pub fn read_chain<M: GuestMemory>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
    max_request: usize,
) -> std::result::Result<Chain, Refused> {
    let mut chain = Chain::default();
    let mut deferred: Option<BadChain> = None;
    let mut seen_writable = false;
    let mut readable_len: usize = 0;
    let mut idx = head;
    let mut count: u32 = 0;
    let stop = loop {
        if idx >= queue_size {
            break Some(if count == 0 {
                BadChain::HeadOutOfRange
            } else {
                BadChain::NextOutOfRange
            });
        }
        count += 1;
        if count > u32::from(queue_size) {
            break Some(BadChain::TooLong);
        }
        let Some(at) = desc_table.0.checked_add(u64::from(idx) * DESC_SIZE) else {
            break Some(BadChain::DescriptorUnreadable);
        };
        let Ok(d) = mem.read_obj::<Descriptor>(GuestAddress(at)) else {
            break Some(BadChain::DescriptorUnreadable);
        };
        if d.refers_to_indirect_table() {
            break Some(BadChain::Indirect);
        }
        let addr = d.addr().0;
        let len = d.len();
        let in_ram = match addr.checked_add(u64::from(len)) {
            None => {
                deferred.get_or_insert(BadChain::LengthOverflow);
                false
            }
            Some(_) => {
                len == 0
                    || mem.check_range(
                        GuestAddress(addr),
                        len as usize,
                        vm_memory::Permissions::ReadWrite,
                    )
            }
        };
        if d.is_write_only() {
            seen_writable = true;
            if in_ram {
                match chain.writable_len.checked_add(len as usize) {
                    Some(n) => {
                        chain.writable_len = n;
                        chain.writable.push(Segment { addr, len });
                    }
                    None => {
                        deferred.get_or_insert(BadChain::LengthOverflow);
                    }
                }
            } else {
                deferred.get_or_insert(BadChain::OutsideRam);
            }
        } else {
            if seen_writable {
                break Some(BadChain::WritableBeforeReadable);
            }
            match readable_len.checked_add(len as usize) {
                Some(n) if n <= max_request => readable_len = n,
                _ => {
                    deferred.get_or_insert(BadChain::RequestTooLarge);
                }
            }
            if !in_ram {
                deferred.get_or_insert(BadChain::OutsideRam);
            } else if deferred.is_none() && len > 0 {
                let old = chain.request.len();
                chain.request.resize(readable_len, 0);
                let dst = chain.request.get_mut(old..).unwrap_or_default();
                if mem.read_slice(dst, GuestAddress(addr)).is_err() {
                    deferred.get_or_insert(BadChain::OutsideRam);
                }
            }
        }
        if !d.has_next() {
            break None;
        }
        idx = d.next();
    };
    match stop.or(deferred) {
        None => Ok(chain),
        Some(kind) => Err(Refused {
            kind,
            hdr: CtrlHdr::parse(&chain.request).ok(),
            writable: chain.writable,
            writable_len: chain.writable_len,
        }),
    }
}

/// Writes `bytes` into `segments` in order; returns how many bytes were written (at most the
/// segments' total).
pub fn write_segments<M: GuestMemory>(mem: &M, segments: &[Segment], bytes: &[u8]) -> usize {
    let mut done = 0usize;
    for s in segments {
        let Some(rest) = bytes.get(done..) else { break };
        if rest.is_empty() {
            break;
        }
        let n = rest.len().min(s.len as usize);
        let Some(part) = rest.get(..n) else { break };
        if mem.write_slice(part, GuestAddress(s.addr)).is_err() {
            break;
        }
        done += n;
    }
    done
}

/// The fixed part of the response to a request: what the writable part must hold before
/// the command runs.
pub fn min_response(request: &[u8]) -> usize {
    match CtrlHdr::parse(request).map(|h| h.type_) {
        Ok(VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB) => RESP_MAP_INFO_SIZE,
        Ok(VIRTIO_GPU_CMD_GET_CAPSET_INFO) => RESP_CAPSET_INFO_SIZE,
        Ok(VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID) => RESP_RESOURCE_UUID_SIZE,
        Ok(VIRTIO_GPU_CMD_GET_DISPLAY_INFO) => RESP_DISPLAY_INFO_SIZE,
        Ok(VIRTIO_GPU_CMD_GET_EDID) => RESP_EDID_SIZE,
        _ => CTRL_HDR_SIZE,
    }
}
