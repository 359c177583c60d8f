//! virtio-gpu control commands and responses in their exact little-endian wire layout
//! (virtio spec 1.2+ §5.7.6, Linux `include/uapi/linux/virtio_gpu.h`).
//!
//! Only the commands the hostmem device serves are decoded: blob resources, contexts
//! (with `CTX_ATTACH_RESOURCE`/`CTX_DETACH_RESOURCE`), `SUBMIT_3D`, capsets, and the
//! display half: `GET_DISPLAY_INFO`, `GET_EDID`, 2D resources (`RESOURCE_CREATE_2D`,
//! `RESOURCE_ATTACH_BACKING`/`DETACH_BACKING`, `TRANSFER_TO_HOST_2D`), scanouts
//! (`SET_SCANOUT`, `SET_SCANOUT_BLOB`, `RESOURCE_FLUSH`), `RESOURCE_ASSIGN_UUID` and the
//! cursor queue's `UPDATE_CURSOR`/`MOVE_CURSOR`. Everything here is plain data: [`Command::parse`] and
//! [`Response::parse`] never panic on any input (short buffers, unknown types, lengths that
//! disagree with the message) and never allocate more than the message holds, so a fuzz
//! target can call them directly.
//!
//! Trailing bytes after a fixed-size command are ignored, as virtio devices do with
//! descriptor chains longer than the command. Variable parts are checked against the
//! message: `RESOURCE_CREATE_BLOB`'s and `RESOURCE_ATTACH_BACKING`'s `nr_entries` mem
//! entries, `SUBMIT_3D`'s `size` payload bytes, `CTX_CREATE`'s `nlen` (≤ 64), `OK_EDID`'s
//! `size` (≤ 1024).

use std::fmt;

// ---- command types (enum virtio_gpu_ctrl_type) ----

/// `VIRTIO_GPU_CMD_GET_DISPLAY_INFO`.
pub const VIRTIO_GPU_CMD_GET_DISPLAY_INFO: u32 = 0x0100;
/// `VIRTIO_GPU_CMD_RESOURCE_CREATE_2D`.
pub const VIRTIO_GPU_CMD_RESOURCE_CREATE_2D: u32 = 0x0101;
/// `VIRTIO_GPU_CMD_RESOURCE_UNREF`.
pub const VIRTIO_GPU_CMD_RESOURCE_UNREF: u32 = 0x0102;
/// `VIRTIO_GPU_CMD_SET_SCANOUT`.
pub const VIRTIO_GPU_CMD_SET_SCANOUT: u32 = 0x0103;
/// `VIRTIO_GPU_CMD_RESOURCE_FLUSH`.
pub const VIRTIO_GPU_CMD_RESOURCE_FLUSH: u32 = 0x0104;
/// `VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D`.
pub const VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D: u32 = 0x0105;
/// `VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING`.
pub const VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING: u32 = 0x0106;
/// `VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING`.
pub const VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING: u32 = 0x0107;
/// `VIRTIO_GPU_CMD_GET_CAPSET_INFO`.
pub const VIRTIO_GPU_CMD_GET_CAPSET_INFO: u32 = 0x0108;
/// `VIRTIO_GPU_CMD_GET_CAPSET`.
pub const VIRTIO_GPU_CMD_GET_CAPSET: u32 = 0x0109;
/// `VIRTIO_GPU_CMD_GET_EDID` (feature `VIRTIO_GPU_F_EDID`).
pub const VIRTIO_GPU_CMD_GET_EDID: u32 = 0x010a;
/// `VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID` (feature `VIRTIO_GPU_F_RESOURCE_UUID`).
pub const VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID: u32 = 0x010b;
/// `VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB`.
pub const VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB: u32 = 0x010c;
/// `VIRTIO_GPU_CMD_SET_SCANOUT_BLOB`.
pub const VIRTIO_GPU_CMD_SET_SCANOUT_BLOB: u32 = 0x010d;
/// `VIRTIO_GPU_CMD_CTX_CREATE`.
pub const VIRTIO_GPU_CMD_CTX_CREATE: u32 = 0x0200;
/// `VIRTIO_GPU_CMD_CTX_DESTROY`.
pub const VIRTIO_GPU_CMD_CTX_DESTROY: u32 = 0x0201;
/// `VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE`.
pub const VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE: u32 = 0x0202;
/// `VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE`.
pub const VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE: u32 = 0x0203;
/// `VIRTIO_GPU_CMD_SUBMIT_3D`.
pub const VIRTIO_GPU_CMD_SUBMIT_3D: u32 = 0x0207;
/// `VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB`.
pub const VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB: u32 = 0x0208;
/// `VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB`.
pub const VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB: u32 = 0x0209;
/// `VIRTIO_GPU_CMD_UPDATE_CURSOR` (cursor queue).
pub const VIRTIO_GPU_CMD_UPDATE_CURSOR: u32 = 0x0300;
/// `VIRTIO_GPU_CMD_MOVE_CURSOR` (cursor queue).
pub const VIRTIO_GPU_CMD_MOVE_CURSOR: u32 = 0x0301;

// ---- response types ----

/// `VIRTIO_GPU_RESP_OK_NODATA`.
pub const VIRTIO_GPU_RESP_OK_NODATA: u32 = 0x1100;
/// `VIRTIO_GPU_RESP_OK_DISPLAY_INFO`.
pub const VIRTIO_GPU_RESP_OK_DISPLAY_INFO: u32 = 0x1101;
/// `VIRTIO_GPU_RESP_OK_CAPSET_INFO`.
pub const VIRTIO_GPU_RESP_OK_CAPSET_INFO: u32 = 0x1102;
/// `VIRTIO_GPU_RESP_OK_CAPSET`.
pub const VIRTIO_GPU_RESP_OK_CAPSET: u32 = 0x1103;
/// `VIRTIO_GPU_RESP_OK_EDID`.
pub const VIRTIO_GPU_RESP_OK_EDID: u32 = 0x1104;
/// `VIRTIO_GPU_RESP_OK_RESOURCE_UUID`.
pub const VIRTIO_GPU_RESP_OK_RESOURCE_UUID: u32 = 0x1105;
/// `VIRTIO_GPU_RESP_OK_MAP_INFO`.
pub const VIRTIO_GPU_RESP_OK_MAP_INFO: u32 = 0x1106;
/// `VIRTIO_GPU_RESP_ERR_UNSPEC`.
pub const VIRTIO_GPU_RESP_ERR_UNSPEC: u32 = 0x1200;
/// `VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY`.
pub const VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY: u32 = 0x1201;
/// `VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID`.
pub const VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID: u32 = 0x1202;
/// `VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID`.
pub const VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID: u32 = 0x1203;
/// `VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID`.
pub const VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID: u32 = 0x1204;
/// `VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER`.
pub const VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER: u32 = 0x1205;

// ---- header flags ----

/// `VIRTIO_GPU_FLAG_FENCE`: the driver wants the fence `fence_id` signalled on completion.
pub const VIRTIO_GPU_FLAG_FENCE: u32 = 1 << 0;
/// `VIRTIO_GPU_FLAG_INFO_RING_IDX`: `ring_idx` is valid (context-specific fence ring).
pub const VIRTIO_GPU_FLAG_INFO_RING_IDX: u32 = 1 << 1;

// ---- blobs ----

/// `VIRTIO_GPU_BLOB_MEM_GUEST`: blob backed by guest memory (here: plain device memory).
pub const VIRTIO_GPU_BLOB_MEM_GUEST: u32 = 0x0001;
/// `VIRTIO_GPU_BLOB_MEM_HOST3D`: blob allocated by the host renderer.
pub const VIRTIO_GPU_BLOB_MEM_HOST3D: u32 = 0x0002;
/// `VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST`: host renderer object backed by guest memory.
pub const VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST: u32 = 0x0003;
/// `VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE`: the blob may be mapped into hostmem.
pub const VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE: u32 = 0x0001;
/// `VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE`: the blob may be shared with other processes.
pub const VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE: u32 = 0x0002;
/// `VIRTIO_GPU_BLOB_FLAG_USE_CROSS_DEVICE`: the blob may be shared with other devices.
pub const VIRTIO_GPU_BLOB_FLAG_USE_CROSS_DEVICE: u32 = 0x0004;
/// Every blob flag the spec defines.
pub const VIRTIO_GPU_BLOB_FLAGS_ALL: u32 = VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE
    | VIRTIO_GPU_BLOB_FLAG_USE_SHAREABLE
    | VIRTIO_GPU_BLOB_FLAG_USE_CROSS_DEVICE;

