//! The `virgl` backend: a real renderer, Debian's virglrenderer 0.10.4 through the safe
//! wrapper [`hostmem_base::virgl`] (cargo feature `virgl`).
//!
//! # Renderer
//!
//! `virgl_renderer_init` with `EGL | SURFACELESS | GLES | VENUS` (0x59): headless on Mesa
//! llvmpipe (GL, for vrend contexts) and lavapipe (Vulkan, for venus contexts). At start
//! the backend asks the library which of the capsets VIRGL (1), VIRGL2 (2) and VENUS (4) it
//! offers and fills each once (`virgl_renderer_fill_caps` must have run before
//! `virgl_renderer_resource_get_map_info` answers).
//!
//! # Contexts, blobs, streams
//!
//! * `CTX_CREATE` with capset 0 makes a VIRGL2 (vrend) context; 1, 2, 4 as asked.
//! * `RESOURCE_CREATE_BLOB`: HOST3D only (GUEST needs guest RAM, which the device does not
//!   have), in a renderer context. A venus blob with `blob_id` 0 and flags exactly MAPPABLE
//!   is an SHM memfd inside the renderer; a vrend blob names a pipe resource that the
//!   context's stream created (`VIRGL_CCMD_PIPE_RESOURCE_CREATE` with that blob id).
//! * `SUBMIT_3D` is passed to `virgl_renderer_submit_cmd`; the backend then creates a fence
//!   for vrend (a global fence, polled until it signals). Venus streams run on in the render
//!   server; the guest's fenced commands get a **context fence on their ring**
//!   ([`Backend::create_fence`], up to 64 rings), which the device's loop waits for on the
//!   context's poll fd ([`Backend::fence_fds`], [`Backend::retire_fences`]) while it serves
//!   other chains (see [`crate::gpu`], "Fences").
//! * **Every resource id is checked against the backend's own table before it reaches the
//!   library** (unknown ids are `InvalidId`): some virglrenderer versions dereference an
//!   unknown id before they check it.
//!
//! # Placement
//!
//! `RESOURCE_MAP_BLOB` exports the blob (`virgl_renderer_resource_export_blob`):
//!
//! * SHM (type 3): the memfd is sealed against shrinking and growing (the VMM refuses
//!   unsealed fds: a file that shrinks under a mapping is a SIGBUS hole), `fd_offset` 0, and
//!   the map info the library reports. The device's mirror places it with MAP_FIXED and
//!   sends it to the VMM like any blob.
//! * OPAQUE (type 2, a venus `VkDeviceMemory` on lavapipe without udmabuf): the data does
//!   not start at file offset 0. 1.3.0 does not export OPAQUE resources at all (`-EINVAL`)
//!   but reports the fd it holds (`resource_get_info`, [`Renderer::resource_fd`]). Placed
//!   only when the fd is lavapipe's memory memfd holding the blob, from its data offset
//!   ([`super::opaque`]); any other OPAQUE fd is refused with `ERR_UNSPEC` and the reason.
//! * Export fails and no fd is known for a **pointer-only** blob (a vrend HOST3D buffer:
//!   the library has only an in-process pointer from `glMapBufferRange`). Nothing can cross
//!   into the VMM, so MAP_BLOB answers `ERR_UNSPEC` and a log line says why — never a
//!   success that maps nothing.
//!
//! The mirror's mapping: with `virgl_renderer_resource_map_fixed` (virglrenderer >= 1.3.0,
//! looked up at run time; Debian 12's 0.10.4 lacks it) the **renderer maps the blob into the
//! mirror itself** ([`Backend::map_fixed`], through
//! [`Window::place_with`](hostmem_base::window::Window::place_with), after every window
//! check). Without it, or when it answers `-EOPNOTSUPP` or fails, the mirror maps the
//! exported fd with its own MAP_FIXED. In both cases the exported fd goes to the VMM,
//! which cannot call into the renderer. The library maps its recorded size from file
//! offset 0, read/write: it is used only for an SHM fd whose size is exactly the
//! placement's length and a read/write placement.
//!
//! # Render server
//!
//! Debian's 1.3.0 builds venus only into its render server (`virgl_render_server`, a
//! separate process; 0.10.4 runs venus in-process). The library would fork and exec it,
//! which the device's jail forbids; instead, as crosvm does, **the VMM starts the server in
//! a jail of its own** and hands the device one end of a SOCK_SEQPACKET pair
//! (`--virgl-server-fd N`), which [`VirglOptions::render_server`] gives the library through
//! its `get_server_fd` callback (`VIRGL_RENDERER_RENDER_SERVER`). The device then needs no
//! fork, no exec and no Vulkan driver of its own for venus.
//!
//! # Test ops (hostmem-private, off unless the device runs with `--test-ops`)
//!
//! To prove that the guest sees what the renderer sees, with `--test-ops` the backend also
//! offers capset [`TEST_CAPSET_ID`]. A context of that capset has no renderer context; its
//! `SUBMIT_3D` streams are the shm backend's FILL / WRITE / CHECKSUM ops
//! ([`super::shm::decode_stream`]) and run **through the renderer's own mapping**
//! (`virgl_renderer_resource_map`) of any blob the backend holds, so a FILL is a write by
//! the renderer that the KVM guest must then read through the window, and a CHECKSUM reads
//! back a guest write through the renderer. A device started without `--test-ops` does not
//! offer the capset and refuses contexts of it.

