//! The `shm` backend: blobs are sealed memfds, and `SUBMIT_3D` carries a tiny command
//! stream that writes and reads blob memory as a renderer would.
//!
//! # Blobs
//!
//! Every blob (GUEST or HOST3D; HOST3D_GUEST is refused because there is no guest RAM
//! here) is a memfd of exactly the blob's size with its size sealed
//! (`F_SEAL_SHRINK | F_SEAL_GROW`), so a placement of it can never turn into a SIGBUS hole.
//! `blob_id` is ignored (there are no renderer objects). [`Backend::export_blob`] hands out
//! a dup of the memfd, `fd_offset` 0, map info `VIRTIO_GPU_MAP_CACHE_CACHED`.
//!
//! # Contexts and capsets
//!
//! Contexts are tracked by id. The backend offers one tiny fake capset,
//! [`SHM_CAPSET_ID`] (version 1, [`SHM_CAPSET_SIZE`] bytes: `b"HMSHM\0\0\0"`, the stream
//! version `1u32` and the bit mask of supported ops `0b1_1110u32`, little-endian). A context
//! may ask for capset 0 (default) or [`SHM_CAPSET_ID`].
//!
//! A blob belongs to the context named in its `RESOURCE_CREATE_BLOB` header, or to no
//! context (ctx 0: global). A stream may touch blobs of its own context and global blobs.
//! When a context is destroyed its blobs stay alive (the guest still owns the resource ids
//! and may have shared them) but become *orphaned*: no stream can touch them any more.
//!
//! # The command stream
//!
//! A sequence of ops, each a little-endian 24-byte head followed by op-specific bytes:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | `op`: 1 = FILL, 2 = WRITE, 3 = CHECKSUM, 4 = STORE_CHECKSUM |
//! | 4..8 | `resource_id` |
//! | 8..16 | `offset` (bytes into the blob) |
//! | 16..24 | `len` (bytes) |
//!
//! * FILL (`op` 1) is followed by `seed: u64`. It writes the pattern: the byte at blob
//!   offset `b` becomes byte `b % 8` of `pattern_qword(seed, b / 8).to_le_bytes()`, so
//!   qword `i` of the blob is [`pattern_qword`]`(seed, i)` ([`pattern_bytes`] computes it).
//! * WRITE (`op` 2) is followed by `len` data bytes, copied to the blob at `offset`.
//! * CHECKSUM (`op` 3) has nothing after the head; it appends [`checksum`] of the range as
//!   a `u64` LE to the reply (8 bytes per CHECKSUM, in stream order).
//! * STORE_CHECKSUM (`op` 4) is followed by `dst_offset: u64`. It writes [`checksum`] of
//!   the range as a `u64` LE at `dst_offset` in the same blob; those 8 bytes must lie
//!   inside the blob and outside the range. It exists because Linux's driver returns no
//!   `SUBMIT_3D` reply bytes to user space: a guest program reads the host's checksum
//!   through its mapping instead (tools/linux-guest).
//!
//! The whole stream is decoded and checked before anything runs (every resource exists and
//! is reachable from the context, every range is inside its blob with checked arithmetic),
//! so a bad stream changes nothing and fails with [`BackendError::InvalidParameter`].

use std::collections::BTreeMap;
use std::os::fd::AsFd;

use hostmem_base::mmap::{MemoryMapping, Prot};
use hostmem_base::shm::SharedMemory;

use super::{Backend, BackendError, BlobCreate, CapsetInfo, ExportedBlob};
use crate::wire::{
    VIRTIO_GPU_BLOB_MEM_GUEST, VIRTIO_GPU_BLOB_MEM_HOST3D, VIRTIO_GPU_MAP_CACHE_CACHED,
};