// ---- map info ----

/// `VIRTIO_GPU_MAP_CACHE_MASK`.
pub const VIRTIO_GPU_MAP_CACHE_MASK: u32 = 0x0f;
/// `VIRTIO_GPU_MAP_CACHE_NONE`.
pub const VIRTIO_GPU_MAP_CACHE_NONE: u32 = 0x00;
/// `VIRTIO_GPU_MAP_CACHE_CACHED`.
pub const VIRTIO_GPU_MAP_CACHE_CACHED: u32 = 0x01;
/// `VIRTIO_GPU_MAP_CACHE_UNCACHED`.
pub const VIRTIO_GPU_MAP_CACHE_UNCACHED: u32 = 0x02;
/// `VIRTIO_GPU_MAP_CACHE_WC`.
pub const VIRTIO_GPU_MAP_CACHE_WC: u32 = 0x03;

// ---- capsets and contexts ----

/// `VIRTIO_GPU_CAPSET_VIRGL`.
pub const VIRTIO_GPU_CAPSET_VIRGL: u32 = 1;
/// `VIRTIO_GPU_CAPSET_VIRGL2`.
pub const VIRTIO_GPU_CAPSET_VIRGL2: u32 = 2;
/// `VIRTIO_GPU_CAPSET_GFXSTREAM_VULKAN`.
pub const VIRTIO_GPU_CAPSET_GFXSTREAM_VULKAN: u32 = 3;
/// `VIRTIO_GPU_CAPSET_VENUS`.
pub const VIRTIO_GPU_CAPSET_VENUS: u32 = 4;
/// `VIRTIO_GPU_CAPSET_CROSS_DOMAIN`.
pub const VIRTIO_GPU_CAPSET_CROSS_DOMAIN: u32 = 5;
/// `VIRTIO_GPU_CAPSET_DRM`.
pub const VIRTIO_GPU_CAPSET_DRM: u32 = 6;
/// `VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK`: the capset id in `CTX_CREATE.context_init`.
pub const VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK: u32 = 0xff;

// ---- 2D formats (enum virtio_gpu_formats): the 4-byte ones Linux and Mesa use ----

/// `VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM`.
pub const VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM: u32 = 1;
/// `VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM`.
pub const VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM: u32 = 2;
/// `VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM`.
pub const VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM: u32 = 3;
/// `VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM`.
pub const VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM: u32 = 4;
/// `VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM`.
pub const VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM: u32 = 67;
/// `VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM`.
pub const VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM: u32 = 68;
/// `VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM`.
pub const VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM: u32 = 121;
/// `VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM`.
pub const VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM: u32 = 134;

// ---- sizes ----

/// `sizeof(struct virtio_gpu_ctrl_hdr)`.
pub const CTRL_HDR_SIZE: usize = 24;
/// `sizeof(struct virtio_gpu_mem_entry)`.
pub const MEM_ENTRY_SIZE: usize = 16;
/// `sizeof(struct virtio_gpu_resource_create_blob)` (without the mem entries).
pub const RESOURCE_CREATE_BLOB_SIZE: usize = CTRL_HDR_SIZE + 32;
/// `sizeof(struct virtio_gpu_resource_map_blob)`.
pub const RESOURCE_MAP_BLOB_SIZE: usize = CTRL_HDR_SIZE + 16;
/// `sizeof(struct virtio_gpu_resource_unmap_blob)` (also `resource_unref`).
pub const RESOURCE_UNMAP_BLOB_SIZE: usize = CTRL_HDR_SIZE + 8;
/// `sizeof(struct virtio_gpu_resource_unref)`.
pub const RESOURCE_UNREF_SIZE: usize = CTRL_HDR_SIZE + 8;
/// Bytes of `debug_name` in `CTX_CREATE`.
pub const CTX_DEBUG_NAME_LEN: usize = 64;
/// `sizeof(struct virtio_gpu_ctx_create)`.
pub const CTX_CREATE_SIZE: usize = CTRL_HDR_SIZE + 8 + CTX_DEBUG_NAME_LEN;
/// `sizeof(struct virtio_gpu_cmd_submit)` (the stream follows).
pub const SUBMIT_3D_SIZE: usize = CTRL_HDR_SIZE + 8;
/// `sizeof(struct virtio_gpu_get_capset_info)`.
pub const GET_CAPSET_INFO_SIZE: usize = CTRL_HDR_SIZE + 8;
/// `sizeof(struct virtio_gpu_get_capset)`.
pub const GET_CAPSET_SIZE: usize = CTRL_HDR_SIZE + 8;
/// `sizeof(struct virtio_gpu_resp_map_info)`.
pub const RESP_MAP_INFO_SIZE: usize = CTRL_HDR_SIZE + 8;
/// `sizeof(struct virtio_gpu_resp_capset_info)`.
pub const RESP_CAPSET_INFO_SIZE: usize = CTRL_HDR_SIZE + 16;
/// `VIRTIO_GPU_MAX_SCANOUTS`: entries in `virtio_gpu_resp_display_info.pmodes`.
pub const VIRTIO_GPU_MAX_SCANOUTS: usize = 16;
/// `sizeof(struct virtio_gpu_display_one)`: a rect, `enabled`, `flags`.
pub const DISPLAY_ONE_SIZE: usize = 24;
/// `sizeof(struct virtio_gpu_resp_display_info)`.
pub const RESP_DISPLAY_INFO_SIZE: usize =
    CTRL_HDR_SIZE + VIRTIO_GPU_MAX_SCANOUTS * DISPLAY_ONE_SIZE;
/// `sizeof(struct virtio_gpu_ctx_resource)` (`CTX_ATTACH_RESOURCE`/`CTX_DETACH_RESOURCE`).
pub const CTX_RESOURCE_SIZE: usize = CTRL_HDR_SIZE + 8;
/// `sizeof(struct virtio_gpu_rect)`.
pub const RECT_SIZE: usize = 16;
/// `sizeof(struct virtio_gpu_resource_create_2d)`.
pub const RESOURCE_CREATE_2D_SIZE: usize = CTRL_HDR_SIZE + 16;
/// `sizeof(struct virtio_gpu_set_scanout)`.
pub const SET_SCANOUT_SIZE: usize = CTRL_HDR_SIZE + RECT_SIZE + 8;
/// `sizeof(struct virtio_gpu_resource_flush)`.
pub const RESOURCE_FLUSH_SIZE: usize = CTRL_HDR_SIZE + RECT_SIZE + 8;
/// `sizeof(struct virtio_gpu_transfer_to_host_2d)`.
pub const TRANSFER_TO_HOST_2D_SIZE: usize = CTRL_HDR_SIZE + RECT_SIZE + 16;
/// `sizeof(struct virtio_gpu_resource_attach_backing)` (without the mem entries).
pub const RESOURCE_ATTACH_BACKING_SIZE: usize = CTRL_HDR_SIZE + 8;
/// `sizeof(struct virtio_gpu_resource_detach_backing)`.
pub const RESOURCE_DETACH_BACKING_SIZE: usize = CTRL_HDR_SIZE + 8;
/// `sizeof(struct virtio_gpu_cmd_get_edid)`.
pub const GET_EDID_SIZE: usize = CTRL_HDR_SIZE + 8;
/// `sizeof(struct virtio_gpu_resource_assign_uuid)`.
pub const RESOURCE_ASSIGN_UUID_SIZE: usize = CTRL_HDR_SIZE + 8;
/// `sizeof(struct virtio_gpu_set_scanout_blob)`.
pub const SET_SCANOUT_BLOB_SIZE: usize = CTRL_HDR_SIZE + RECT_SIZE + 24 + 32;
/// `sizeof(struct virtio_gpu_update_cursor)` (also `MOVE_CURSOR`).
pub const UPDATE_CURSOR_SIZE: usize = CTRL_HDR_SIZE + 32;
/// Bytes of `edid` in `virtio_gpu_resp_edid`.
pub const EDID_MAX_SIZE: usize = 1024;
/// `sizeof(struct virtio_gpu_resp_edid)`.
pub const RESP_EDID_SIZE: usize = CTRL_HDR_SIZE + 8 + EDID_MAX_SIZE;
/// `sizeof(struct virtio_gpu_resp_resource_uuid)`.
pub const RESP_RESOURCE_UUID_SIZE: usize = CTRL_HDR_SIZE + 16;

