//! The cases and their workload: which cases exist ([`CaseKind`]), the blobs every case
//! runs ([`Workload`]) and how each case places them (`Route`). A new case is a
//! [`CaseKind`] variant (with its name and mode) and an arm of `Route::new`.

use std::collections::BTreeMap;
use std::os::fd::AsFd;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use hostmem_base::mmap::{MemoryMapping, Prot};
use hostmem_base::shm::SharedMemory;
use hostmem_device::backend::shm::{
    encode_stream, pattern_bytes, pattern_qword, ShmBackend, ShmOp,
};
use hostmem_device::backend::Backend;
use hostmem_device::gpu::{Gpu, MapRequest, PlaceError, Placer};
use hostmem_device::wire::{
    Command, Response, VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE, VIRTIO_GPU_BLOB_MEM_HOST3D,
};
use hostmem_ipc::protocol::{Outcome, RefuseCode};
use serde::Serialize;

use super::BenchOptions;
use crate::device::Device;
use crate::hostmem::{Hostmem, MapEvent, Mode};
use crate::queue_driver::QueueDriver;
use crate::run::Rng;

pub(super) const PAGE: u64 = 4096;
/// The context every case's blobs live in.
pub(super) const CTX: u32 = 1;
/// First resource id of the background blobs.
pub(super) const BG_RES: u32 = 100_000;
/// Resource ids of the two remap-test blobs.
pub(super) const SPIN_RES: [u32; 2] = [200_000, 200_001];
/// Stride of background blobs (4 KiB blob, 4 KiB gap: every one is its own VMA).
pub(super) const BG_STRIDE: u64 = 2 * PAGE;
/// Reads per `spin_read` call while the host remaps.
pub(super) const SPIN_CHUNK: u64 = 20_000;

/// One benchmark case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CaseKind {
    /// MAP_FIXED place + restore on a window in one process, no IPC, no checks.
    Floor,
    /// The device logic in the VMM's process, fixed mode.
    FixedInproc,
    /// The device logic in the VMM's process, a memslot per blob.
    SlotInproc,
    /// Jailed device, tubes, validation, mirror placement: the product path.
    FixedSandboxed,
    /// The product path with a memslot per blob.
    SlotSandboxed,
    /// The product path with many commands in flight.
    FixedSandboxedPipelined,
}

impl CaseKind {
    /// Every case, in report order.
    pub const ALL: [CaseKind; 6] = [
        CaseKind::Floor,
        CaseKind::FixedInproc,
        CaseKind::SlotInproc,
        CaseKind::FixedSandboxed,
        CaseKind::SlotSandboxed,
        CaseKind::FixedSandboxedPipelined,
    ];

    /// The name in reports.
    pub fn name(self) -> &'static str {
        match self {
            CaseKind::Floor => "floor",
            CaseKind::FixedInproc => "fixed-inproc",
            CaseKind::SlotInproc => "slot-inproc",
            CaseKind::FixedSandboxed => "fixed-sandboxed",
            CaseKind::SlotSandboxed => "slot-sandboxed",
            CaseKind::FixedSandboxedPipelined => "fixed-sandboxed-pipelined",
        }
    }

    /// The placement mode.
    pub fn mode(self) -> Mode {
        match self {
            CaseKind::SlotInproc | CaseKind::SlotSandboxed => Mode::PerBlobSlot,
            _ => Mode::Fixed,
        }
    }
}

/// One blob of the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BlobSpec {
    /// Resource id.
    pub res: u32,
    /// Window offset.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
    /// Fill pattern seed.
    pub seed: u64,
}

impl BlobSpec {
    /// The blob's first qword (what the guest reads at its offset).
    pub fn first_qword(&self) -> u64 {
        pattern_qword(self.seed, 0)
    }
}

/// The blobs every case runs: cycled blobs in the lower half of the window, background
/// blobs above them, and two remap-test blobs sharing one offset at the top.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Blobs mapped and unmapped in the timed cycles.
    pub cycling: Vec<BlobSpec>,
    /// Background blobs (4 KiB, kept mapped during a level).
    pub background: Vec<BlobSpec>,
    /// The two remap-test blobs (same offset, different patterns).
    pub spin: [BlobSpec; 2],
}

