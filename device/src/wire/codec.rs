//! Decoding and encoding commands: the bounds-checked [`Reader`], [`Command::parse`],
//! [`Command::encode`] and the type names.

use super::{
    Command, CtrlHdr, CtxCreate, GetCapset, GetCapsetInfo, MemEntry, ResourceCmd,
    ResourceCreateBlob, ResourceMapBlob, Submit3d, WireError, CTRL_HDR_SIZE, CTX_CREATE_SIZE,
    CTX_DEBUG_NAME_LEN, CTX_RESOURCE_SIZE, GET_CAPSET_INFO_SIZE, GET_CAPSET_SIZE, MEM_ENTRY_SIZE,
    RESOURCE_CREATE_BLOB_SIZE, RESOURCE_MAP_BLOB_SIZE, RESOURCE_UNREF_SIZE, SUBMIT_3D_SIZE,
    VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE, VIRTIO_GPU_CMD_CTX_CREATE, VIRTIO_GPU_CMD_CTX_DESTROY,
    VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE, VIRTIO_GPU_CMD_GET_CAPSET, VIRTIO_GPU_CMD_GET_CAPSET_INFO,
    VIRTIO_GPU_CMD_GET_DISPLAY_INFO, VIRTIO_GPU_CMD_GET_EDID, VIRTIO_GPU_CMD_MOVE_CURSOR,
    VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID, VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING,
    VIRTIO_GPU_CMD_RESOURCE_CREATE_2D, VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB,
    VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING, VIRTIO_GPU_CMD_RESOURCE_FLUSH,
    VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB, VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB,
    VIRTIO_GPU_CMD_RESOURCE_UNREF, VIRTIO_GPU_CMD_SET_SCANOUT, VIRTIO_GPU_CMD_SET_SCANOUT_BLOB,
    VIRTIO_GPU_CMD_SUBMIT_3D, VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D, VIRTIO_GPU_CMD_UPDATE_CURSOR,
    VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID, VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
    VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID, VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID,
    VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY, VIRTIO_GPU_RESP_ERR_UNSPEC, VIRTIO_GPU_RESP_OK_CAPSET,
    VIRTIO_GPU_RESP_OK_CAPSET_INFO, VIRTIO_GPU_RESP_OK_DISPLAY_INFO, VIRTIO_GPU_RESP_OK_EDID,
    VIRTIO_GPU_RESP_OK_MAP_INFO, VIRTIO_GPU_RESP_OK_NODATA, VIRTIO_GPU_RESP_OK_RESOURCE_UUID,
};

/// Bounds-checked little-endian reads from a buffer known to hold `need` bytes.
pub(super) struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(b: &'a [u8], what: &'static str, need: usize) -> Result<Self, WireError> {
        if b.len() < need {
            return Err(WireError::Truncated {
                what,
                need,
                got: b.len(),
            });
        }
        Ok(Reader { b })
    }
    // The constructor checked `need`; callers only read below it. `get` keeps even a
    // wrong offset from panicking (it reads as zero instead).
    pub(super) fn arr<const N: usize>(&self, at: usize) -> [u8; N] {
        self.b
            .get(at..at.saturating_add(N))
            .and_then(|s| s.try_into().ok())
            .unwrap_or([0; N])
    }
    pub(super) fn u8(&self, at: usize) -> u8 {
        self.arr::<1>(at)[0]
    }
    pub(super) fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.arr(at))
    }
    pub(super) fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.arr(at))
    }
}