/// Why a buffer is not a well-formed command or response.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Shorter than the structure its type announces (or than the header).
    #[error("{what}: need {need} bytes, got {got}")]
    Truncated {
        /// Which structure.
        what: &'static str,
        /// Bytes the structure needs.
        need: usize,
        /// Bytes available.
        got: usize,
    },
    /// A type this decoder does not know (or the device does not serve).
    #[error("unknown or unsupported type {0:#06x}")]
    UnknownType(u32),
    /// A length field disagrees with the message (nr_entries, size, nlen).
    #[error("bad length: {0}")]
    BadLength(String),
}

/// `struct virtio_gpu_ctrl_hdr`: 24 bytes at the start of every command and response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CtrlHdr {
    /// Command or response type.
    pub type_: u32,
    /// `VIRTIO_GPU_FLAG_*`.
    pub flags: u32,
    /// Fence id (valid with `VIRTIO_GPU_FLAG_FENCE`).
    pub fence_id: u64,
    /// Rendering context.
    pub ctx_id: u32,
    /// Fence ring (valid with `VIRTIO_GPU_FLAG_INFO_RING_IDX`).
    pub ring_idx: u8,
    /// Padding, kept for an exact round trip.
    pub padding: [u8; 3],
}

impl CtrlHdr {
    /// A header of `type_` with everything else zero.
    pub fn new(type_: u32) -> Self {
        CtrlHdr {
            type_,
            ..Default::default()
        }
    }

    /// A header of `type_` in context `ctx_id`.
    pub fn with_ctx(type_: u32, ctx_id: u32) -> Self {
        CtrlHdr {
            type_,
            ctx_id,
            ..Default::default()
        }
    }

    /// Decodes the first 24 bytes of `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<CtrlHdr, WireError> {
        let r = Reader::new(bytes, "ctrl_hdr", CTRL_HDR_SIZE)?;
        Ok(CtrlHdr {
            type_: r.u32(0),
            flags: r.u32(4),
            fence_id: r.u64(8),
            ctx_id: r.u32(16),
            ring_idx: r.u8(20),
            padding: [r.u8(21), r.u8(22), r.u8(23)],
        })
    }

    /// Appends the 24-byte encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.type_.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.extend_from_slice(&self.fence_id.to_le_bytes());
        out.extend_from_slice(&self.ctx_id.to_le_bytes());
        out.push(self.ring_idx);
        out.extend_from_slice(&self.padding);
    }

    /// The header of a response to a command with this header: `type_`, and the fence
    /// (flags FENCE and INFO_RING_IDX, fence_id, ctx_id, ring_idx) echoed, as the spec
    /// requires for fenced commands.
    pub fn response(&self, type_: u32) -> CtrlHdr {
        let flags = self.flags & (VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX);
        let fenced = flags & VIRTIO_GPU_FLAG_FENCE != 0;
        CtrlHdr {
            type_,
            flags,
            fence_id: if fenced { self.fence_id } else { 0 },
            ctx_id: self.ctx_id,
            ring_idx: if flags & VIRTIO_GPU_FLAG_INFO_RING_IDX != 0 {
                self.ring_idx
            } else {
                0
            },
            padding: [0; 3],
        }
    }
}

/// `struct virtio_gpu_mem_entry`: one guest memory range backing a GUEST blob.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemEntry {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub length: u32,
    /// Padding.
    pub padding: u32,
}

/// `VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB` and its mem entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceCreateBlob {
    /// Header.
    pub hdr: CtrlHdr,
    /// Guest-chosen id.
    pub resource_id: u32,
    /// `VIRTIO_GPU_BLOB_MEM_*`.
    pub blob_mem: u32,
    /// `VIRTIO_GPU_BLOB_FLAG_*`.
    pub blob_flags: u32,
    /// Renderer object id.
    pub blob_id: u64,
    /// Size in bytes.
    pub size: u64,
    /// The `nr_entries` mem entries that follow (encoded `nr_entries` = `entries.len()`).
    pub entries: Vec<MemEntry>,
}

/// `VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceMapBlob {
    /// Header.
    pub hdr: CtrlHdr,
    /// Resource.
    pub resource_id: u32,
    /// Padding.
    pub padding: u32,
    /// Offset inside the hostmem window.
    pub offset: u64,
}

/// A command that names only a resource: `RESOURCE_UNMAP_BLOB`, `RESOURCE_UNREF`,
/// `CTX_ATTACH_RESOURCE` and `CTX_DETACH_RESOURCE` (`struct virtio_gpu_ctx_resource`, the
/// context in the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceCmd {
    /// Header.
    pub hdr: CtrlHdr,
    /// Resource.
    pub resource_id: u32,
    /// Padding.
    pub padding: u32,
}

/// `VIRTIO_GPU_CMD_CTX_CREATE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtxCreate {
    /// Header (`ctx_id` is the new context).
    pub hdr: CtrlHdr,
    /// `context_init`: capset id in the low 8 bits.
    pub context_init: u32,
    /// The first `nlen` bytes of `debug_name` (≤ 64).
    pub debug_name: Vec<u8>,
}

impl CtxCreate {
    /// The capset id requested in `context_init` (0: the default).
    pub fn capset_id(&self) -> u32 {
        self.context_init & VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK
    }
}

/// `VIRTIO_GPU_CMD_SUBMIT_3D` and its command stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submit3d {
    /// Header (`ctx_id` is the submitting context).
    pub hdr: CtrlHdr,
    /// The `size` stream bytes that follow.
    pub stream: Vec<u8>,
    /// Padding (newer specs call it `num_in_fences`; must be zero here).
    pub padding: u32,
}

/// `VIRTIO_GPU_CMD_GET_CAPSET_INFO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetCapsetInfo {
    /// Header.
    pub hdr: CtrlHdr,
    /// Index into the device's capset list.
    pub capset_index: u32,
    /// Padding.
    pub padding: u32,
}

/// `VIRTIO_GPU_CMD_GET_CAPSET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetCapset {
    /// Header.
    pub hdr: CtrlHdr,
    /// Capset id.
    pub capset_id: u32,
    /// Capset version.
    pub capset_version: u32,
}

/// `struct virtio_gpu_display_one`: one scanout in `OK_DISPLAY_INFO`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DisplayOne {
    /// Rectangle: x.
    pub x: u32,
    /// Rectangle: y.
    pub y: u32,
    /// Rectangle: width.
    pub width: u32,
    /// Rectangle: height.
    pub height: u32,
    /// Non-zero when the scanout is enabled.
    pub enabled: u32,
    /// Flags.
    pub flags: u32,
}

/// `struct virtio_gpu_rect`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rect {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

impl Rect {
    /// A rect at `(x, y)` of `width` × `height`.
    pub fn new(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    /// True when the rect lies inside `width` × `height` (checked arithmetic: a rect whose
    /// `x + width` wraps is outside). An empty rect inside the bounds is inside.
    pub fn within(&self, width: u32, height: u32) -> bool {
        let right = u64::from(self.x) + u64::from(self.width);
        let bottom = u64::from(self.y) + u64::from(self.height);
        right <= u64::from(width) && bottom <= u64::from(height)
    }

    /// True when the rect has no pixels.
    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    fn read(r: &Reader<'_>, at: usize) -> Rect {
        Rect {
            x: r.u32(at),
            y: r.u32(at + 4),
            width: r.u32(at + 8),
            height: r.u32(at + 12),
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        for v in [self.x, self.y, self.width, self.height] {
            put_u32(out, v);
        }
    }
}

/// `VIRTIO_GPU_CMD_RESOURCE_CREATE_2D`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceCreate2d {
    /// Header.
    pub hdr: CtrlHdr,
    /// Guest-chosen id.
    pub resource_id: u32,
    /// `VIRTIO_GPU_FORMAT_*`.
    pub format: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// `VIRTIO_GPU_CMD_SET_SCANOUT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetScanout {
    /// Header.
    pub hdr: CtrlHdr,
    /// The part of the resource the scanout shows.
    pub r: Rect,
    /// Scanout.
    pub scanout_id: u32,
    /// 2D resource (0: disable the scanout).
    pub resource_id: u32,
}

/// `VIRTIO_GPU_CMD_RESOURCE_FLUSH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceFlush {
    /// Header.
    pub hdr: CtrlHdr,
    /// The rect that changed, in resource coordinates.
    pub r: Rect,
    /// Resource.
    pub resource_id: u32,
    /// Padding.
    pub padding: u32,
}