use std::collections::BTreeMap;
use std::os::fd::AsFd;

use hostmem_base::shm::SharedMemory;
use hostmem_base::virgl::{self, Renderer, FD_TYPE_DMABUF, FD_TYPE_OPAQUE, FD_TYPE_SHM};
use hostmem_base::window::FixedTarget;

use super::shm::{apply_op, decode_stream, ShmOp, CHECKSUM_INIT};
use super::{Backend, BackendError, BlobCreate, CapsetInfo, ExportedBlob};
use crate::wire::{
    VIRTIO_GPU_BLOB_MEM_HOST3D, VIRTIO_GPU_CAPSET_VENUS, VIRTIO_GPU_CAPSET_VIRGL,
    VIRTIO_GPU_CAPSET_VIRGL2,
};

/// The hostmem-private test capset: not a spec id, next to the shm backend's
/// [`super::shm::SHM_CAPSET_ID`], below 32 for Linux's driver (see there).
pub const TEST_CAPSET_ID: u32 = 30;
/// Its only version.
pub const TEST_CAPSET_VERSION: u32 = 1;
/// Its bytes: `b"HMVIRGL\0"` and the op bit mask of the shm stream (FILL, WRITE, CHECKSUM).
pub const TEST_CAPSET_BYTES: &[u8; 12] = b"HMVIRGL\0\x0e\0\0\0";

/// Capsets asked of the library, in `GET_CAPSET_INFO` index order.
const LIBRARY_CAPSETS: [u32; 3] = [
    VIRTIO_GPU_CAPSET_VIRGL,
    VIRTIO_GPU_CAPSET_VIRGL2,
    VIRTIO_GPU_CAPSET_VENUS,
];

/// Polls of `virgl_renderer_poll` before a vrend fence counts as lost.
const FENCE_SPINS: u32 = 100_000;

#[derive(Debug, Clone, Copy)]
struct VirglBlob {
    ctx_id: u32,
    size: u64,
}

/// How the virgl backend starts its renderer.
#[derive(Debug, Default)]
pub struct VirglOptions {
    /// Offer the hostmem-private test capset (see the module docs).
    pub test_ops: bool,
    /// A connected socket to a running virglrenderer render server: venus runs there
    /// (`VIRGL_RENDERER_RENDER_SERVER`). Debian's 1.3.0 builds venus only that way; 0.10.4
    /// runs it in-process. The VMM starts the server in its own jail (see the module docs).
    pub render_server: Option<std::os::fd::OwnedFd>,
}

/// The virgl backend (see the module docs).
#[derive(Debug)]
pub struct VirglBackend {
    renderer: Renderer,
    capsets: Vec<CapsetInfo>,
    test_ops: bool,
    /// Live contexts and their capset (TEST_CAPSET_ID: no renderer context).
    contexts: BTreeMap<u32, u32>,
    blobs: BTreeMap<u32, VirglBlob>,
    next_fence: u32,
    /// Venus context fences not retired yet: the highest asked and the highest reported
    /// ([`Backend::retire_fences`]) per (context, ring).
    fences: BTreeMap<(u32, u32), (u64, u64)>,
}