/// The shm backend's fake capset id: not a spec id (the spec assigns 1..=6, crosvm's
/// gfxstream up to 9), and below 32 because Linux 6.1 drops capset ids above 63 at probe
/// and builds `CONTEXT_INIT`'s capset mask with a 32-bit shift (31 is avoided too: the
/// shift of an `int` into its sign bit).
pub const SHM_CAPSET_ID: u32 = 29;
/// The fake capset's only version.
pub const SHM_CAPSET_VERSION: u32 = 1;
/// Size of the fake capset in bytes.
pub const SHM_CAPSET_SIZE: u32 = 16;
/// Version of the command stream format described in the module docs.
pub const SHM_STREAM_VERSION: u32 = 1;

/// Stream op code of FILL.
pub const OP_FILL: u32 = 1;
/// Stream op code of WRITE.
pub const OP_WRITE: u32 = 2;
/// Stream op code of CHECKSUM.
pub const OP_CHECKSUM: u32 = 3;
/// Stream op code of STORE_CHECKSUM.
pub const OP_STORE_CHECKSUM: u32 = 4;
/// The capset's op mask: bit `op` set for every op the backend runs.
pub const SHM_OPS_MASK: u32 =
    (1 << OP_FILL) | (1 << OP_WRITE) | (1 << OP_CHECKSUM) | (1 << OP_STORE_CHECKSUM);
/// Bytes of an op head (`op`, `resource_id`, `offset`, `len`).
pub const OP_HEAD_SIZE: usize = 24;

/// The fake capset's bytes (see the module docs).
pub fn shm_capset_bytes() -> Vec<u8> {
    let mut v = b"HMSHM\0\0\0".to_vec();
    v.extend_from_slice(&SHM_STREAM_VERSION.to_le_bytes());
    v.extend_from_slice(&SHM_OPS_MASK.to_le_bytes());
    v
}

/// Qword `index` (counted from the start of the blob) of the FILL pattern with `seed`:
/// `splitmix64(seed ^ index)`, where splitmix64 adds `0x9e3779b97f4a7c15` and applies the
/// standard finalizer (`z ^= z >> 30; z *= 0xbf58476d1ce4e5b9; z ^= z >> 27;
/// z *= 0x94d049bb133111eb; z ^= z >> 31`), all wrapping.
pub fn pattern_qword(seed: u64, index: u64) -> u64 {
    hostmem_base::rng::mix(seed ^ index)
}

/// The bytes FILL writes to blob range `offset..offset + len` with `seed`.
pub fn pattern_bytes(seed: u64, offset: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    pattern_extend(&mut out, seed, offset, len);
    out
}

fn pattern_extend(out: &mut Vec<u8>, seed: u64, offset: u64, len: usize) {
    let mut pos = offset;
    let end = offset.saturating_add(len as u64);
    while pos < end {
        let q = pattern_qword(seed, pos / 8).to_le_bytes();
        let from = (pos % 8) as usize;
        let take = (8 - from).min((end - pos) as usize);
        out.extend_from_slice(&q[from..from + take]);
        pos += take as u64;
    }
}

/// FNV-1a 64 offset basis.
pub const CHECKSUM_INIT: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The checksum CHECKSUM reports: 64-bit FNV-1a over the bytes (start at
/// `0xcbf29ce484222325`; per byte `h ^= byte; h = h.wrapping_mul(0x100000001b3)`). The
/// checksum of nothing is the offset basis. [`Checksum`] computes it incrementally.
pub fn checksum(bytes: &[u8]) -> u64 {
    let mut c = Checksum::new();
    c.update(bytes);
    c.value()
}

/// Incremental [`checksum`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checksum(u64);

impl Default for Checksum {
    fn default() -> Self {
        Self::new()
    }
}

impl Checksum {
    /// The checksum of nothing.
    pub fn new() -> Self {
        Checksum(CHECKSUM_INIT)
    }
    /// Feeds more bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(FNV_PRIME);
        }
        self.0 = h;
    }
    /// The checksum so far.
    pub fn value(&self) -> u64 {
        self.0
    }
}