/// `VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferToHost2d {
    /// Header.
    pub hdr: CtrlHdr,
    /// The rect to copy, in resource coordinates.
    pub r: Rect,
    /// Offset of the rect's first byte in the backing (rows `width * 4` bytes apart).
    pub offset: u64,
    /// Resource.
    pub resource_id: u32,
    /// Padding.
    pub padding: u32,
}

/// `VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING` and its mem entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceAttachBacking {
    /// Header.
    pub hdr: CtrlHdr,
    /// Resource.
    pub resource_id: u32,
    /// The `nr_entries` mem entries that follow (encoded `nr_entries` = `entries.len()`).
    pub entries: Vec<MemEntry>,
}

/// `VIRTIO_GPU_CMD_GET_EDID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetEdid {
    /// Header.
    pub hdr: CtrlHdr,
    /// Scanout.
    pub scanout: u32,
    /// Padding.
    pub padding: u32,
}

/// `VIRTIO_GPU_CMD_SET_SCANOUT_BLOB`: a blob resource as the scanout's framebuffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetScanoutBlob {
    /// Header.
    pub hdr: CtrlHdr,
    /// The part of the framebuffer the scanout shows.
    pub r: Rect,
    /// Scanout.
    pub scanout_id: u32,
    /// Blob resource (0: disable the scanout).
    pub resource_id: u32,
    /// Framebuffer width in pixels.
    pub width: u32,
    /// Framebuffer height in pixels.
    pub height: u32,
    /// `VIRTIO_GPU_FORMAT_*`.
    pub format: u32,
    /// Padding.
    pub padding: u32,
    /// Bytes per row of each plane (the formats served have one plane).
    pub strides: [u32; 4],
    /// Offset of each plane in the blob.
    pub offsets: [u32; 4],
}

/// `struct virtio_gpu_cursor_pos`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CursorPos {
    /// Scanout.
    pub scanout_id: u32,
    /// x.
    pub x: u32,
    /// y.
    pub y: u32,
    /// Padding.
    pub padding: u32,
}

/// `VIRTIO_GPU_CMD_UPDATE_CURSOR` / `VIRTIO_GPU_CMD_MOVE_CURSOR` (`struct
/// virtio_gpu_update_cursor`; MOVE uses only `pos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateCursor {
    /// Header.
    pub hdr: CtrlHdr,
    /// Position.
    pub pos: CursorPos,
    /// The cursor image: a 64×64 2D resource (0: hide the cursor).
    pub resource_id: u32,
    /// Hot spot x.
    pub hot_x: u32,
    /// Hot spot y.
    pub hot_y: u32,
    /// Padding.
    pub padding: u32,
}

/// A control-queue (or cursor-queue) command the hostmem device serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `GET_DISPLAY_INFO` (header only).
    GetDisplayInfo(CtrlHdr),
    /// `RESOURCE_CREATE_BLOB`.
    ResourceCreateBlob(ResourceCreateBlob),
    /// `RESOURCE_MAP_BLOB`.
    ResourceMapBlob(ResourceMapBlob),
    /// `RESOURCE_UNMAP_BLOB`.
    ResourceUnmapBlob(ResourceCmd),
    /// `RESOURCE_UNREF`.
    ResourceUnref(ResourceCmd),
    /// `CTX_CREATE`.
    CtxCreate(CtxCreate),
    /// `CTX_DESTROY` (the header's `ctx_id`).
    CtxDestroy(CtrlHdr),
    /// `CTX_ATTACH_RESOURCE` of a resource to the header's context.
    CtxAttachResource(ResourceCmd),
    /// `CTX_DETACH_RESOURCE` of a resource from the header's context.
    CtxDetachResource(ResourceCmd),
    /// `SUBMIT_3D`.
    Submit3d(Submit3d),
    /// `GET_CAPSET_INFO`.
    GetCapsetInfo(GetCapsetInfo),
    /// `GET_CAPSET`.
    GetCapset(GetCapset),
    /// `RESOURCE_CREATE_2D`.
    ResourceCreate2d(ResourceCreate2d),
    /// `SET_SCANOUT`.
    SetScanout(SetScanout),
    /// `RESOURCE_FLUSH`.
    ResourceFlush(ResourceFlush),
    /// `TRANSFER_TO_HOST_2D`.
    TransferToHost2d(TransferToHost2d),
    /// `RESOURCE_ATTACH_BACKING`.
    ResourceAttachBacking(ResourceAttachBacking),
    /// `RESOURCE_DETACH_BACKING`.
    ResourceDetachBacking(ResourceCmd),
    /// `GET_EDID`.
    GetEdid(GetEdid),
    /// `RESOURCE_ASSIGN_UUID`.
    ResourceAssignUuid(ResourceCmd),
    /// `SET_SCANOUT_BLOB`.
    SetScanoutBlob(SetScanoutBlob),
    /// `UPDATE_CURSOR` (cursor queue).
    UpdateCursor(UpdateCursor),
    /// `MOVE_CURSOR` (cursor queue).
    MoveCursor(UpdateCursor),
}

/// Bounds-checked little-endian reads from a buffer known to hold `need` bytes.
struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(b: &'a [u8], what: &'static str, need: usize) -> Result<Self, WireError> {
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
    fn arr<const N: usize>(&self, at: usize) -> [u8; N] {
        self.b
            .get(at..at.saturating_add(N))
            .and_then(|s| s.try_into().ok())
            .unwrap_or([0; N])
    }
    fn u8(&self, at: usize) -> u8 {
        self.arr::<1>(at)[0]
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_le_bytes(self.arr(at))
    }
    fn u64(&self, at: usize) -> u64 {
        u64::from_le_bytes(self.arr(at))
    }
}

fn type_name(t: u32) -> &'static str {
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