pub(super) fn type_name(t: u32) -> &'static str {
    match t {
        VIRTIO_GPU_CMD_GET_DISPLAY_INFO => "GET_DISPLAY_INFO",
        VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB => "RESOURCE_CREATE_BLOB",
        VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB => "RESOURCE_MAP_BLOB",
        VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB => "RESOURCE_UNMAP_BLOB",
        VIRTIO_GPU_CMD_RESOURCE_UNREF => "RESOURCE_UNREF",
        VIRTIO_GPU_CMD_CTX_CREATE => "CTX_CREATE",
        VIRTIO_GPU_CMD_CTX_DESTROY => "CTX_DESTROY",
        VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE => "CTX_ATTACH_RESOURCE",
        VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE => "CTX_DETACH_RESOURCE",
        VIRTIO_GPU_CMD_SUBMIT_3D => "SUBMIT_3D",
        VIRTIO_GPU_CMD_GET_CAPSET_INFO => "GET_CAPSET_INFO",
        VIRTIO_GPU_CMD_GET_CAPSET => "GET_CAPSET",
        VIRTIO_GPU_CMD_RESOURCE_CREATE_2D => "RESOURCE_CREATE_2D",
        VIRTIO_GPU_CMD_SET_SCANOUT => "SET_SCANOUT",
        VIRTIO_GPU_CMD_RESOURCE_FLUSH => "RESOURCE_FLUSH",
        VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D => "TRANSFER_TO_HOST_2D",
        VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING => "RESOURCE_ATTACH_BACKING",
        VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING => "RESOURCE_DETACH_BACKING",
        VIRTIO_GPU_CMD_GET_EDID => "GET_EDID",
        VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID => "RESOURCE_ASSIGN_UUID",
        VIRTIO_GPU_CMD_SET_SCANOUT_BLOB => "SET_SCANOUT_BLOB",
        VIRTIO_GPU_CMD_UPDATE_CURSOR => "UPDATE_CURSOR",
        VIRTIO_GPU_CMD_MOVE_CURSOR => "MOVE_CURSOR",
        VIRTIO_GPU_RESP_OK_NODATA => "OK_NODATA",
        VIRTIO_GPU_RESP_OK_MAP_INFO => "OK_MAP_INFO",
        VIRTIO_GPU_RESP_OK_DISPLAY_INFO => "OK_DISPLAY_INFO",
        VIRTIO_GPU_RESP_OK_CAPSET_INFO => "OK_CAPSET_INFO",
        VIRTIO_GPU_RESP_OK_CAPSET => "OK_CAPSET",
        VIRTIO_GPU_RESP_OK_EDID => "OK_EDID",
        VIRTIO_GPU_RESP_OK_RESOURCE_UUID => "OK_RESOURCE_UUID",
        VIRTIO_GPU_RESP_ERR_UNSPEC => "ERR_UNSPEC",
        VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY => "ERR_OUT_OF_MEMORY",
        VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID => "ERR_INVALID_SCANOUT_ID",
        VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID => "ERR_INVALID_RESOURCE_ID",
        VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID => "ERR_INVALID_CONTEXT_ID",
        VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER => "ERR_INVALID_PARAMETER",
        _ => "unknown",
    }
}

/// A printable name of a command or response type (`"RESOURCE_MAP_BLOB"`, `"unknown"`).
pub fn ctrl_type_name(t: u32) -> &'static str {
    type_name(t)
}

pub(super) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_entries(out: &mut Vec<u8>, entries: &[MemEntry]) {
    for e in entries {
        put_u64(out, e.addr);
        put_u32(out, e.length);
        put_u32(out, e.padding);
    }
}

/// The first `nr_entries` mem entries in `bytes` (the caller checked they are there).
pub(super) fn mem_entries(bytes: &[u8], nr_entries: u32) -> Vec<MemEntry> {
    bytes
        .chunks_exact(MEM_ENTRY_SIZE)
        .take(nr_entries as usize)
        .map(|c| {
            let e = Reader { b: c };
            MemEntry {
                addr: e.u64(0),
                length: e.u32(8),
                padding: e.u32(12),
            }
        })
        .collect()
}

