//! The blob, context and 3D commands, the [`Command`] enum, and its builders (for drivers and
//! tests).

use super::{
    CtrlHdr, GetEdid, ResourceAttachBacking, ResourceCreate2d, ResourceFlush, SetScanout,
    SetScanoutBlob, TransferToHost2d, UpdateCursor, CTX_DEBUG_NAME_LEN,
    VIRTIO_GPU_CMD_CTX_ATTACH_RESOURCE, VIRTIO_GPU_CMD_CTX_CREATE, VIRTIO_GPU_CMD_CTX_DESTROY,
    VIRTIO_GPU_CMD_CTX_DETACH_RESOURCE, VIRTIO_GPU_CMD_GET_CAPSET, VIRTIO_GPU_CMD_GET_CAPSET_INFO,
    VIRTIO_GPU_CMD_GET_DISPLAY_INFO, VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB,
    VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB, VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB,
    VIRTIO_GPU_CMD_RESOURCE_UNREF, VIRTIO_GPU_CMD_SUBMIT_3D,
    VIRTIO_GPU_CONTEXT_INIT_CAPSET_ID_MASK, VIRTIO_GPU_FLAG_FENCE,
};

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

impl Command {
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
}

impl Command {
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