fn call_error(what: &str, e: virgl::Error) -> BackendError {
    BackendError::Unspec(format!("{what}: {e}"))
}

impl VirglBackend {
    /// Initializes virglrenderer headless and reads its capsets. `test_ops` offers the
    /// private [`TEST_CAPSET_ID`] (see the module docs).
    pub fn new(test_ops: bool) -> Result<Self, BackendError> {
        Self::with_options(VirglOptions {
            test_ops,
            render_server: None,
        })
    }

    /// [`VirglBackend::new`] with all the options.
    pub fn with_options(opts: VirglOptions) -> Result<Self, BackendError> {
        let test_ops = opts.test_ops;
        if opts.render_server.is_some() {
            log::info!("virgl: venus in the render server behind the socket we were given");
        }
        let renderer = Renderer::init_with_server(virgl::HEADLESS_FLAGS, opts.render_server)
            .map_err(|e| BackendError::Unspec(format!("virglrenderer: {e}")))?;
        let mut capsets = Vec::new();
        for id in LIBRARY_CAPSETS {
            let (max_version, max_size) = renderer.capset_info(id);
            // 0.10.4 reports venus as version 0: only the size says whether a set exists.
            if max_size == 0 {
                log::info!("virgl: capset {id} not offered by the library");
                continue;
            }
            // Filling once is what makes get_map_info answer (vrend reads its caps there).
            renderer
                .fill_caps(id, max_version)
                .map_err(|e| call_error("virgl_renderer_fill_caps", e))?;
            capsets.push(CapsetInfo {
                id,
                max_version,
                max_size,
            });
        }
        if test_ops {
            // info: `hostmem run --backend virgl` turns them on itself to prove the sharing.
            log::info!("virgl: hostmem test ops enabled (capset {TEST_CAPSET_ID:#x})");
            capsets.push(CapsetInfo {
                id: TEST_CAPSET_ID,
                max_version: TEST_CAPSET_VERSION,
                max_size: TEST_CAPSET_BYTES.len() as u32,
            });
        }
        log::info!(
            "virgl: capsets {:?}",
            capsets.iter().map(|c| c.id).collect::<Vec<_>>()
        );
        Ok(VirglBackend {
            renderer,
            capsets,
            test_ops,
            contexts: BTreeMap::new(),
            blobs: BTreeMap::new(),
            next_fence: 1,
            fences: BTreeMap::new(),
        })
    }

    /// Whether the loaded library has `virgl_renderer_resource_map_fixed`.
    pub fn has_map_fixed(&self) -> bool {
        self.renderer.has_map_fixed()
    }

    /// Number of live blobs.
    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }

    fn blob(&self, id: u32) -> Result<VirglBlob, BackendError> {
        self.blobs
            .get(&id)
            .copied()
            .ok_or_else(|| BackendError::InvalidId(format!("no resource {id}")))
    }

    fn run_test_ops(&self, stream: &[u8]) -> Result<Vec<u8>, BackendError> {
        let ops = decode_stream(stream)?;
        // Check everything before anything runs, as the shm backend does.
        for op in &ops {
            let id = op.resource_id();
            let blob = self.blob(id).map_err(|_| {
                BackendError::InvalidParameter(format!("stream names unknown resource {id}"))
            })?;
            if let Err(e) = op.check_within(blob.size) {
                return Err(BackendError::InvalidParameter(format!(
                    "resource {id}: {e}"
                )));
            }
        }
        let mut reply = Vec::new();
        for op in &ops {
            let id = op.resource_id();
            let (offset, len) = op.range();
            if len == 0 && !matches!(op, ShmOp::StoreChecksum { .. }) {
                if matches!(op, ShmOp::Checksum { .. }) {
                    reply.extend_from_slice(&CHECKSUM_INIT.to_le_bytes());
                }
                continue;
            }
            // The renderer's own mapping: what the renderer writes and reads.
            let map = self
                .renderer
                .map(id)
                .map_err(|e| call_error("renderer mapping", e))?;
            let io = |e: virgl::Error| BackendError::Unspec(format!("resource {id}: {e}"));
            let to_usize = |v: u64| {
                usize::try_from(v)
                    .map_err(|_| BackendError::InvalidParameter(format!("{v:#x} too large")))
            };
            let (start, len) = (to_usize(offset)?, to_usize(len)?);
            apply_op(
                op,
                start,
                len,
                |at, b| map.write_slice(at, b).map_err(io),
                |at, b| map.read_slice(at, b).map_err(io),
                &mut reply,
            )?;
        }
        Ok(reply)
    }
}