impl Command {
    /// Decodes one command. Never panics; see the module docs for what is checked.
    pub fn parse(bytes: &[u8]) -> Result<Command, WireError> {
        let hdr = CtrlHdr::parse(bytes)?;
        let t = hdr.type_;
        let name = type_name(t);
        match t {
            VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB => {
                let r = Reader::new(bytes, name, RESOURCE_CREATE_BLOB_SIZE)?;
                let nr_entries = r.u32(36);
                let avail = (bytes.len() - RESOURCE_CREATE_BLOB_SIZE) / MEM_ENTRY_SIZE;
                if nr_entries as usize > avail {
                    return Err(WireError::BadLength(format!(
                        "{name}: nr_entries {nr_entries} but the message holds {avail} entries"
                    )));
                }
                let entries = mem_entries(&bytes[RESOURCE_CREATE_BLOB_SIZE..], nr_entries);
                Ok(Command::ResourceCreateBlob(ResourceCreateBlob {
                    hdr,
                    resource_id: r.u32(24),
                    blob_mem: r.u32(28),
                    blob_flags: r.u32(32),
                    blob_id: r.u64(40),
                    size: r.u64(48),
                    entries,
                }))
            }
            VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB => {
                let r = Reader::new(bytes, name, RESOURCE_MAP_BLOB_SIZE)?;
                Ok(Command::ResourceMapBlob(ResourceMapBlob {
                    hdr,
                    resource_id: r.u32(24),
                    padding: r.u32(28),
                    offset: r.u64(32),
                }))
            }
            VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB | VIRTIO_GPU_CMD_RESOURCE_UNREF => {
                let r = Reader::new(bytes, name, RESOURCE_UNREF_SIZE)?;
                let c = ResourceCmd {
                    hdr,
                    resource_id: r.u32(24),
                    padding: r.u32(28),
                };
                Ok(if t == VIRTIO_GPU_CMD_RESOURCE_UNREF {
                    Command::ResourceUnref(c)
                } else {
                    Command::ResourceUnmapBlob(c)
                })
            }
            VIRTIO_GPU_CMD_CTX_CREATE => {
                let r = Reader::new(bytes, name, CTX_CREATE_SIZE)?;
                let nlen = r.u32(24);
                if nlen as usize > CTX_DEBUG_NAME_LEN {
                    return Err(WireError::BadLength(format!(
                        "{name}: nlen {nlen} > {CTX_DEBUG_NAME_LEN}"
                    )));
                }
                let start = CTRL_HDR_SIZE + 8;
                Ok(Command::CtxCreate(CtxCreate {
                    hdr,
                    context_init: r.u32(28),
                    debug_name: bytes[start..start + nlen as usize].to_vec(),
                }))
            }
            VIRTIO_GPU_CMD_CTX_DESTROY => Ok(Command::CtxDestroy(hdr)),
            VIRTIO_GPU_CMD_GET_DISPLAY_INFO => Ok(Command::GetDisplayInfo(hdr)),
            VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE | VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE => {
                let r = Reader::new(bytes, name, CTX_RESOURCE_SIZE)?;
                let c = ResourceCmd {
                    hdr,
                    resource_id: r.u32(24),
                    padding: r.u32(28),
                };
                Ok(if t == VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE {
                    Command::CtxAttachResource(c)
                } else {
                    Command::CtxDetachResource(c)
                })
            }
            VIRTIO_GPU_CMD_SUBMIT_3D => {
                let r = Reader::new(bytes, name, SUBMIT_3D_SIZE)?;
                let size = r.u32(24);
                let avail = bytes.len() - SUBMIT_3D_SIZE;
                if size as usize > avail {
                    return Err(WireError::BadLength(format!(
                        "{name}: size {size} but {avail} stream bytes follow"
                    )));
                }
                Ok(Command::Submit3d(Submit3d {
                    hdr,
                    padding: r.u32(28),
                    stream: bytes[SUBMIT_3D_SIZE..SUBMIT_3D_SIZE + size as usize].to_vec(),
                }))
            }
            VIRTIO_GPU_CMD_GET_CAPSET_INFO => {
                let r = Reader::new(bytes, name, GET_CAPSET_INFO_SIZE)?;
                Ok(Command::GetCapsetInfo(GetCapsetInfo {
                    hdr,
                    capset_index: r.u32(24),
                    padding: r.u32(28),
                }))
            }
            VIRTIO_GPU_CMD_GET_CAPSET => {
                let r = Reader::new(bytes, name, GET_CAPSET_SIZE)?;
                Ok(Command::GetCapset(GetCapset {
                    hdr,
                    capset_id: r.u32(24),
                    capset_version: r.u32(28),
                }))
            }
            other => {
                Self::parse_display(hdr, name, bytes).unwrap_or(Err(WireError::UnknownType(other)))
            }
        }
    }

