//! Renderer backends. A backend owns blob memory and the renderer's command streams; the
//! device's command handler ([`crate::gpu`]) owns validation, the blob table and placement.

use std::os::fd::OwnedFd;

use hostmem_base::window::FixedTarget;

pub mod opaque;
pub mod shm;
#[cfg(feature = "virgl")]
pub mod virgl;

/// Which renderer backend the device runs: `--backend` of both binaries (a clap value
/// list, so an unknown name is refused with the names), [`crate::process::Args::backend`]
/// and the VMM's `DeviceConfig::backend`. Its [`name`](BackendKind::name) is what the
/// device's command line, the policy file names (`gpu_device_{name}.policy`) and the
/// reports carry.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Plain memfd blobs (always built).
    #[default]
    Shm,
    /// virglrenderer (cargo feature `virgl`; a build without it refuses to start one).
    Virgl,
}

impl BackendKind {
    /// The name on the command line and in reports: `shm`, `virgl`.
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Shm => "shm",
            BackendKind::Virgl => "virgl",
        }
    }

    /// True for [`BackendKind::Virgl`].
    pub fn is_virgl(self) -> bool {
        self == BackendKind::Virgl
    }

    /// Whether this build of the device has the backend.
    pub fn is_built(self) -> bool {
        match self {
            BackendKind::Shm => true,
            BackendKind::Virgl => cfg!(feature = "virgl"),
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a backend refused an operation. The handler turns it into a virtio-gpu error
/// response ([`BackendError::response`]) and logs the message.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The resource or context id is unknown to the backend.
    #[error("invalid resource or context id: {0}")]
    InvalidId(String),
    /// The arguments are malformed or unsupported.
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// Allocation failed.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// Anything else, with the reason (e.g. "vrend HOST3D blob is pointer-only").
    #[error("{0}")]
    Unspec(String),
}

/// One capability set the backend offers (`GET_CAPSET_INFO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapsetInfo {
    /// `VIRTIO_GPU_CAPSET_*` id.
    pub id: u32,
    /// Highest version.
    pub max_version: u32,
    /// Size of the capset blob in bytes.
    pub max_size: u32,
}

/// Arguments of `RESOURCE_CREATE_BLOB` after the handler validated them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobCreate {
    /// Context the blob belongs to (0 for none).
    pub ctx_id: u32,
    /// Guest-chosen resource id (non-zero, unused).
    pub resource_id: u32,
    /// `VIRTIO_GPU_BLOB_MEM_*`.
    pub blob_mem: u32,
    /// `VIRTIO_GPU_BLOB_FLAG_*`.
    pub blob_flags: u32,
    /// Renderer object id (venus/vrend), 0 for plain memory.
    pub blob_id: u64,
    /// Size in bytes (non-zero, page-aligned).
    pub size: u64,
}

/// A blob exported so that it can cross processes and be placed with MAP_FIXED.
#[derive(Debug)]
pub struct ExportedBlob {
    /// A mappable fd (memfd / shm / dma-buf) holding the blob.
    pub fd: OwnedFd,
    /// Where the blob's bytes start inside `fd`.
    pub fd_offset: u64,
    /// Length of the blob in bytes.
    pub size: u64,
    /// `VIRTIO_GPU_MAP_CACHE_*` for `OK_MAP_INFO`.
    pub map_info: u32,
}

/// A renderer backend.
pub trait Backend: Send {
    /// Maps the exported blob over `target` (the mirror's range for it) the renderer's own
    /// way, e.g. virglrenderer's `virgl_renderer_resource_map_fixed`: `Ok(true)` when it
    /// mapped `blob.fd` there, `Ok(false)` when the placer should map the fd itself (the
    /// default), `Err` when the renderer tried and failed (the placer then maps the fd).
    fn map_fixed(
        &self,
        _resource_id: u32,
        _blob: &ExportedBlob,
        _target: &FixedTarget<'_>,
    ) -> Result<bool, String> {
        Ok(false)
    }
    /// Short name (`shm`, `virgl`).
    fn name(&self) -> &'static str;
    /// Capability sets offered.
    fn capsets(&self) -> Vec<CapsetInfo>;
    /// The capset blob for `id`/`version`.
    fn capset(&mut self, id: u32, version: u32) -> Result<Vec<u8>, BackendError>;
    /// `CTX_CREATE`.
    fn create_context(
        &mut self,
        ctx_id: u32,
        capset_id: u32,
        name: &[u8],
    ) -> Result<(), BackendError>;
    /// `CTX_DESTROY`.
    fn destroy_context(&mut self, ctx_id: u32) -> Result<(), BackendError>;
    /// `RESOURCE_CREATE_BLOB`.
    fn create_blob(&mut self, args: &BlobCreate) -> Result<(), BackendError>;
    /// `RESOURCE_UNREF` (the handler has already unmapped it if it was mapped).
    fn unref(&mut self, resource_id: u32) -> Result<(), BackendError>;
    /// `SUBMIT_3D`: run a command stream in a context. Returns reply bytes that the device
    /// appends after the response header (the shm backend's checksum query; empty otherwise).
    fn submit_3d(&mut self, ctx_id: u32, stream: &[u8]) -> Result<Vec<u8>, BackendError>;
    /// A context fence on `ring_idx` of `ctx_id` after the work submitted there (a fenced
    /// command: `FLAG_FENCE`, the ring from `FLAG_INFO_RING_IDX`, else 0): `Ok(true)` when
    /// it is signalled already, `Ok(false)` when it retires later through
    /// [`Backend::retire_fences`]. The default: the backend's work is synchronous, so every
    /// fence is signalled at once.
    fn create_fence(
        &mut self,
        ctx_id: u32,
        ring_idx: u32,
        fence_id: u64,
    ) -> Result<bool, BackendError> {
        let _ = (ctx_id, ring_idx, fence_id);
        Ok(true)
    }
    /// Fds that become readable when a pending fence may have retired, for the device's
    /// poll loop (empty: none pending, or the renderer gives none and must be polled).
    fn fence_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        Vec::new()
    }
    /// Fences retired since the last call: `(ctx_id, ring_idx, highest fence id)` per ring
    /// that advanced. Never blocks.
    fn retire_fences(&mut self) -> Vec<(u32, u32, u64)> {
        Vec::new()
    }
    /// Whether fences are pending ([`Backend::create_fence`] answered `Ok(false)` and they
    /// have not all retired).
    fn fences_pending(&self) -> bool {
        false
    }
    /// Export a blob for placement (called for `RESOURCE_MAP_BLOB`). A blob that cannot
    /// cross processes (pointer-only) must fail with [`BackendError::Unspec`] and a reason.
    fn export_blob(&mut self, resource_id: u32) -> Result<ExportedBlob, BackendError>;
}