impl Backend for VirglBackend {
    fn name(&self) -> &'static str {
        "virgl"
    }

    fn map_fixed(
        &self,
        resource_id: u32,
        blob: &ExportedBlob,
        target: &FixedTarget<'_>,
    ) -> Result<bool, String> {
        // Only ids this backend created reach the library (1.3.0 dereferences unknown ids);
        // export_blob only hands out SHM fds from offset 0, which is what the library maps.
        if !self.blobs.contains_key(&resource_id) || blob.fd_offset != 0 {
            return Ok(false);
        }
        self.renderer
            .map_fixed(resource_id, blob.fd.as_fd(), target)
            .map_err(|e| e.to_string())
    }

    fn capsets(&self) -> Vec<CapsetInfo> {
        self.capsets.clone()
    }

    fn capset(&mut self, id: u32, version: u32) -> Result<Vec<u8>, BackendError> {
        if self.test_ops && id == TEST_CAPSET_ID && version == TEST_CAPSET_VERSION {
            return Ok(TEST_CAPSET_BYTES.to_vec());
        }
        if !self
            .capsets
            .iter()
            .any(|c| c.id == id && id != TEST_CAPSET_ID && version <= c.max_version)
        {
            return Err(BackendError::InvalidParameter(format!(
                "no capset {id} version {version}"
            )));
        }
        self.renderer
            .fill_caps(id, version)
            .map_err(|e| BackendError::InvalidParameter(e.to_string()))
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
        let capset = if capset_id == 0 {
            VIRTIO_GPU_CAPSET_VIRGL2
        } else {
            capset_id
        };
        if !self.capsets.iter().any(|c| c.id == capset) {
            return Err(BackendError::InvalidParameter(format!(
                "capset {capset} not offered by the virgl backend"
            )));
        }
        if capset != TEST_CAPSET_ID {
            self.renderer
                .context_create(ctx_id, capset, name)
                .map_err(|e| call_error("context create", e))?;
        }
        log::debug!("virgl: context {ctx_id} created with capset {capset}");
        self.contexts.insert(ctx_id, capset);
        Ok(())
    }

    fn destroy_context(&mut self, ctx_id: u32) -> Result<(), BackendError> {
        let capset = self
            .contexts
            .remove(&ctx_id)
            .ok_or_else(|| BackendError::InvalidId(format!("no context {ctx_id}")))?;
        if capset != TEST_CAPSET_ID {
            self.renderer.context_destroy(ctx_id);
        }
        self.fences.retain(|k, _| k.0 != ctx_id);
        Ok(())
    }

    fn create_fence(
        &mut self,
        ctx_id: u32,
        ring_idx: u32,
        fence_id: u64,
    ) -> Result<bool, BackendError> {
        let capset = *self
            .contexts
            .get(&ctx_id)
            .ok_or_else(|| BackendError::InvalidId(format!("no context {ctx_id}")))?;
        // Test ops and vrend streams complete inside submit_3d.
        if capset != VIRTIO_GPU_CAPSET_VENUS {
            return Ok(true);
        }
        self.renderer
            .context_create_fence(ctx_id, ring_idx, fence_id)
            .map_err(|e| call_error("context fence", e))?;
        self.renderer.context_poll(ctx_id);
        if virgl::last_context_fence(ctx_id, ring_idx) >= fence_id {
            return Ok(true);
        }
        let e = self.fences.entry((ctx_id, ring_idx)).or_insert((0, 0));
        e.0 = e.0.max(fence_id);
        Ok(false)
    }

    fn fence_fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        let mut ctxs: Vec<u32> = self.fences.keys().map(|k| k.0).collect();
        ctxs.dedup();
        ctxs.into_iter()
            .filter_map(|c| self.renderer.context_poll_fd(c))
            .collect()
    }

    fn retire_fences(&mut self) -> Vec<(u32, u32, u64)> {
        let mut ctxs: Vec<u32> = self.fences.keys().map(|k| k.0).collect();
        ctxs.dedup();
        for c in ctxs {
            self.renderer.context_poll(c);
        }
        let mut out = Vec::new();
        self.fences.retain(|&(ctx, ring), (asked, reported)| {
            let last = virgl::last_context_fence(ctx, ring);
            if last > *reported {
                *reported = last;
                out.push((ctx, ring, last));
            }
            *reported < *asked
        });
        out
    }

    fn fences_pending(&self) -> bool {
        !self.fences.is_empty()
    }

    fn create_blob(&mut self, args: &BlobCreate) -> Result<(), BackendError> {
        let id = args.resource_id;
        if id == 0 || self.blobs.contains_key(&id) {
            return Err(BackendError::InvalidId(format!(
                "resource {id} is zero or exists"
            )));
        }
        if args.blob_mem != VIRTIO_GPU_BLOB_MEM_HOST3D {
            return Err(BackendError::InvalidParameter(format!(
                "blob_mem {} not supported by the virgl backend (HOST3D only)",
                args.blob_mem
            )));
        }
        match self.contexts.get(&args.ctx_id) {
            Some(&c) if c != TEST_CAPSET_ID => {}
            _ => {
                return Err(BackendError::InvalidId(format!(
                    "context {} is not a renderer context",
                    args.ctx_id
                )))
            }
        }
        self.renderer
            .create_blob(
                id,
                args.ctx_id,
                args.blob_mem,
                args.blob_flags,
                args.blob_id,
                args.size,
            )
            .map_err(|e| {
                BackendError::InvalidParameter(format!("virgl_renderer_resource_create_blob: {e}"))
            })?;
        self.blobs.insert(
            id,
            VirglBlob {
                ctx_id: args.ctx_id,
                size: args.size,
            },
        );
        Ok(())
    }

    fn unref(&mut self, resource_id: u32) -> Result<(), BackendError> {
        self.blob(resource_id)?;
        self.renderer.resource_unref(resource_id);
        self.blobs.remove(&resource_id);
        Ok(())
    }

    fn submit_3d(&mut self, ctx_id: u32, stream: &[u8]) -> Result<Vec<u8>, BackendError> {
        let capset = *self
            .contexts
            .get(&ctx_id)
            .ok_or_else(|| BackendError::InvalidId(format!("no context {ctx_id}")))?;
        if capset == TEST_CAPSET_ID {
            return self.run_test_ops(stream);
        }
        self.renderer
            .submit_cmd(ctx_id, stream)
            .map_err(|e| BackendError::InvalidParameter(e.to_string()))?;
        if capset == VIRTIO_GPU_CAPSET_VENUS {
            // venus: the guest fences what it waits for (a context fence per ring,
            // `create_fence`); the stream runs on in the render server meanwhile.
        } else {
            // vrend: complete the stream's GL work before the response goes out.
            let fence = self.next_fence;
            self.next_fence = self.next_fence.checked_add(1).unwrap_or(1);
            let done = self
                .renderer
                .fence_and_wait(fence, ctx_id, FENCE_SPINS)
                .map_err(|e| call_error("fence", e))?;
            if !done {
                return Err(BackendError::Unspec(format!(
                    "vrend fence {fence} of context {ctx_id} did not signal"
                )));
            }
        }
        Ok(Vec::new())
    }

    fn export_blob(&mut self, resource_id: u32) -> Result<ExportedBlob, BackendError> {
        let blob = self.blob(resource_id)?;
        let map_info = self
            .renderer
            .map_info(resource_id)
            .map_err(|e| call_error("map info", e))?;
        let exported = match self.renderer.export_blob(resource_id) {
            Ok(x) if x.fd_type != FD_TYPE_OPAQUE => x,
            // 1.3.0 refuses to export an OPAQUE resource (a venus VkDeviceMemory on
            // lavapipe) but holds its fd; older versions export it. Either way, only
            // lavapipe's layout is placed, from where its data starts.
            first => {
                let (size, ctx_id) = (blob.size, blob.ctx_id);
                return self.export_opaque(resource_id, ctx_id, size, map_info, first.err());
            }
        };
        match exported.fd_type {
            FD_TYPE_SHM => {}
            FD_TYPE_DMABUF => {
                return Err(BackendError::Unspec(format!(
                    "resource {resource_id} exports a dma-buf: not placeable here (no render node)"
                )))
            }
            other => {
                return Err(BackendError::Unspec(format!(
                    "resource {resource_id} exports fd type {other}"
                )))
            }
        }
        // The VMM maps only fds sealed against shrinking; seal it if the library did not.
        let shm = SharedMemory::from_fd(exported.fd, blob.size)
            .map_err(|e| BackendError::Unspec(format!("resource {resource_id}: {e}")))?;
        const SHRINK_AND_GROW: i32 = libc_seals::SHRINK | libc_seals::GROW;
        let seals = shm
            .seals()
            .map_err(|e| BackendError::Unspec(format!("resource {resource_id}: {e}")))?;
        if seals & SHRINK_AND_GROW != SHRINK_AND_GROW {
            shm.seal_size().map_err(|e| {
                BackendError::Unspec(format!(
                    "resource {resource_id}: the renderer's memfd cannot be sealed: {e}"
                ))
            })?;
        }
        Ok(ExportedBlob {
            size: blob.size,
            fd: shm.into_fd(),
            fd_offset: 0,
            map_info,
        })
    }
}