/// One op of the shm command stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShmOp {
    /// Write the [`pattern_qword`] pattern with `seed` to `offset..offset + len`.
    Fill {
        /// Blob.
        resource_id: u32,
        /// Start in the blob.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Pattern seed.
        seed: u64,
    },
    /// Copy `data` to the blob at `offset`.
    Write {
        /// Blob.
        resource_id: u32,
        /// Start in the blob.
        offset: u64,
        /// The bytes (`len` on the wire is `data.len()`).
        data: Vec<u8>,
    },
    /// Append [`checksum`] of `offset..offset + len` (u64 LE) to the reply.
    Checksum {
        /// Blob.
        resource_id: u32,
        /// Start in the blob.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Write [`checksum`] of `offset..offset + len` (u64 LE) at `dst_offset` in the blob.
    StoreChecksum {
        /// Blob.
        resource_id: u32,
        /// Start in the blob.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Where the 8 checksum bytes go (inside the blob, outside the range).
        dst_offset: u64,
    },
}

impl ShmOp {
    /// The blob it touches.
    pub fn resource_id(&self) -> u32 {
        match self {
            ShmOp::Fill { resource_id, .. }
            | ShmOp::Write { resource_id, .. }
            | ShmOp::Checksum { resource_id, .. }
            | ShmOp::StoreChecksum { resource_id, .. } => *resource_id,
        }
    }

    /// The blob range it touches, as (offset, len).
    pub fn range(&self) -> (u64, u64) {
        match self {
            ShmOp::Fill { offset, len, .. }
            | ShmOp::Checksum { offset, len, .. }
            | ShmOp::StoreChecksum { offset, len, .. } => (*offset, *len),
            ShmOp::Write { offset, data, .. } => (*offset, data.len() as u64),
        }
    }

    /// Checks that everything the op touches lies inside a blob of `size` bytes (checked
    /// arithmetic): its range, and for STORE_CHECKSUM the 8 destination bytes, which must
    /// not overlap the range.
    pub fn check_within(&self, size: u64) -> Result<(), String> {
        let (offset, len) = self.range();
        let end = match offset.checked_add(len) {
            Some(end) if end <= size => end,
            _ => {
                return Err(format!(
                    "range {offset:#x}+{len:#x} outside a blob of {size:#x} bytes"
                ))
            }
        };
        if let ShmOp::StoreChecksum { dst_offset, .. } = self {
            let dst = *dst_offset;
            match dst.checked_add(8) {
                Some(dst_end) if dst_end <= size => {
                    if dst < end && offset < dst_end {
                        return Err(format!(
                            "checksum destination {dst:#x} overlaps its range {offset:#x}+{len:#x}"
                        ));
                    }
                }
                _ => {
                    return Err(format!(
                        "checksum destination {dst:#x}+8 outside a blob of {size:#x} bytes"
                    ))
                }
            }
        }
        Ok(())
    }

    /// Appends this op's encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let (op, extra): (u32, &[u8]) = match self {
            ShmOp::Fill { .. } => (OP_FILL, &[]),
            ShmOp::Write { data, .. } => (OP_WRITE, data),
            ShmOp::Checksum { .. } => (OP_CHECKSUM, &[]),
            ShmOp::StoreChecksum { .. } => (OP_STORE_CHECKSUM, &[]),
        };
        let (offset, len) = self.range();
        out.extend_from_slice(&op.to_le_bytes());
        out.extend_from_slice(&self.resource_id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&len.to_le_bytes());
        if let ShmOp::Fill { seed, .. } = self {
            out.extend_from_slice(&seed.to_le_bytes());
        }
        if let ShmOp::StoreChecksum { dst_offset, .. } = self {
            out.extend_from_slice(&dst_offset.to_le_bytes());
        }
        out.extend_from_slice(extra);
    }
}