fn put_u32(out: &mut Vec<u8>, v: u32) {
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
fn mem_entries(bytes: &[u8], nr_entries: u32) -> Vec<MemEntry> {
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

    /// The display half of [`Command::parse`]: `None` for a type it does not know.
    fn parse_display(
        hdr: CtrlHdr,
        name: &'static str,
        bytes: &[u8],
    ) -> Option<Result<Command, WireError>> {
        let need = |size| Reader::new(bytes, name, size);
        let parsed = match hdr.type_ {
            VIRTIO_GPU_CMD_RESOURCE_CREATE_2D => need(RESOURCE_CREATE_2D_SIZE).map(|r| {
                Command::ResourceCreate2d(ResourceCreate2d {
                    hdr,
                    resource_id: r.u32(24),
                    format: r.u32(28),
                    width: r.u32(32),
                    height: r.u32(36),
                })
            }),
            VIRTIO_GPU_CMD_SET_SCANOUT => need(SET_SCANOUT_SIZE).map(|r| {
                Command::SetScanout(SetScanout {
                    hdr,
                    r: Rect::read(&r, 24),
                    scanout_id: r.u32(40),
                    resource_id: r.u32(44),
                })
            }),
            VIRTIO_GPU_CMD_RESOURCE_FLUSH => need(RESOURCE_FLUSH_SIZE).map(|r| {
                Command::ResourceFlush(ResourceFlush {
                    hdr,
                    r: Rect::read(&r, 24),
                    resource_id: r.u32(40),
                    padding: r.u32(44),
                })
            }),
            VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D => need(TRANSFER_TO_HOST_2D_SIZE).map(|r| {
                Command::TransferToHost2d(TransferToHost2d {
                    hdr,
                    r: Rect::read(&r, 24),
                    offset: r.u64(40),
                    resource_id: r.u32(48),
                    padding: r.u32(52),
                })
            }),
            VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING => {
                need(RESOURCE_ATTACH_BACKING_SIZE).and_then(|r| {
                    let nr_entries = r.u32(28);
                    let rest = bytes
                        .get(RESOURCE_ATTACH_BACKING_SIZE..)
                        .unwrap_or_default();
                    let avail = rest.len() / MEM_ENTRY_SIZE;
                    if nr_entries as usize > avail {
                        return Err(WireError::BadLength(format!(
                            "{name}: nr_entries {nr_entries} but the message holds {avail} entries"
                        )));
                    }
                    Ok(Command::ResourceAttachBacking(ResourceAttachBacking {
                        hdr,
                        resource_id: r.u32(24),
                        entries: mem_entries(rest, nr_entries),
                    }))
                })
            }
            VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING | VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID => {
                need(RESOURCE_DETACH_BACKING_SIZE).map(|r| {
                    let c = ResourceCmd {
                        hdr,
                        resource_id: r.u32(24),
                        padding: r.u32(28),
                    };
                    if hdr.type_ == VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID {
                        Command::ResourceAssignUuid(c)
                    } else {
                        Command::ResourceDetachBacking(c)
                    }
                })
            }
            VIRTIO_GPU_CMD_GET_EDID => need(GET_EDID_SIZE).map(|r| {
                Command::GetEdid(GetEdid {
                    hdr,
                    scanout: r.u32(24),
                    padding: r.u32(28),
                })
            }),
            VIRTIO_GPU_CMD_SET_SCANOUT_BLOB => need(SET_SCANOUT_BLOB_SIZE).map(|r| {
                let four = |at: usize| [r.u32(at), r.u32(at + 4), r.u32(at + 8), r.u32(at + 12)];
                Command::SetScanoutBlob(SetScanoutBlob {
                    hdr,
                    r: Rect::read(&r, 24),
                    scanout_id: r.u32(40),
                    resource_id: r.u32(44),
                    width: r.u32(48),
                    height: r.u32(52),
                    format: r.u32(56),
                    padding: r.u32(60),
                    strides: four(64),
                    offsets: four(80),
                })
            }),
            VIRTIO_GPU_CMD_UPDATE_CURSOR | VIRTIO_GPU_CMD_MOVE_CURSOR => need(UPDATE_CURSOR_SIZE)
                .map(|r| {
                    let c = UpdateCursor {
                        hdr,
                        pos: CursorPos {
                            scanout_id: r.u32(24),
                            x: r.u32(28),
                            y: r.u32(32),
                            padding: r.u32(36),
                        },
                        resource_id: r.u32(40),
                        hot_x: r.u32(44),
                        hot_y: r.u32(48),
                        padding: r.u32(52),
                    };
                    if hdr.type_ == VIRTIO_GPU_CMD_MOVE_CURSOR {
                        Command::MoveCursor(c)
                    } else {
                        Command::UpdateCursor(c)
                    }
                }),
            _ => return None,
        };
        Some(parsed)
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

    // ---- builders for drivers and tests ----

    /// `RESOURCE_CREATE_BLOB` in `ctx_id` without mem entries.
    pub fn create_blob(
        ctx_id: u32,
        resource_id: u32,
        blob_mem: u32,
        blob_flags: u32,
        blob_id: u64,
        size: u64,
    ) -> Command {
        Command::ResourceCreateBlob(ResourceCreateBlob {
            hdr: CtrlHdr::with_ctx(VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB, ctx_id),
            resource_id,
            blob_mem,
            blob_flags,
            blob_id,
            size,
            entries: Vec::new(),
        })
    }

    /// `RESOURCE_MAP_BLOB` of `resource_id` at window `offset`.
    pub fn map_blob(ctx_id: u32, resource_id: u32, offset: u64) -> Command {
        Command::ResourceMapBlob(ResourceMapBlob {
            hdr: CtrlHdr::with_ctx(VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB, ctx_id),
            resource_id,
            padding: 0,
            offset,
        })
    }

    /// `RESOURCE_UNMAP_BLOB`.
    pub fn unmap_blob(ctx_id: u32, resource_id: u32) -> Command {
        Command::ResourceUnmapBlob(ResourceCmd {
            hdr: CtrlHdr::with_ctx(VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB, ctx_id),
            resource_id,
            padding: 0,
        })
    }

    /// `RESOURCE_UNREF`.
    pub fn unref(resource_id: u32) -> Command {
        Command::ResourceUnref(ResourceCmd {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_RESOURCE_UNREF),
            resource_id,
            padding: 0,
        })
    }

    /// `CTX_CREATE` of `ctx_id` for `capset_id` (0: default) with a debug name.
    pub fn ctx_create(ctx_id: u32, capset_id: u32, name: &[u8]) -> Command {
        Command::CtxCreate(CtxCreate {
            hdr: CtrlHdr::with_ctx(VIRTIO_GPU_CMD_CTX_CREATE, ctx_id),
            context_init: capset_id & VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK,
            debug_name: name[..name.len().min(CTX_DEBUG_NAME_LEN)].to_vec(),
        })
    }

    /// `CTX_DESTROY` of `ctx_id`.
    pub fn ctx_destroy(ctx_id: u32) -> Command {
        Command::CtxDestroy(CtrlHdr::with_ctx(VIRTIO_GPU_CMD_CTX_DESTROY, ctx_id))
    }

    /// `GET_DISPLAY_INFO`.
    pub fn get_display_info() -> Command {
        Command::GetDisplayInfo(CtrlHdr::new(VIRTIO_GPU_CMD_GET_DISPLAY_INFO))
    }

    /// `CTX_ATTACH_RESOURCE` of `resource_id` to `ctx_id`.
    pub fn ctx_attach_resource(ctx_id: u32, resource_id: u32) -> Command {
        Command::CtxAttachResource(ResourceCmd {
            hdr: CtrlHdr::with_ctx(VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE, ctx_id),
            resource_id,
            padding: 0,
        })
    }

    /// `CTX_DETACH_RESOURCE` of `resource_id` from `ctx_id`.
    pub fn ctx_detach_resource(ctx_id: u32, resource_id: u32) -> Command {
        Command::CtxDetachResource(ResourceCmd {
            hdr: CtrlHdr::with_ctx(VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE, ctx_id),
            resource_id,
            padding: 0,
        })
    }

    /// `SUBMIT_3D` of `stream` in `ctx_id`.
    pub fn submit_3d(ctx_id: u32, stream: Vec<u8>) -> Command {
        Command::Submit3d(Submit3d {
            hdr: CtrlHdr::with_ctx(VIRTIO_GPU_CMD_SUBMIT_3D, ctx_id),
            stream,
            padding: 0,
        })
    }

    /// `GET_CAPSET_INFO` for `capset_index`.
    pub fn get_capset_info(capset_index: u32) -> Command {
        Command::GetCapsetInfo(GetCapsetInfo {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_GET_CAPSET_INFO),
            capset_index,
            padding: 0,
        })
    }

    /// `GET_CAPSET` of `capset_id`/`capset_version`.
    pub fn get_capset(capset_id: u32, capset_version: u32) -> Command {
        Command::GetCapset(GetCapset {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_GET_CAPSET),
            capset_id,
            capset_version,
        })
    }

    /// `RESOURCE_CREATE_2D` of `resource_id`.
    pub fn create_2d(resource_id: u32, format: u32, width: u32, height: u32) -> Command {
        Command::ResourceCreate2d(ResourceCreate2d {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D),
            resource_id,
            format,
            width,
            height,
        })
    }

    /// `SET_SCANOUT` of `resource_id` (0: disable) on `scanout_id`, showing `r`.
    pub fn set_scanout(scanout_id: u32, resource_id: u32, r: Rect) -> Command {
        Command::SetScanout(SetScanout {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_SET_SCANOUT),
            r,
            scanout_id,
            resource_id,
        })
    }

    /// `RESOURCE_FLUSH` of `r` of `resource_id`.
    pub fn resource_flush(resource_id: u32, r: Rect) -> Command {
        Command::ResourceFlush(ResourceFlush {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_RESOURCE_FLUSH),
            r,
            resource_id,
            padding: 0,
        })
    }

    /// `TRANSFER_TO_HOST_2D` of `r` of `resource_id` from backing `offset`.
    pub fn transfer_to_host_2d(resource_id: u32, r: Rect, offset: u64) -> Command {
        Command::TransferToHost2d(TransferToHost2d {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D),
            r,
            offset,
            resource_id,
            padding: 0,
        })
    }

    /// `RESOURCE_ATTACH_BACKING` of `entries` (guest address, length) to `resource_id`.
    pub fn attach_backing(resource_id: u32, entries: &[(u64, u32)]) -> Command {
        Command::ResourceAttachBacking(ResourceAttachBacking {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING),
            resource_id,
            entries: entries
                .iter()
                .map(|&(addr, length)| MemEntry {
                    addr,
                    length,
                    padding: 0,
                })
                .collect(),
        })
    }

    /// `RESOURCE_DETACH_BACKING` of `resource_id`.
    pub fn detach_backing(resource_id: u32) -> Command {
        Command::ResourceDetachBacking(ResourceCmd {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING),
            resource_id,
            padding: 0,
        })
    }

    /// `GET_EDID` of `scanout`.
    pub fn get_edid(scanout: u32) -> Command {
        Command::GetEdid(GetEdid {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_GET_EDID),
            scanout,
            padding: 0,
        })
    }

    /// `RESOURCE_ASSIGN_UUID` of `resource_id`.
    pub fn assign_uuid(resource_id: u32) -> Command {
        Command::ResourceAssignUuid(ResourceCmd {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID),
            resource_id,
            padding: 0,
        })
    }

    /// `SET_SCANOUT_BLOB` of a one-plane framebuffer of `width` × `height` in `format`,
    /// `stride` bytes per row from `offset` in blob `resource_id`, shown whole.
    pub fn set_scanout_blob(
        scanout_id: u32,
        resource_id: u32,
        format: u32,
        (width, height): (u32, u32),
        stride: u32,
        offset: u32,
    ) -> Command {
        Command::SetScanoutBlob(SetScanoutBlob {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_SET_SCANOUT_BLOB),
            r: Rect::new(0, 0, width, height),
            scanout_id,
            resource_id,
            width,
            height,
            format,
            padding: 0,
            strides: [stride, 0, 0, 0],
            offsets: [offset, 0, 0, 0],
        })
    }

    /// `UPDATE_CURSOR`: `resource_id` (0: hide) with its hot spot at `(x, y)` of `scanout_id`.
    pub fn update_cursor(
        scanout_id: u32,
        (x, y): (u32, u32),
        resource_id: u32,
        (hot_x, hot_y): (u32, u32),
    ) -> Command {
        Command::UpdateCursor(UpdateCursor {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_UPDATE_CURSOR),
            pos: CursorPos {
                scanout_id,
                x,
                y,
                padding: 0,
            },
            resource_id,
            hot_x,
            hot_y,
            padding: 0,
        })
    }

    /// `MOVE_CURSOR` to `(x, y)` of `scanout_id`.
    pub fn move_cursor(scanout_id: u32, (x, y): (u32, u32)) -> Command {
        Command::MoveCursor(UpdateCursor {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_MOVE_CURSOR),
            pos: CursorPos {
                scanout_id,
                x,
                y,
                padding: 0,
            },
            resource_id: 0,
            hot_x: 0,
            hot_y: 0,
            padding: 0,
        })
    }

    /// The same command with `VIRTIO_GPU_FLAG_FENCE` and `fence_id` set.
    pub fn fenced(mut self, fence_id: u64) -> Command {
        let hdr = match &mut self {
            Command::ResourceCreateBlob(c) => &mut c.hdr,
            Command::ResourceMapBlob(c) => &mut c.hdr,
            Command::ResourceUnmapBlob(c)
            | Command::ResourceUnref(c)
            | Command::CtxAttachResource(c)
            | Command::CtxDetachResource(c) => &mut c.hdr,
            Command::CtxCreate(c) => &mut c.hdr,
            Command::CtxDestroy(h) | Command::GetDisplayInfo(h) => h,
            Command::Submit3d(c) => &mut c.hdr,
            Command::GetCapsetInfo(c) => &mut c.hdr,
            Command::GetCapset(c) => &mut c.hdr,
            Command::ResourceCreate2d(c) => &mut c.hdr,
            Command::SetScanout(c) => &mut c.hdr,
            Command::ResourceFlush(c) => &mut c.hdr,
            Command::TransferToHost2d(c) => &mut c.hdr,
            Command::ResourceAttachBacking(c) => &mut c.hdr,
            Command::ResourceDetachBacking(c) | Command::ResourceAssignUuid(c) => &mut c.hdr,
            Command::GetEdid(c) => &mut c.hdr,
            Command::SetScanoutBlob(c) => &mut c.hdr,
            Command::UpdateCursor(c) | Command::MoveCursor(c) => &mut c.hdr,
        };
        hdr.flags |= VIRTIO_GPU_FLAG_FENCE;
        hdr.fence_id = fence_id;
        self
    }
}