impl Workload {
    /// The workload of `opts` (deterministic in `opts.seed`).
    pub fn new(opts: &BenchOptions) -> anyhow::Result<Workload> {
        let w = opts.window;
        if w < (8 << 20) || !w.is_multiple_of(2 << 20) {
            bail!("window must be a multiple of 2 MiB, at least 8 MiB");
        }
        let mut rng = Rng::new(opts.seed);
        let n = opts.blobs.max(opts.queue_depth).max(2);
        let mut cycling = Vec::with_capacity(n);
        let mut cursor = 0u64;
        for i in 0..n {
            let size = crate::run::blob_size(&mut rng).min(opts.max_blob.max(PAGE) / PAGE * PAGE);
            let offset = cursor + rng.below(8) * PAGE;
            cursor = offset + size;
            if cursor > w / 2 {
                bail!("{n} blobs do not fit in half of a {} MiB window", w >> 20);
            }
            cycling.push(BlobSpec {
                res: 1 + i as u32,
                offset,
                size,
                seed: rng.next_u64(),
            });
        }
        let max_bg = opts.levels.iter().copied().max().unwrap_or(0);
        if w / 2 + max_bg as u64 * BG_STRIDE > w - w / 8 {
            bail!("{max_bg} background blobs do not fit in the window");
        }
        let background = (0..max_bg)
            .map(|j| BlobSpec {
                res: BG_RES + j as u32,
                offset: w / 2 + j as u64 * BG_STRIDE,
                size: PAGE,
                seed: rng.next_u64(),
            })
            .collect();
        let spin_off = w - w / 8;
        let spin = [0, 1].map(|k| BlobSpec {
            res: SPIN_RES[k],
            offset: spin_off,
            size: PAGE,
            seed: rng.next_u64() | 1,
        });
        Ok(Workload {
            cycling,
            background,
            spin,
        })
    }
}

/// The in-process placer: the device's handler calls the VMM's checks and placement
/// directly (no tube, no mirror), as a VMM with the device inside it does.
#[derive(Debug)]
pub struct InprocPlacer {
    hostmem: Arc<Hostmem>,
}

impl InprocPlacer {
    /// A placer over `hostmem`.
    pub fn new(hostmem: Arc<Hostmem>) -> Self {
        InprocPlacer { hostmem }
    }
}

fn place_result(o: Outcome) -> Result<(), PlaceError> {
    match o {
        Outcome::Ok => Ok(()),
        Outcome::Refused { code, reason } => Err(match code {
            RefuseCode::OutOfMemory => PlaceError::OutOfMemory(reason),
            RefuseCode::InvalidParameter => PlaceError::InvalidParameter(reason),
            RefuseCode::Unspec => PlaceError::Unspec(reason),
        }),
    }
}

impl Placer for InprocPlacer {
    fn map(&mut self, req: &MapRequest<'_>) -> Result<(), PlaceError> {
        // Hostmem takes ownership of the fd (and closes it), as it does of a received one.
        let fd = req
            .blob
            .fd
            .try_clone()
            .map_err(|e| PlaceError::OutOfMemory(format!("dup of the blob fd: {e}")))?;
        let ev = MapEvent {
            resource_id: req.resource_id,
            offset: req.offset,
            len: req.len,
            fd_offset: req.blob.fd_offset,
            prot: req.prot.bits(),
        };
        place_result(self.hostmem.handle_map(&ev, Some(fd)))
    }

    fn unmap(&mut self, resource_id: u32, offset: u64, len: u64) -> Result<(), PlaceError> {
        place_result(self.hostmem.handle_unmap(resource_id, offset, len))
    }

    fn window_size(&self) -> u64 {
        self.hostmem.window().size()
    }
}

/// How a case places blobs.
pub(super) enum Route {
    Floor {
        blobs: BTreeMap<u32, SharedMemory>,
        peak: usize,
    },
    Inproc {
        gpu: Box<Gpu<InprocPlacer>>,
    },
    Sandboxed {
        driver: Option<Box<QueueDriver>>,
        device: Option<Box<Device>>,
    },
}

pub(super) fn gpu_ok(r: Response, what: &str) -> anyhow::Result<()> {
    match r {
        Response::OkNoData { .. } | Response::OkMapInfo { .. } => Ok(()),
        other => bail!("{what}: {other:?}"),
    }
}

fn fill_stream(b: &BlobSpec) -> Vec<u8> {
    encode_stream(&[ShmOp::Fill {
        resource_id: b.res,
        offset: 0,
        len: b.size,
        seed: b.seed,
    }])
}