/// Runs one op on `start..start + len` of a mapping of the whole blob (offset 0 of the
/// mapping is offset 0 of the blob) through its `write` and `read` (the shm backend's own
/// mapping of a blob; for virgl's test ops, the renderer's), in chunks of 64 KiB. CHECKSUM
/// appends its value to `reply`; STORE_CHECKSUM writes it at its `dst_offset` (checked by
/// the caller with [`ShmOp::check_within`]).
pub fn apply_op(
    op: &ShmOp,
    start: usize,
    len: usize,
    mut write: impl FnMut(usize, &[u8]) -> Result<(), BackendError>,
    mut read: impl FnMut(usize, &mut [u8]) -> Result<(), BackendError>,
    reply: &mut Vec<u8>,
) -> Result<(), BackendError> {
    /// Size of the chunks FILL and CHECKSUM work in.
    const CHUNK: usize = 64 * 1024;
    match op {
        ShmOp::Fill { seed, .. } => {
            let mut buf = Vec::with_capacity(CHUNK.min(len));
            let mut done = 0usize;
            while done < len {
                let n = CHUNK.min(len - done);
                buf.clear();
                pattern_extend(&mut buf, *seed, (start + done) as u64, n);
                write(start + done, &buf)?;
                done += n;
            }
        }
        ShmOp::Write { data, .. } => write(start, data)?,
        ShmOp::Checksum { .. } | ShmOp::StoreChecksum { .. } => {
            let mut c = Checksum::new();
            let mut buf = vec![0u8; CHUNK.min(len)];
            let mut done = 0usize;
            while done < len {
                let n = CHUNK.min(len - done);
                read(start + done, &mut buf[..n])?;
                c.update(&buf[..n]);
                done += n;
            }
            let value = c.value().to_le_bytes();
            match op {
                ShmOp::StoreChecksum { dst_offset, .. } => {
                    let dst = usize::try_from(*dst_offset).map_err(|_| {
                        bad(format!("checksum destination {dst_offset:#x} too large"))
                    })?;
                    write(dst, &value)?;
                }
                _ => reply.extend_from_slice(&value),
            }
        }
    }
    Ok(())
}

/// Encodes a stream of ops (the `SUBMIT_3D` payload for the shm backend).
pub fn encode_stream(ops: &[ShmOp]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        op.encode_into(&mut out);
    }
    out
}