/// The error responses (`VIRTIO_GPU_RESP_ERR_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `ERR_UNSPEC`.
    Unspec,
    /// `ERR_OUT_OF_MEMORY`.
    OutOfMemory,
    /// `ERR_INVALID_SCANOUT_ID`.
    InvalidScanoutId,
    /// `ERR_INVALID_RESOURCE_ID`.
    InvalidResourceId,
    /// `ERR_INVALID_CONTEXT_ID`.
    InvalidContextId,
    /// `ERR_INVALID_PARAMETER`.
    InvalidParameter,
}

impl ErrorCode {
    /// The wire type.
    pub fn to_u32(self) -> u32 {
        match self {
            ErrorCode::Unspec => VIRTIO_GPU_RESP_ERR_UNSPEC,
            ErrorCode::OutOfMemory => VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY,
            ErrorCode::InvalidScanoutId => VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID,
            ErrorCode::InvalidResourceId => VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID,
            ErrorCode::InvalidContextId => VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID,
            ErrorCode::InvalidParameter => VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
        }
    }

    /// The code for a wire type, if it is an error response.
    pub fn from_u32(t: u32) -> Option<ErrorCode> {
        Some(match t {
            VIRTIO_GPU_RESP_ERR_UNSPEC => ErrorCode::Unspec,
            VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY => ErrorCode::OutOfMemory,
            VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID => ErrorCode::InvalidScanoutId,
            VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID => ErrorCode::InvalidResourceId,
            VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID => ErrorCode::InvalidContextId,
            VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER => ErrorCode::InvalidParameter,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(type_name(self.to_u32()))
    }
}

/// A control-queue response.
///
/// `hdr.type_` is ignored by [`Response::encode`] (the variant decides) and set by
/// [`Response::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `OK_NODATA`. `reply` is the **hostmem extension**: bytes a `SUBMIT_3D` stream
    /// produced (e.g. the shm backend's checksums), appended right after the 24-byte
    /// header. Empty for every other command, so the response is a plain `OK_NODATA`.
    OkNoData {
        /// Header.
        hdr: CtrlHdr,
        /// Reply bytes after the header (hostmem extension; usually empty).
        reply: Vec<u8>,
    },
    /// `OK_MAP_INFO`.
    OkMapInfo {
        /// Header.
        hdr: CtrlHdr,
        /// `VIRTIO_GPU_MAP_CACHE_*`.
        map_info: u32,
    },
    /// `OK_DISPLAY_INFO`: the scanouts (encoded as all [`VIRTIO_GPU_MAX_SCANOUTS`]
    /// entries; missing ones are zero, i.e. disabled).
    OkDisplayInfo {
        /// Header.
        hdr: CtrlHdr,
        /// The first scanouts (at most [`VIRTIO_GPU_MAX_SCANOUTS`]).
        modes: Vec<DisplayOne>,
    },
    /// `OK_CAPSET_INFO`.
    OkCapsetInfo {
        /// Header.
        hdr: CtrlHdr,
        /// Capset id.
        capset_id: u32,
        /// Highest version.
        capset_max_version: u32,
        /// Size of the capset.
        capset_max_size: u32,
    },
    /// `OK_CAPSET`.
    OkCapset {
        /// Header.
        hdr: CtrlHdr,
        /// The capset bytes.
        data: Vec<u8>,
    },
    /// `OK_EDID`: `size` is `edid.len()` (at most [`EDID_MAX_SIZE`]; the rest of the
    /// 1024-byte array is zero).
    OkEdid {
        /// Header.
        hdr: CtrlHdr,
        /// The EDID bytes.
        edid: Vec<u8>,
    },
    /// `OK_RESOURCE_UUID`.
    OkResourceUuid {
        /// Header.
        hdr: CtrlHdr,
        /// The resource's UUID.
        uuid: [u8; 16],
    },
    /// One of the `ERR_*` responses.
    Err {
        /// Header.
        hdr: CtrlHdr,
        /// Which error.
        code: ErrorCode,
    },
}

impl Response {
    /// The response's header.
    pub fn hdr(&self) -> &CtrlHdr {
        match self {
            Response::OkNoData { hdr, .. }
            | Response::OkMapInfo { hdr, .. }
            | Response::OkDisplayInfo { hdr, .. }
            | Response::OkCapsetInfo { hdr, .. }
            | Response::OkCapset { hdr, .. }
            | Response::OkEdid { hdr, .. }
            | Response::OkResourceUuid { hdr, .. }
            | Response::Err { hdr, .. } => hdr,
        }
    }