    /// The command's header.
    pub fn hdr(&self) -> &CtrlHdr {
        match self {
            Command::ResourceCreateBlob(c) => &c.hdr,
            Command::ResourceMapBlob(c) => &c.hdr,
            Command::ResourceUnmapBlob(c)
            | Command::ResourceUnref(c)
            | Command::CtxAttachResource(c)
            | Command::CtxDetachResource(c) => &c.hdr,
            Command::CtxCreate(c) => &c.hdr,
            Command::CtxDestroy(h) | Command::GetDisplayInfo(h) => h,
            Command::Submit3d(c) => &c.hdr,
            Command::GetCapsetInfo(c) => &c.hdr,
            Command::GetCapset(c) => &c.hdr,
            Command::ResourceCreate2d(c) => &c.hdr,
            Command::SetScanout(c) => &c.hdr,
            Command::ResourceFlush(c) => &c.hdr,
            Command::TransferToHost2d(c) => &c.hdr,
            Command::ResourceAttachBacking(c) => &c.hdr,
            Command::ResourceDetachBacking(c) | Command::ResourceAssignUuid(c) => &c.hdr,
            Command::GetEdid(c) => &c.hdr,
            Command::SetScanoutBlob(c) => &c.hdr,
            Command::UpdateCursor(c) | Command::MoveCursor(c) => &c.hdr,
        }
    }

    /// The wire type of this command (`VIRTIO_GPU_CMD_*`).
    pub fn type_(&self) -> u32 {
        match self {
            Command::ResourceCreateBlob(_) => VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB,
            Command::ResourceMapBlob(_) => VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB,
            Command::ResourceUnmapBlob(_) => VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB,
            Command::ResourceUnref(_) => VIRTIO_GPU_CMD_RESOURCE_UNREF,
            Command::CtxCreate(_) => VIRTIO_GPU_CMD_CTX_CREATE,
            Command::CtxDestroy(_) => VIRTIO_GPU_CMD_CTX_DESTROY,
            Command::GetDisplayInfo(_) => VIRTIO_GPU_CMD_GET_DISPLAY_INFO,
            Command::CtxAttachResource(_) => VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE,
            Command::CtxDetachResource(_) => VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE,
            Command::Submit3d(_) => VIRTIO_GPU_CMD_SUBMIT_3D,
            Command::GetCapsetInfo(_) => VIRTIO_GPU_CMD_GET_CAPSET_INFO,
            Command::GetCapset(_) => VIRTIO_GPU_CMD_GET_CAPSET,
            Command::ResourceCreate2d(_) => VIRTIO_GPU_CMD_RESOURCE_CREATE_2D,
            Command::SetScanout(_) => VIRTIO_GPU_CMD_SET_SCANOUT,
            Command::ResourceFlush(_) => VIRTIO_GPU_CMD_RESOURCE_FLUSH,
            Command::TransferToHost2d(_) => VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D,
            Command::ResourceAttachBacking(_) => VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING,
            Command::ResourceDetachBacking(_) => VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING,
            Command::GetEdid(_) => VIRTIO_GPU_CMD_GET_EDID,
            Command::ResourceAssignUuid(_) => VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID,
            Command::SetScanoutBlob(_) => VIRTIO_GPU_CMD_SET_SCANOUT_BLOB,
            Command::UpdateCursor(_) => VIRTIO_GPU_CMD_UPDATE_CURSOR,
            Command::MoveCursor(_) => VIRTIO_GPU_CMD_MOVE_CURSOR,
        }
    }

