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

use codec::Reader;

mod codec;
mod command;
mod display;
mod response;

pub use codec::ctrl_type_name;
pub use command::{
    Command, CtxCreate, GetCapset, GetCapsetInfo, MemEntry, ResourceCmd, ResourceCreateBlob,
    ResourceMapBlob, Submit3d,
};
pub use display::{
    CursorPos, DisplayOne, GetEdid, Rect, ResourceAttachBacking, ResourceCreate2d, ResourceFlush,
    SetScanout, SetScanoutBlob, TransferToHost2d, UpdateCursor,
};
pub use response::{ErrorCode, Response};

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