impl VirglBackend {
    /// MAP_BLOB of a blob `export_blob` did not hand out as SHM: an OPAQUE export, or an
    /// export refused (`export_err`). Placed only if the resource's fd is lavapipe's
    /// memory memfd holding the blob ([`super::opaque`]), at its data offset.
    fn export_opaque(
        &mut self,
        resource_id: u32,
        ctx_id: u32,
        size: u64,
        map_info: u32,
        export_err: Option<virgl::Error>,
    ) -> Result<ExportedBlob, BackendError> {
        let fd = match self.renderer.resource_fd(resource_id) {
            Ok(fd) => fd,
            Err(e) => {
                let why = match export_err {
                    Some(x) => format!(
                        "resource {resource_id} (context {ctx_id}) is pointer-only: virglrenderer cannot export \
                         it ({x}) nor name its fd ({e}); its memory exists only inside the \
                         renderer (a vrend HOST3D buffer), so it cannot be placed in the \
                         VMM's window"
                    ),
                    None => format!("resource {resource_id}: OPAQUE export without an fd: {e}"),
                };
                crate::gpu::COMMAND_WARNINGS.warn(
                    "virgl blob not exportable",
                    format_args!("virgl: MAP_BLOB refused: {why}"),
                );
                return Err(BackendError::Unspec(why));
            }
        };
        match super::opaque::data_offset_of(&fd, size) {
            Ok(fd_offset) => {
                log::debug!(
                    "virgl: resource {resource_id}: lavapipe OPAQUE memory, data at {fd_offset:#x}"
                );
                Ok(ExportedBlob {
                    size,
                    fd,
                    fd_offset,
                    map_info,
                })
            }
            Err(why) => {
                let why = format!("resource {resource_id}: OPAQUE fd refused: {why}");
                crate::gpu::COMMAND_WARNINGS.warn(
                    "virgl opaque fd refused",
                    format_args!("virgl: MAP_BLOB refused: {why}"),
                );
                Err(BackendError::Unspec(why))
            }
        }
    }
}

/// `F_SEAL_*` values (linux/fcntl.h), to read `F_GET_SEALS` without a libc dependency.
mod libc_seals {
    pub const SHRINK: i32 = 0x0002;
    pub const GROW: i32 = 0x0004;
}