    /// The wire type of this response.
    pub fn type_(&self) -> u32 {
        match self {
            Response::OkNoData { .. } => VIRTIO_GPU_RESP_OK_NODATA,
            Response::OkMapInfo { .. } => VIRTIO_GPU_RESP_OK_MAP_INFO,
            Response::OkDisplayInfo { .. } => VIRTIO_GPU_RESP_OK_DISPLAY_INFO,
            Response::OkCapsetInfo { .. } => VIRTIO_GPU_RESP_OK_CAPSET_INFO,
            Response::OkCapset { .. } => VIRTIO_GPU_RESP_OK_CAPSET,
            Response::OkEdid { .. } => VIRTIO_GPU_RESP_OK_EDID,
            Response::OkResourceUuid { .. } => VIRTIO_GPU_RESP_OK_RESOURCE_UUID,
            Response::Err { code, .. } => code.to_u32(),
        }
    }

    /// The error code, if this is an error response.
    pub fn error(&self) -> Option<ErrorCode> {
        match self {
            Response::Err { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Encodes the response in its wire layout.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RESP_CAPSET_INFO_SIZE);
        let hdr = CtrlHdr {
            type_: self.type_(),
            ..*self.hdr()
        };
        hdr.encode_into(&mut out);
        match self {
            Response::OkNoData { reply, .. } => out.extend_from_slice(reply),
            Response::OkMapInfo { map_info, .. } => {
                put_u32(&mut out, *map_info);
                put_u32(&mut out, 0);
            }
            Response::OkDisplayInfo { modes, .. } => {
                for i in 0..VIRTIO_GPU_MAX_SCANOUTS {
                    let m = modes.get(i).copied().unwrap_or_default();
                    for v in [m.x, m.y, m.width, m.height, m.enabled, m.flags] {
                        put_u32(&mut out, v);
                    }
                }
            }
            Response::OkCapsetInfo {
                capset_id,
                capset_max_version,
                capset_max_size,
                ..
            } => {
                put_u32(&mut out, *capset_id);
                put_u32(&mut out, *capset_max_version);
                put_u32(&mut out, *capset_max_size);
                put_u32(&mut out, 0);
            }
            Response::OkCapset { data, .. } => out.extend_from_slice(data),
            Response::OkEdid { edid, .. } => {
                let n = edid.len().min(EDID_MAX_SIZE);
                put_u32(&mut out, n as u32);
                put_u32(&mut out, 0);
                let mut block = [0u8; EDID_MAX_SIZE];
                if let (Some(dst), Some(src)) = (block.get_mut(..n), edid.get(..n)) {
                    dst.copy_from_slice(src);
                }
                out.extend_from_slice(&block);
            }
            Response::OkResourceUuid { uuid, .. } => out.extend_from_slice(uuid),
            Response::Err { .. } => {}
        }
        out
    }

    /// Decodes a response. Never panics. Bytes after an `OK_NODATA` header are its `reply`
    /// (the hostmem extension); bytes after an `OK_CAPSET` header are the capset.
    pub fn parse(bytes: &[u8]) -> Result<Response, WireError> {
        let hdr = CtrlHdr::parse(bytes)?;
        let t = hdr.type_;
        let rest = bytes.get(CTRL_HDR_SIZE..).unwrap_or_default();
        Ok(match t {
            VIRTIO_GPU_RESP_OK_NODATA => Response::OkNoData {
                hdr,
                reply: rest.to_vec(),
            },
            VIRTIO_GPU_RESP_OK_MAP_INFO => {
                let r = Reader::new(bytes, "OK_MAP_INFO", RESP_MAP_INFO_SIZE)?;
                Response::OkMapInfo {
                    hdr,
                    map_info: r.u32(24),
                }
            }
            VIRTIO_GPU_RESP_OK_CAPSET_INFO => {
                let r = Reader::new(bytes, "OK_CAPSET_INFO", RESP_CAPSET_INFO_SIZE)?;
                Response::OkCapsetInfo {
                    hdr,
                    capset_id: r.u32(24),
                    capset_max_version: r.u32(28),
                    capset_max_size: r.u32(32),
                }
            }
            VIRTIO_GPU_RESP_OK_DISPLAY_INFO => {
                let r = Reader::new(bytes, "OK_DISPLAY_INFO", RESP_DISPLAY_INFO_SIZE)?;
                let modes = (0..VIRTIO_GPU_MAX_SCANOUTS)
                    .map(|i| {
                        let at = CTRL_HDR_SIZE + i * DISPLAY_ONE_SIZE;
                        DisplayOne {
                            x: r.u32(at),
                            y: r.u32(at + 4),
                            width: r.u32(at + 8),
                            height: r.u32(at + 12),
                            enabled: r.u32(at + 16),
                            flags: r.u32(at + 20),
                        }
                    })
                    .collect();
                Response::OkDisplayInfo { hdr, modes }
            }
            VIRTIO_GPU_RESP_OK_CAPSET => Response::OkCapset {
                hdr,
                data: rest.to_vec(),
            },
            VIRTIO_GPU_RESP_OK_EDID => {
                let r = Reader::new(bytes, "OK_EDID", RESP_EDID_SIZE)?;
                let size = r.u32(24) as usize;
                if size > EDID_MAX_SIZE {
                    return Err(WireError::BadLength(format!(
                        "OK_EDID: size {size} > {EDID_MAX_SIZE}"
                    )));
                }
                let start = CTRL_HDR_SIZE + 8;
                Response::OkEdid {
                    hdr,
                    edid: bytes.get(start..start + size).unwrap_or_default().to_vec(),
                }
            }
            VIRTIO_GPU_RESP_OK_RESOURCE_UUID => {
                let r = Reader::new(bytes, "OK_RESOURCE_UUID", RESP_RESOURCE_UUID_SIZE)?;
                Response::OkResourceUuid {
                    hdr,
                    uuid: r.arr(CTRL_HDR_SIZE),
                }
            }
            other => match ErrorCode::from_u32(other) {
                Some(code) => Response::Err { hdr, code },
                None => return Err(WireError::UnknownType(other)),
            },
        })
    }

    /// An error response to a command with header `req` (fence echoed).
    pub fn error_for(req: &CtrlHdr, code: ErrorCode) -> Response {
        Response::Err {
            hdr: req.response(code.to_u32()),
            code,
        }
    }

    /// `OK_NODATA` (with hostmem `reply` bytes, usually empty) for `req`.
    pub fn ok_for(req: &CtrlHdr, reply: Vec<u8>) -> Response {
        Response::OkNoData {
            hdr: req.response(VIRTIO_GPU_RESP_OK_NODATA),
            reply,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_sizes_match_the_spec() {
        assert_eq!(Command::map_blob(1, 2, 3).encode().len(), 40);
        assert_eq!(Command::unmap_blob(1, 2).encode().len(), 32);
        assert_eq!(Command::unref(2).encode().len(), 32);
        assert_eq!(Command::create_blob(1, 2, 2, 1, 0, 4096).encode().len(), 56);
        assert_eq!(Command::ctx_create(1, 0, b"x").encode().len(), 96);
        assert_eq!(Command::ctx_destroy(1).encode().len(), 24);
        assert_eq!(Command::submit_3d(1, vec![1, 2, 3]).encode().len(), 35);
        assert_eq!(Command::get_capset_info(0).encode().len(), 32);
        assert_eq!(Command::get_capset(1, 1).encode().len(), 32);
        assert_eq!(Command::get_display_info().encode().len(), 24);
        assert_eq!(Command::ctx_attach_resource(1, 2).encode().len(), 32);
        assert_eq!(Command::ctx_detach_resource(1, 2).encode().len(), 32);
        let info = Response::OkDisplayInfo {
            hdr: CtrlHdr::default(),
            modes: vec![DisplayOne::default()],
        };
        assert_eq!(info.encode().len(), 408);
    }

    #[test]
    fn display_info_and_ctx_resource_round_trip() {
        let b = Command::ctx_attach_resource(3, 9).encode();
        assert_eq!(&b[0..4], &0x0202u32.to_le_bytes());
        assert_eq!(&b[24..28], &9u32.to_le_bytes());
        assert_eq!(
            Command::parse(&b).unwrap(),
            Command::ctx_attach_resource(3, 9)
        );
        let d = Command::ctx_detach_resource(3, 9).encode();
        assert_eq!(&d[0..4], &0x0203u32.to_le_bytes());
        assert!(Command::parse(&d[..31]).is_err());
        let mut modes = vec![DisplayOne::default(); VIRTIO_GPU_MAX_SCANOUTS];
        modes[1] = DisplayOne {
            x: 1,
            y: 2,
            width: 640,
            height: 480,
            enabled: 1,
            flags: 0,
        };
        let r = Response::OkDisplayInfo {
            hdr: CtrlHdr::new(VIRTIO_GPU_RESP_OK_DISPLAY_INFO),
            modes,
        };
        let e = r.encode();
        assert_eq!(&e[0..4], &0x1101u32.to_le_bytes());
        assert_eq!(&e[24 + 24 + 8..24 + 24 + 12], &640u32.to_le_bytes());
        assert_eq!(Response::parse(&e).unwrap(), r);
    }

    #[test]
    fn header_fields_are_little_endian_at_their_offsets() {
        let b = Command::map_blob(7, 0x1122_3344, 0x0102_0304_0506_0708)
            .fenced(0xaabb)
            .encode();
        assert_eq!(&b[0..4], &0x0208u32.to_le_bytes());
        assert_eq!(&b[4..8], &1u32.to_le_bytes());
        assert_eq!(&b[8..16], &0xaabbu64.to_le_bytes());
        assert_eq!(&b[16..20], &7u32.to_le_bytes());
        assert_eq!(&b[24..28], &0x1122_3344u32.to_le_bytes());
        assert_eq!(&b[32..40], &0x0102_0304_0506_0708u64.to_le_bytes());
    }

    /// Every display command: its size, its type and fields at their offsets, and a round
    /// trip; one byte short of each is truncated.
    #[test]
    fn display_commands_have_the_specs_layout() {
        let r = Rect::new(1, 2, 3, 4);
        let cases: Vec<(Command, usize, u32)> = vec![
            (Command::create_2d(7, 67, 640, 480), 40, 0x0101),
            (Command::set_scanout(1, 7, r), 48, 0x0103),
            (Command::resource_flush(7, r), 48, 0x0104),
            (Command::transfer_to_host_2d(7, r, 0x1122), 56, 0x0105),
            (
                Command::attach_backing(7, &[(0x1000, 4096), (0x9000, 100)]),
                32 + 32,
                0x0106,
            ),
            (Command::detach_backing(7), 32, 0x0107),
            (Command::get_edid(1), 32, 0x010a),
            (Command::assign_uuid(7), 32, 0x010b),
            (
                Command::set_scanout_blob(1, 7, 2, (640, 480), 2560, 4096),
                96,
                0x010d,
            ),
            (Command::update_cursor(0, (5, 6), 7, (1, 2)), 56, 0x0300),
            (Command::move_cursor(0, (5, 6)), 56, 0x0301),
        ];
        for (c, size, t) in cases {
            let b = c.encode();
            assert_eq!(b.len(), size, "{c:?}");
            assert_eq!(&b[0..4], &t.to_le_bytes(), "{c:?}");
            assert_eq!(c.type_(), t);
            assert_eq!(Command::parse(&b).unwrap(), c);
            let fixed = if t == 0x0106 { 32 } else { size };
            assert!(
                matches!(
                    Command::parse(&b[..fixed - 1]),
                    Err(WireError::Truncated { .. })
                ),
                "{c:?}"
            );
            let f = c.clone().fenced(9);
            assert_eq!(Command::parse(&f.encode()).unwrap().hdr().fence_id, 9);
        }
        // Field offsets (Linux's virtio_gpu.h).
        let b = Command::create_2d(7, 67, 640, 480).encode();
        assert_eq!(&b[24..28], &7u32.to_le_bytes());
        assert_eq!(&b[28..32], &67u32.to_le_bytes());
        assert_eq!(&b[32..36], &640u32.to_le_bytes());
        assert_eq!(&b[36..40], &480u32.to_le_bytes());
        let b = Command::set_scanout(1, 7, r).encode();
        assert_eq!(&b[24..28], &1u32.to_le_bytes(), "rect.x");
        assert_eq!(&b[36..40], &4u32.to_le_bytes(), "rect.height");
        assert_eq!(&b[40..44], &1u32.to_le_bytes(), "scanout_id");
        assert_eq!(&b[44..48], &7u32.to_le_bytes(), "resource_id");
        let b = Command::transfer_to_host_2d(7, r, 0x1122).encode();
        assert_eq!(&b[40..48], &0x1122u64.to_le_bytes(), "offset");
        assert_eq!(&b[48..52], &7u32.to_le_bytes(), "resource_id");
        let b = Command::attach_backing(7, &[(0x1000, 4096), (0x9000, 100)]).encode();
        assert_eq!(&b[28..32], &2u32.to_le_bytes(), "nr_entries");
        assert_eq!(&b[48..56], &0x9000u64.to_le_bytes(), "entry 1 addr");
        let b = Command::set_scanout_blob(1, 7, 2, (640, 480), 2560, 4096).encode();
        assert_eq!(&b[48..52], &640u32.to_le_bytes(), "width");
        assert_eq!(&b[56..60], &2u32.to_le_bytes(), "format");
        assert_eq!(&b[64..68], &2560u32.to_le_bytes(), "strides[0]");
        assert_eq!(&b[80..84], &4096u32.to_le_bytes(), "offsets[0]");
        let b = Command::update_cursor(0, (5, 6), 7, (1, 2)).encode();
        assert_eq!(&b[28..32], &5u32.to_le_bytes(), "pos.x");
        assert_eq!(&b[40..44], &7u32.to_le_bytes(), "resource_id");
        assert_eq!(&b[48..52], &2u32.to_le_bytes(), "hot_y");
        // ATTACH_BACKING's nr_entries is checked against the message.
        let mut b = Command::attach_backing(7, &[(0x1000, 4096)]).encode();
        b[28..32].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Command::parse(&b), Err(WireError::BadLength(_))));
    }

    #[test]
    fn edid_and_uuid_responses_round_trip() {
        let r = Response::OkEdid {
            hdr: CtrlHdr::new(VIRTIO_GPU_RESP_OK_EDID),
            edid: vec![7; 128],
        };
        let e = r.encode();
        assert_eq!(e.len(), RESP_EDID_SIZE);
        assert_eq!(&e[24..28], &128u32.to_le_bytes());
        assert_eq!(Response::parse(&e).unwrap(), r);
        let mut bad = e.clone();
        bad[24..28].copy_from_slice(&1025u32.to_le_bytes());
        assert!(matches!(
            Response::parse(&bad),
            Err(WireError::BadLength(_))
        ));
        assert!(Response::parse(&e[..RESP_EDID_SIZE - 1]).is_err());
        let u = Response::OkResourceUuid {
            hdr: CtrlHdr::new(VIRTIO_GPU_RESP_OK_RESOURCE_UUID),
            uuid: [9; 16],
        };
        let e = u.encode();
        assert_eq!(e.len(), RESP_RESOURCE_UUID_SIZE);
        assert_eq!(Response::parse(&e).unwrap(), u);
        assert!(Response::parse(&e[..39]).is_err());
    }

    #[test]
    fn huge_nr_entries_is_refused_without_allocating() {
        let mut b = Command::create_blob(0, 1, 1, 1, 0, 4096).encode();
        b[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Command::parse(&b), Err(WireError::BadLength(_))));
    }
}