fn bad(msg: String) -> BackendError {
    BackendError::InvalidParameter(msg)
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn read_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(at..at.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// Decodes a stream (syntax only: op codes and lengths). Never panics; a WRITE whose `len`
/// exceeds the bytes left is refused before anything is allocated.
pub fn decode_stream(mut b: &[u8]) -> Result<Vec<ShmOp>, BackendError> {
    let mut ops = Vec::new();
    let mut at = 0usize;
    while !b.is_empty() {
        let head = |what| bad(format!("stream offset {at}: truncated {what}"));
        let op = read_u32(b, 0).ok_or_else(|| head("op head"))?;
        let resource_id = read_u32(b, 4).ok_or_else(|| head("op head"))?;
        let offset = read_u64(b, 8).ok_or_else(|| head("op head"))?;
        let len = read_u64(b, 16).ok_or_else(|| head("op head"))?;
        let (op, used) = match op {
            OP_FILL => {
                let seed = read_u64(b, OP_HEAD_SIZE).ok_or_else(|| head("FILL seed"))?;
                let op = ShmOp::Fill {
                    resource_id,
                    offset,
                    len,
                    seed,
                };
                (op, OP_HEAD_SIZE + 8)
            }
            OP_WRITE => {
                let avail = b.len() - OP_HEAD_SIZE;
                let n = usize::try_from(len)
                    .ok()
                    .filter(|&n| n <= avail)
                    .ok_or_else(|| {
                        bad(format!(
                            "stream offset {at}: WRITE of {len} bytes but {avail} follow"
                        ))
                    })?;
                let data = b[OP_HEAD_SIZE..OP_HEAD_SIZE + n].to_vec();
                let op = ShmOp::Write {
                    resource_id,
                    offset,
                    data,
                };
                (op, OP_HEAD_SIZE + n)
            }
            OP_CHECKSUM => {
                let op = ShmOp::Checksum {
                    resource_id,
                    offset,
                    len,
                };
                (op, OP_HEAD_SIZE)
            }
            OP_STORE_CHECKSUM => {
                let dst_offset =
                    read_u64(b, OP_HEAD_SIZE).ok_or_else(|| head("STORE_CHECKSUM dst_offset"))?;
                let op = ShmOp::StoreChecksum {
                    resource_id,
                    offset,
                    len,
                    dst_offset,
                };
                (op, OP_HEAD_SIZE + 8)
            }
            other => return Err(bad(format!("stream offset {at}: unknown op {other}"))),
        };
        ops.push(op);
        b = &b[used..];
        at += used;
    }
    Ok(ops)
}

/// Who may touch a blob from a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// Created with ctx 0: any context.
    Global,
    /// Created in this context.
    Ctx(u32),
    /// Its context was destroyed: no stream may touch it.
    Orphaned,
}

#[derive(Debug)]
struct ShmBlob {
    shm: SharedMemory,
    size: u64,
    owner: Owner,
}

#[derive(Debug)]
struct ShmContext {
    #[allow(dead_code)]
    capset_id: u32,
}

/// The shm backend (see the module docs).
#[derive(Debug, Default)]
pub struct ShmBackend {
    blobs: BTreeMap<u32, ShmBlob>,
    contexts: BTreeMap<u32, ShmContext>,
}

impl ShmBackend {
    /// An empty backend.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of live blobs.
    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    /// Number of live contexts.
    pub fn context_count(&self) -> usize {
        self.contexts.len()
    }

    /// Checks one decoded op against the blob table for context `ctx_id`.
    fn check_op(&self, ctx_id: u32, op: &ShmOp) -> Result<(), BackendError> {
        let id = op.resource_id();
        let blob = self
            .blobs
            .get(&id)
            .ok_or_else(|| bad(format!("stream names unknown resource {id}")))?;
        match blob.owner {
            Owner::Global => {}
            Owner::Ctx(c) if c == ctx_id => {}
            Owner::Ctx(c) => {
                return Err(bad(format!(
                    "resource {id} belongs to context {c}, not {ctx_id}"
                )))
            }
            Owner::Orphaned => {
                return Err(bad(format!("resource {id} belongs to a destroyed context")))
            }
        }
        op.check_within(blob.size)
            .map_err(|e| bad(format!("resource {id}: {e}")))
    }

    fn map(blob: &ShmBlob) -> Result<MemoryMapping, BackendError> {
        let size = usize::try_from(blob.size)
            .map_err(|_| BackendError::OutOfMemory(format!("blob of {:#x} bytes", blob.size)))?;
        MemoryMapping::from_fd(blob.shm.as_fd(), 0, size, Prot::READ_WRITE)
            .map_err(|e| BackendError::OutOfMemory(format!("mapping blob: {e}")))
    }

    fn run_op(&self, op: &ShmOp, reply: &mut Vec<u8>) -> Result<(), BackendError> {
        let blob = self
            .blobs
            .get(&op.resource_id())
            .ok_or_else(|| bad(format!("unknown resource {}", op.resource_id())))?;
        let (offset, len) = op.range();
        if len == 0 && !matches!(op, ShmOp::StoreChecksum { .. }) {
            if matches!(op, ShmOp::Checksum { .. }) {
                reply.extend_from_slice(&CHECKSUM_INIT.to_le_bytes());
            }
            return Ok(());
        }
        let map = Self::map(blob)?;
        // check_op proved offset + len <= size, and size fits usize (map succeeded).
        let start = offset as usize;
        let len = len as usize;
        let io = |e: hostmem_base::Error| BackendError::Unspec(format!("blob access: {e}"));
        apply_op(
            op,
            start,
            len,
            |at, b| map.write_slice(at, b).map_err(io),
            |at, b| map.read_slice(at, b).map_err(io),
            reply,
        )?;
        Ok(())
    }
}

impl Backend for ShmBackend {
    fn name(&self) -> &'static str {
        "shm"
    }

    fn capsets(&self) -> Vec<CapsetInfo> {
        vec![CapsetInfo {
            id: SHM_CAPSET_ID,
            max_version: SHM_CAPSET_VERSION,
            max_size: SHM_CAPSET_SIZE,
        }]
    }

    fn capset(&mut self, id: u32, version: u32) -> Result<Vec<u8>, BackendError> {
        if id != SHM_CAPSET_ID || version == 0 || version > SHM_CAPSET_VERSION {
            return Err(BackendError::InvalidParameter(format!(
                "no capset {id} version {version}"
            )));
        }
        Ok(shm_capset_bytes())
    }

    fn create_context(
        &mut self,
        ctx_id: u32,
        capset_id: u32,
        name: &[u8],
    ) -> Result<(), BackendError> {
        if ctx_id == 0 || self.contexts.contains_key(&ctx_id) {
            return Err(BackendError::InvalidId(format!(
                "context {ctx_id} is zero or exists"
            )));
        }
        if capset_id != 0 && capset_id != SHM_CAPSET_ID {
            return Err(BackendError::InvalidParameter(format!(
                "capset {capset_id} not offered by the shm backend"
            )));
        }
        log::debug!(
            "shm: context {ctx_id} created ({:?})",
            String::from_utf8_lossy(name)
        );
        self.contexts.insert(ctx_id, ShmContext { capset_id });
        Ok(())
    }

    fn destroy_context(&mut self, ctx_id: u32) -> Result<(), BackendError> {
        if self.contexts.remove(&ctx_id).is_none() {
            return Err(BackendError::InvalidId(format!("no context {ctx_id}")));
        }
        for blob in self.blobs.values_mut() {
            if blob.owner == Owner::Ctx(ctx_id) {
                blob.owner = Owner::Orphaned;
            }
        }
        Ok(())
    }

    fn create_blob(&mut self, args: &BlobCreate) -> Result<(), BackendError> {
        let id = args.resource_id;
        if id == 0 || self.blobs.contains_key(&id) {
            return Err(BackendError::InvalidId(format!(
                "resource {id} is zero or exists"
            )));
        }
        if args.blob_mem != VIRTIO_GPU_BLOB_MEM_GUEST && args.blob_mem != VIRTIO_GPU_BLOB_MEM_HOST3D
        {
            return Err(BackendError::InvalidParameter(format!(
                "blob_mem {} not supported by the shm backend",
                args.blob_mem
            )));
        }
        if args.size == 0 || !hostmem_base::mmap::is_page_aligned(args.size) {
            return Err(BackendError::InvalidParameter(format!(
                "size {:#x} is zero or not page-aligned",
                args.size
            )));
        }
        let owner = match args.ctx_id {
            0 => Owner::Global,
            c if self.contexts.contains_key(&c) => Owner::Ctx(c),
            c => return Err(BackendError::InvalidId(format!("no context {c}"))),
        };
        let shm = SharedMemory::new(&format!("hostmem-blob-{id}"), args.size)
            .map_err(|e| BackendError::OutOfMemory(format!("memfd for resource {id}: {e}")))?;
        shm.seal_size()
            .map_err(|e| BackendError::Unspec(format!("sealing resource {id}: {e}")))?;
        self.blobs.insert(
            id,
            ShmBlob {
                shm,
                size: args.size,
                owner,
            },
        );
        Ok(())
    }

    fn unref(&mut self, resource_id: u32) -> Result<(), BackendError> {
        self.blobs
            .remove(&resource_id)
            .map(drop)
            .ok_or_else(|| BackendError::InvalidId(format!("no resource {resource_id}")))
    }

    fn submit_3d(&mut self, ctx_id: u32, stream: &[u8]) -> Result<Vec<u8>, BackendError> {
        if !self.contexts.contains_key(&ctx_id) {
            return Err(BackendError::InvalidId(format!("no context {ctx_id}")));
        }
        let ops = decode_stream(stream)?;
        for op in &ops {
            self.check_op(ctx_id, op)?;
        }
        let mut reply = Vec::new();
        for op in &ops {
            self.run_op(op, &mut reply)?;
        }
        Ok(reply)
    }

    fn export_blob(&mut self, resource_id: u32) -> Result<ExportedBlob, BackendError> {
        let blob = self
            .blobs
            .get(&resource_id)
            .ok_or_else(|| BackendError::InvalidId(format!("no resource {resource_id}")))?;
        let fd = blob.shm.try_clone_fd().map_err(|e| {
            BackendError::OutOfMemory(format!("dup of resource {resource_id}: {e}"))
        })?;
        Ok(ExportedBlob {
            fd,
            fd_offset: 0,
            size: blob.size,
            map_info: VIRTIO_GPU_MAP_CACHE_CACHED,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_is_qword_indexed_from_blob_start() {
        let b = pattern_bytes(7, 0, 24);
        assert_eq!(&b[8..16], &pattern_qword(7, 1).to_le_bytes());
        // An unaligned range is a window into the same byte sequence.
        assert_eq!(pattern_bytes(7, 5, 13), b[5..18].to_vec());
        assert_ne!(pattern_qword(7, 0), pattern_qword(8, 0));
    }

    #[test]
    fn checksum_is_fnv1a() {
        assert_eq!(checksum(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(checksum(b"a"), 0xaf63_dc4c_8601_ec8c);
        let mut c = Checksum::new();
        c.update(b"foo");
        c.update(b"bar");
        assert_eq!(c.value(), checksum(b"foobar"));
    }

    #[test]
    fn stream_round_trips() {
        let ops = vec![
            ShmOp::Fill {
                resource_id: 1,
                offset: 8,
                len: 64,
                seed: 3,
            },
            ShmOp::Write {
                resource_id: 2,
                offset: 0,
                data: vec![1, 2, 3],
            },
            ShmOp::Checksum {
                resource_id: 1,
                offset: 0,
                len: 4096,
            },
            ShmOp::StoreChecksum {
                resource_id: 1,
                offset: 0,
                len: 4088,
                dst_offset: 4088,
            },
        ];
        let bytes = encode_stream(&ops);
        // The STORE_CHECKSUM op: 24-byte head, then dst_offset.
        let last = &bytes[bytes.len() - 32..];
        assert_eq!(&last[0..4], &4u32.to_le_bytes());
        assert_eq!(&last[24..32], &4088u64.to_le_bytes());
        assert_eq!(decode_stream(&bytes).unwrap(), ops);
    }

    #[test]
    fn store_checksum_destination_is_checked() {
        let op = |offset, len, dst_offset| ShmOp::StoreChecksum {
            resource_id: 1,
            offset,
            len,
            dst_offset,
        };
        assert!(op(0, 4088, 4088).check_within(4096).is_ok());
        assert!(op(8, 8, 0).check_within(4096).is_ok());
        // Overlapping the range, outside the blob, overflowing.
        assert!(op(0, 4096, 4088).check_within(4096).is_err());
        assert!(op(0, 16, 12).check_within(4096).is_err());
        assert!(op(0, 8, 4089).check_within(4096).is_err());
        assert!(op(0, 8, u64::MAX - 3).check_within(4096).is_err());
        // A truncated dst_offset is refused.
        let mut b = encode_stream(&[op(0, 8, 8)]);
        b.truncate(b.len() - 1);
        assert!(decode_stream(&b).is_err());
    }

    #[test]
    fn bad_streams_are_refused() {
        let mut w = encode_stream(&[ShmOp::Write {
            resource_id: 1,
            offset: 0,
            data: vec![0; 8],
        }]);
        w.truncate(w.len() - 1);
        assert!(decode_stream(&w).is_err());
        assert!(decode_stream(&[1, 0, 0]).is_err());
        let mut u = encode_stream(&[ShmOp::Checksum {
            resource_id: 1,
            offset: 0,
            len: 0,
        }]);
        u[0] = 9;
        assert!(decode_stream(&u).is_err());
    }
}