impl Route {
    pub(super) fn create(&mut self, b: &BlobSpec) -> anyhow::Result<()> {
        match self {
            Route::Floor { blobs, .. } => {
                let shm = SharedMemory::new("bench-blob", b.size)?;
                let map =
                    MemoryMapping::from_fd(shm.as_fd(), 0, b.size as usize, Prot::READ_WRITE)?;
                map.write_slice(0, &pattern_bytes(b.seed, 0, b.size as usize))?;
                shm.seal_size()?;
                blobs.insert(b.res, shm);
                Ok(())
            }
            Route::Inproc { gpu } => {
                let cmd = Command::create_blob(
                    CTX,
                    b.res,
                    VIRTIO_GPU_BLOB_MEM_HOST3D,
                    VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
                    0,
                    b.size,
                );
                gpu_ok(gpu.handle_command(&cmd.encode()), "CREATE_BLOB")?;
                let fill = Command::submit_3d(CTX, fill_stream(b));
                gpu_ok(gpu.handle_command(&fill.encode()), "SUBMIT_3D fill")
            }
            Route::Sandboxed { driver, .. } => {
                let d = driver.as_mut().ok_or_else(|| anyhow!("driver gone"))?;
                d.create_blob(CTX, b.res, 0, b.size)
                    .with_context(|| format!("CREATE_BLOB {}", b.res))?;
                d.submit_3d(CTX, fill_stream(b))
                    .with_context(|| format!("SUBMIT_3D fill {}", b.res))?;
                Ok(())
            }
        }
    }

    pub(super) fn map(&mut self, hm: &Hostmem, b: &BlobSpec) -> anyhow::Result<()> {
        match self {
            Route::Floor { blobs, peak } => {
                let fd = blobs
                    .get(&b.res)
                    .ok_or_else(|| anyhow!("no blob {}", b.res))?;
                hm.window()
                    .place(b.offset, b.size, fd.as_fd(), 0, Prot::READ_WRITE)?;
                *peak = (*peak).max(hm.window().live());
                Ok(())
            }
            Route::Inproc { gpu } => gpu_ok(
                gpu.handle_command(&Command::map_blob(CTX, b.res, b.offset).encode()),
                "MAP_BLOB",
            ),
            Route::Sandboxed { driver, .. } => {
                let d = driver.as_mut().ok_or_else(|| anyhow!("driver gone"))?;
                d.map_blob(CTX, b.res, b.offset)
                    .with_context(|| format!("MAP_BLOB {} at {:#x}", b.res, b.offset))?;
                Ok(())
            }
        }
    }

    pub(super) fn unmap(&mut self, hm: &Hostmem, b: &BlobSpec) -> anyhow::Result<()> {
        match self {
            Route::Floor { .. } => {
                hm.window().restore(b.offset, b.size)?;
                Ok(())
            }
            Route::Inproc { gpu } => gpu_ok(
                gpu.handle_command(&Command::unmap_blob(CTX, b.res).encode()),
                "UNMAP_BLOB",
            ),
            Route::Sandboxed { driver, .. } => {
                let d = driver.as_mut().ok_or_else(|| anyhow!("driver gone"))?;
                d.unmap_blob(CTX, b.res)
                    .with_context(|| format!("UNMAP_BLOB {}", b.res))?;
                Ok(())
            }
        }
    }
}

impl Route {
    /// How case `kind` places blobs (a new case adds its arm here).
    pub(super) fn new(
        kind: CaseKind,
        opts: &BenchOptions,
        hostmem: &Arc<Hostmem>,
    ) -> anyhow::Result<Route> {
        Ok(match kind {
            CaseKind::Floor => Route::Floor {
                blobs: BTreeMap::new(),
                peak: 0,
            },
            CaseKind::FixedInproc | CaseKind::SlotInproc => {
                let backend: Box<dyn Backend> = Box::new(ShmBackend::new());
                let mut gpu = Gpu::new(backend, InprocPlacer::new(hostmem.clone()));
                gpu_ok(
                    gpu.handle_command(&Command::ctx_create(CTX, 0, b"bench").encode()),
                    "CTX_CREATE",
                )?;
                Route::Inproc { gpu: Box::new(gpu) }
            }
            _ => {
                let device = Device::start(&opts.device, hostmem.clone())
                    .with_context(|| format!("{}: starting the device", kind.name()))?;
                let mut driver = QueueDriver::new(device.transport(), hostmem)?;
                wait_as_the_layout_wants(&mut driver, opts);
                driver.ctx_create(CTX, 0).context("CTX_CREATE")?;
                Route::Sandboxed {
                    driver: Some(Box::new(driver)),
                    device: Some(Box::new(device)),
                }
            }
        })
    }
}

/// `--cpu-layout split`: the driver shares its CPU with the mapping services, so it sleeps
/// for its interrupt as a halted vCPU does, one wake-up per wait (decision 045).
pub(super) fn wait_as_the_layout_wants(driver: &mut QueueDriver, opts: &BenchOptions) {
    if !opts.device.device_cpus.is_empty() {
        driver.set_lone_reply_spin(std::time::Duration::ZERO);
        driver.set_multi_reply_spin(std::time::Duration::ZERO);
    }
}