    /// Encodes the command in its wire layout. The header's `type_` is taken from the
    /// variant (whatever `hdr.type_` says); `nr_entries`, `size` and `nlen` are taken from
    /// the lengths of `entries`, `stream` and `debug_name` (a name longer than 64 bytes is
    /// cut at 64).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(CTX_CREATE_SIZE);
        let hdr = CtrlHdr {
            type_: self.type_(),
            ..*self.hdr()
        };
        hdr.encode_into(&mut out);
        match self {
            Command::ResourceCreateBlob(c) => {
                put_u32(&mut out, c.resource_id);
                put_u32(&mut out, c.blob_mem);
                put_u32(&mut out, c.blob_flags);
                put_u32(&mut out, c.entries.len() as u32);
                put_u64(&mut out, c.blob_id);
                put_u64(&mut out, c.size);
                put_entries(&mut out, &c.entries);
            }
            Command::ResourceMapBlob(c) => {
                put_u32(&mut out, c.resource_id);
                put_u32(&mut out, c.padding);
                put_u64(&mut out, c.offset);
            }
            Command::ResourceUnmapBlob(c)
            | Command::ResourceUnref(c)
            | Command::CtxAttachResource(c)
            | Command::CtxDetachResource(c) => {
                put_u32(&mut out, c.resource_id);
                put_u32(&mut out, c.padding);
            }
            Command::CtxCreate(c) => {
                let n = c.debug_name.len().min(CTX_DEBUG_NAME_LEN);
                put_u32(&mut out, n as u32);
                put_u32(&mut out, c.context_init);
                let mut name = [0u8; CTX_DEBUG_NAME_LEN];
                name[..n].copy_from_slice(&c.debug_name[..n]);
                out.extend_from_slice(&name);
            }
            Command::CtxDestroy(_) | Command::GetDisplayInfo(_) => {}
            Command::Submit3d(c) => {
                put_u32(&mut out, c.stream.len() as u32);
                put_u32(&mut out, c.padding);
                out.extend_from_slice(&c.stream);
            }
            Command::GetCapsetInfo(c) => {
                put_u32(&mut out, c.capset_index);
                put_u32(&mut out, c.padding);
            }
            Command::GetCapset(c) => {
                put_u32(&mut out, c.capset_id);
                put_u32(&mut out, c.capset_version);
            }
            Command::ResourceCreate2d(c) => {
                for v in [c.resource_id, c.format, c.width, c.height] {
                    put_u32(&mut out, v);
                }
            }
            Command::SetScanout(c) => {
                c.r.encode_into(&mut out);
                put_u32(&mut out, c.scanout_id);
                put_u32(&mut out, c.resource_id);
            }
            Command::ResourceFlush(c) => {
                c.r.encode_into(&mut out);
                put_u32(&mut out, c.resource_id);
                put_u32(&mut out, c.padding);
            }
            Command::TransferToHost2d(c) => {
                c.r.encode_into(&mut out);
                put_u64(&mut out, c.offset);
                put_u32(&mut out, c.resource_id);
                put_u32(&mut out, c.padding);
            }
            Command::ResourceAttachBacking(c) => {
                put_u32(&mut out, c.resource_id);
                put_u32(&mut out, c.entries.len() as u32);
                put_entries(&mut out, &c.entries);
            }
            Command::ResourceDetachBacking(c) | Command::ResourceAssignUuid(c) => {
                put_u32(&mut out, c.resource_id);
                put_u32(&mut out, c.padding);
            }
            Command::GetEdid(c) => {
                put_u32(&mut out, c.scanout);
                put_u32(&mut out, c.padding);
            }
            Command::SetScanoutBlob(c) => {
                c.r.encode_into(&mut out);
                for v in [
                    c.scanout_id,
                    c.resource_id,
                    c.width,
                    c.height,
                    c.format,
                    c.padding,
                ] {
                    put_u32(&mut out, v);
                }
                for v in c.strides.iter().chain(c.offsets.iter()) {
                    put_u32(&mut out, *v);
                }
            }
            Command::UpdateCursor(c) | Command::MoveCursor(c) => {
                for v in [
                    c.pos.scanout_id,
                    c.pos.x,
                    c.pos.y,
                    c.pos.padding,
                    c.resource_id,
                    c.hot_x,
                    c.hot_y,
                    c.padding,
                ] {
                    put_u32(&mut out, v);
                }
            }
        }
        out
    }
}
