//! `hostmem bench`: the memslot-per-blob problem measured side by side, with the physical
//! floor, all on real KVM.
//!
//! Six cases run the **same** blobs (sizes, offsets, fill seeds from one seed) in one run,
//! interleaved in round-robin batches so that machine noise hits them alike:
//!
//! | case | what it is |
//! |---|---|
//! | `floor` | `Window::place` + `Window::restore` (MAP_FIXED) in one process, no checks, no IPC |
//! | `fixed-inproc` | the device's [`Gpu`] handler in the VMM's process, placing through [`Hostmem`] in fixed mode (QEMU with the map_fixed patch) |
//! | `slot-inproc` | the same with a memslot per blob (QEMU before it) |
//! | `fixed-sandboxed` | the product: jailed device, commands on its real virtqueue (the host-side [`QueueDriver`]), tubes, validation, mirror placement in both processes |
//! | `slot-sandboxed` | the same path with a memslot per blob |
//! | `fixed-sandboxed-pipelined` | as `fixed-sandboxed`, with `queue_depth` commands in flight |
//! | `vhost-user-sandboxed` | as `fixed-sandboxed` over vhost-user (`SHMEM_MAP` into the VMM's window), run with it ([`crate::bench_vhost_user`]) |
//!
//! Every case owns a VM whose window is read by a ring-3 [`GuestProbe`] vCPU. One cycle is
//! MAP_BLOB (timed), the guest reads the blob (must see its pattern), UNMAP_BLOB (timed), the
//! guest reads the offset again (must no longer see the blob), then the guest re-reads a
//! fixed working set of its own RAM and that time is the **refault** cost (a memslot delete
//! makes KVM zap far more than the blob). Levels of background placements (4 KiB blobs that
//! stay mapped) give the cycle cost against live placements.
//!
//! After the timed levels, a **remap test** per case: synchronous remaps of two blobs with
//! different patterns at one offset (the guest reads after every acknowledged map/unmap:
//! seeing the previous content is a *stale read*, an access without memory behind it is a
//! *hole*), then thousands of remaps while a vCPU spins on reads of that offset on another
//! thread (holes counted; zeros between an unmap and the next map are the background the
//! design requires and are reported separately), and a final check that the spinning guest
//! sees the last blob and nothing older.
//!
//! Also measured: the device's cold start (spawn, jail, seccomp, handshake → Ready) and its
//! resident memory; with `limits`, the largest number of simultaneously mapped blobs in each
//! mode and what stopped it.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use hostmem_base::kvm::Vm;
use hostmem_base::mmap::{MemoryMapping, Prot};
use hostmem_base::procfs;
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

use crate::device::{Device, DeviceConfig};
use crate::hostmem::{Hostmem, Limits, MapEvent, Mode, DEFAULT_WINDOW_GPA};
use crate::probe::{GuestProbe, ProbeRead};
use crate::queue_driver::QueueDriver;
use crate::run::{Latency, Rng};

const PAGE: u64 = 4096;
/// The context every case's blobs live in.
const CTX: u32 = 1;
/// First resource id of the background blobs.
const BG_RES: u32 = 100_000;
/// Resource ids of the two remap-test blobs.
const SPIN_RES: [u32; 2] = [200_000, 200_001];
/// Stride of background blobs (4 KiB blob, 4 KiB gap: every one is its own VMA).
const BG_STRIDE: u64 = 2 * PAGE;
/// Reads per `spin_read` call while the host remaps.
const SPIN_CHUNK: u64 = 20_000;

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

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Cases to run (interleaved).
    pub cases: Vec<CaseKind>,
    /// Window size in bytes.
    pub window: u64,
    /// Seed of blob sizes, offsets and fill patterns.
    pub seed: u64,
    /// Largest blob (bytes).
    pub max_blob: u64,
    /// Blobs cycled through per case (at least `queue_depth`).
    pub blobs: usize,
    /// Background placements (4 KiB blobs kept mapped) per level; the first level gives the
    /// headline numbers.
    pub levels: Vec<usize>,
    /// Rounds per level; in each round every case runs one batch.
    pub rounds: usize,
    /// Map+unmap cycles per batch.
    pub batch: usize,
    /// Commands in flight in the pipelined case.
    pub queue_depth: usize,
    /// Guest RAM re-read after every cycle (bytes).
    pub working_set: u64,
    /// Remaps while a vCPU spins on the offset.
    pub remaps: u64,
    /// Remaps each followed by a guest read.
    pub sync_remaps: u64,
    /// Device cold starts to time.
    pub cold_starts: usize,
    /// Also find the largest number of simultaneously mapped blobs per mode.
    pub limits: bool,
    /// Stop a limits search here (blobs).
    pub limit_cap: usize,
    /// Stop a limits search after this many seconds.
    pub limit_seconds: f64,
    /// How to start the device.
    pub device: DeviceConfig,
    /// Progress on stderr when it is a terminal.
    pub show_progress: bool,
    /// Also run `vhost-user-sandboxed` (when `fixed-sandboxed` runs; [`crate::bench_vhost_user`]).
    pub vhost_user: bool,
}

impl BenchOptions {
    /// The default run (a few minutes on 2 cores).
    pub fn full(device: DeviceConfig) -> Self {
        BenchOptions {
            cases: CaseKind::ALL.to_vec(),
            window: 256 << 20,
            seed: 1,
            max_blob: 2 << 20,
            blobs: 16,
            levels: vec![0, 32, 128, 512],
            rounds: 30,
            batch: 48,
            queue_depth: 16,
            working_set: 1 << 20,
            remaps: 4000,
            sync_remaps: 400,
            cold_starts: 40,
            limits: false,
            limit_cap: 40_000,
            limit_seconds: 60.0,
            device,
            show_progress: true,
            vhost_user: true,
        }
    }

    /// `--quick`: under a minute on 2 cores.
    pub fn quick(device: DeviceConfig) -> Self {
        BenchOptions {
            levels: vec![0, 128],
            rounds: 12,
            batch: 32,
            remaps: 2000,
            sync_remaps: 200,
            cold_starts: 12,
            limit_seconds: 20.0,
            ..BenchOptions::full(device)
        }
    }

    /// A tiny run for tests (correctness, not speed).
    pub fn tiny(device: DeviceConfig) -> Self {
        BenchOptions {
            window: 32 << 20,
            max_blob: 64 << 10,
            blobs: 4,
            levels: vec![0, 4],
            rounds: 2,
            batch: 4,
            queue_depth: 4,
            working_set: 64 << 10,
            remaps: 40,
            sync_remaps: 8,
            cold_starts: 2,
            limit_cap: 64,
            limit_seconds: 10.0,
            show_progress: false,
            vhost_user: false,
            ..BenchOptions::full(device)
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
            let size = rng.blob_size().min(opts.max_blob.max(PAGE) / PAGE * PAGE);
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
enum Route {
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

fn gpu_ok(r: Response, what: &str) -> anyhow::Result<()> {
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
    fn create(&mut self, b: &BlobSpec) -> anyhow::Result<()> {
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

    fn map(&mut self, hm: &Hostmem, b: &BlobSpec) -> anyhow::Result<()> {
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

    fn unmap(&mut self, hm: &Hostmem, b: &BlobSpec) -> anyhow::Result<()> {
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

/// Guest and host checks of one case.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Checks {
    /// Guest reads that saw what they must (the blob after a map, no blob after an unmap).
    pub guest_verified: u64,
    /// Guest reads that saw something else (neither the blob nor the previous content).
    pub guest_mismatches: u64,
    /// Guest reads after an acknowledged map/unmap that saw the previous content.
    pub stale_reads: u64,
    /// Guest accesses to the window with no memory behind them (per-cycle reads in fixed
    /// mode, and every hole of the remap test).
    pub guest_holes: u64,
    /// Host-side reads of the VMM window (fixed-mode cases, warm-up cycle) that matched.
    pub host_verified: u64,
    /// Host-side reads that did not.
    pub host_mismatches: u64,
}

#[derive(Debug, Default, Clone)]
struct Samples {
    map_us: Vec<f64>,
    unmap_us: Vec<f64>,
    cycle_us: Vec<f64>,
    refault_us: Vec<f64>,
    cycles: u64,
    op_seconds: f64,
    memslot_changes: u64,
}

/// What the remap test saw.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct RemapReport {
    /// Host remaps (maps + unmaps) done while the vCPU spun.
    pub remaps: u64,
    /// Reads the spinning vCPU did.
    pub spin_reads: u64,
    /// Times the spinning vCPU saw the value change (it really watched the remaps).
    pub spin_changes: u64,
    /// Zeros the spinning vCPU read (the background between an unmap and the next map).
    pub spin_zero_reads: u64,
    /// Spinning reads that hit no memory.
    pub spin_holes: u64,
    /// Synchronous remaps, each followed by a guest read.
    pub sync_remaps: u64,
}

struct CaseRun {
    kind: CaseKind,
    hostmem: Arc<Hostmem>,
    probe: GuestProbe,
    path: Route,
    bg_live: usize,
    bg_created: usize,
    cursor: usize,
    checks: Checks,
    levels: Vec<(usize, Samples)>,
    remap: RemapReport,
    failed: Option<String>,
}

fn us(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

impl CaseRun {
    fn setup(kind: CaseKind, opts: &BenchOptions, wl: &Workload) -> anyhow::Result<CaseRun> {
        let vm = Arc::new(Vm::open()?);
        let hostmem = Arc::new(Hostmem::new(
            opts.window,
            Some(vm.clone()),
            DEFAULT_WINDOW_GPA,
            kind.mode(),
            Limits::default(),
        )?);
        let ram = (opts.working_set + (4 << 20)) as usize;
        let probe = GuestProbe::new(vm, DEFAULT_WINDOW_GPA, opts.window, ram)?;
        let path = match kind {
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
                let mut driver = QueueDriver::new(device.transport())?;
                driver.ctx_create(CTX, 0).context("CTX_CREATE")?;
                Route::Sandboxed {
                    driver: Some(Box::new(driver)),
                    device: Some(Box::new(device)),
                }
            }
        };
        let mut c = CaseRun {
            kind,
            hostmem,
            probe,
            path,
            bg_live: 0,
            bg_created: 0,
            cursor: 0,
            checks: Checks::default(),
            levels: vec![],
            remap: RemapReport::default(),
            failed: None,
        };
        for b in wl.cycling.iter().chain(wl.spin.iter()) {
            c.path.create(b)?;
        }
        // Warm-up cycle (not timed): host and guest see every blob, then its absence.
        for b in &wl.cycling {
            c.path.map(&c.hostmem, b)?;
            c.host_check(b, true)?;
            c.guest_check_mapped(b)?;
            c.path.unmap(&c.hostmem, b)?;
            c.host_check(b, false)?;
            c.guest_check_unmapped(b)?;
        }
        c.probe.touch_ram(opts.working_set)?;
        Ok(c)
    }

    /// Fixed mode: the VMM's own window must show the blob, then zeros.
    fn host_check(&mut self, b: &BlobSpec, mapped: bool) -> anyhow::Result<()> {
        if self.kind.mode() != Mode::Fixed {
            return Ok(());
        }
        let mut q = [0u8; 8];
        self.hostmem.window().read(b.offset, &mut q)?;
        let want = if mapped { b.first_qword() } else { 0 };
        if u64::from_le_bytes(q) == want {
            self.checks.host_verified += 1;
        } else {
            self.checks.host_mismatches += 1;
            log::error!(
                "{}: host window at {:#x} does not show the {}",
                self.kind.name(),
                b.offset,
                if mapped { "blob" } else { "background" }
            );
        }
        Ok(())
    }

    fn guest_check_mapped(&mut self, b: &BlobSpec) -> anyhow::Result<()> {
        match self.probe.read_u64(b.offset)? {
            ProbeRead::Value(v) if v == b.first_qword() => self.checks.guest_verified += 1,
            // Still the background (or still no memory): the map did not reach the guest.
            ProbeRead::Value(0) | ProbeRead::Hole { .. } => self.checks.stale_reads += 1,
            ProbeRead::Value(_) => self.checks.guest_mismatches += 1,
        }
        Ok(())
    }

    fn guest_check_unmapped(&mut self, b: &BlobSpec) -> anyhow::Result<()> {
        match self.probe.read_u64(b.offset)? {
            ProbeRead::Value(0) => self.checks.guest_verified += 1,
            // Legacy mode: the blob's memslot is gone and nothing is there. Expected.
            ProbeRead::Hole { .. } if self.kind.mode() == Mode::PerBlobSlot => {
                self.checks.guest_verified += 1
            }
            ProbeRead::Hole { .. } => self.checks.guest_holes += 1,
            ProbeRead::Value(v) if v == b.first_qword() => self.checks.stale_reads += 1,
            ProbeRead::Value(_) => self.checks.guest_mismatches += 1,
        }
        Ok(())
    }

    fn set_background(&mut self, n: usize, wl: &Workload) -> anyhow::Result<()> {
        while self.bg_live < n {
            let b = wl.background[self.bg_live];
            if self.bg_created <= self.bg_live {
                self.path.create(&b)?;
                self.bg_created += 1;
            }
            self.path.map(&self.hostmem, &b)?;
            self.bg_live += 1;
        }
        while self.bg_live > n {
            let b = wl.background[self.bg_live - 1];
            self.path.unmap(&self.hostmem, &b)?;
            self.bg_live -= 1;
        }
        Ok(())
    }

    fn samples(&mut self) -> &mut Samples {
        if self.levels.last().map(|(l, _)| *l) != Some(self.bg_live) {
            self.levels.push((self.bg_live, Samples::default()));
        }
        &mut self.levels.last_mut().expect("just pushed").1
    }

    /// One batch of `opts.batch` cycles.
    fn batch(&mut self, opts: &BenchOptions, wl: &Workload) -> anyhow::Result<()> {
        let slots0 = self.hostmem.memslot_changes();
        if self.kind == CaseKind::FixedSandboxedPipelined {
            self.batch_pipelined(opts, wl)?;
        } else {
            for _ in 0..opts.batch {
                let b = wl.cycling[self.cursor % wl.cycling.len()];
                self.cursor += 1;
                let t = Instant::now();
                self.path.map(&self.hostmem, &b)?;
                let m = t.elapsed();
                self.guest_check_mapped(&b)?;
                let t = Instant::now();
                self.path.unmap(&self.hostmem, &b)?;
                let u = t.elapsed();
                self.guest_check_unmapped(&b)?;
                let r = self.probe.touch_ram(opts.working_set)?;
                let s = self.samples();
                s.map_us.push(us(m));
                s.unmap_us.push(us(u));
                s.cycle_us.push(us(m + u));
                s.refault_us.push(us(r));
                s.cycles += 1;
                s.op_seconds += (m + u).as_secs_f64();
            }
        }
        let d = self.hostmem.memslot_changes() - slots0;
        self.samples().memslot_changes += d;
        Ok(())
    }

    fn batch_pipelined(&mut self, opts: &BenchOptions, wl: &Workload) -> anyhow::Result<()> {
        let q = opts.queue_depth.clamp(1, wl.cycling.len());
        let blobs = &wl.cycling[..q];
        for _ in 0..(opts.batch / q).max(1) {
            let Route::Sandboxed {
                driver: Some(d), ..
            } = &mut self.path
            else {
                bail!("pipelined case without a driver");
            };
            let mut map_lat = Vec::with_capacity(q);
            let t0 = Instant::now();
            let mut tags = Vec::with_capacity(q);
            for b in blobs {
                tags.push((d.submit_map(CTX, b.res, b.offset)?, Instant::now()));
            }
            for (tag, at) in tags.drain(..) {
                d.wait_map(tag)?;
                map_lat.push(us(at.elapsed()));
            }
            let map_wall = t0.elapsed();
            let mut unmap_lat = Vec::with_capacity(q);
            // The guest reads every blob while all of them are mapped.
            for b in blobs {
                self.guest_check_mapped(b)?;
            }
            let Route::Sandboxed {
                driver: Some(d), ..
            } = &mut self.path
            else {
                bail!("pipelined case without a driver");
            };
            let t1 = Instant::now();
            for b in blobs {
                tags.push((d.submit_unmap(CTX, b.res)?, Instant::now()));
            }
            for (tag, at) in tags.drain(..) {
                d.wait_ok(tag)?;
                unmap_lat.push(us(at.elapsed()));
            }
            let unmap_wall = t1.elapsed();
            for b in blobs {
                self.guest_check_unmapped(b)?;
            }
            let r = self.probe.touch_ram(opts.working_set)?;
            let s = self.samples();
            s.map_us.extend(map_lat);
            s.unmap_us.extend(unmap_lat);
            s.cycle_us.push(us(map_wall + unmap_wall) / q as f64);
            s.refault_us.push(us(r));
            s.cycles += q as u64;
            s.op_seconds += (map_wall + unmap_wall).as_secs_f64();
        }
        Ok(())
    }

    /// The remap test (see the module docs).
    fn remap_test(&mut self, opts: &BenchOptions, wl: &Workload) -> anyhow::Result<()> {
        let [a, b] = wl.spin;
        // Synchronous: after every acknowledged op the guest must see exactly the new state.
        for i in 0..opts.sync_remaps {
            let blob = if (i / 2).is_multiple_of(2) { a } else { b };
            let mapping = i % 2 == 0;
            if mapping {
                self.path.map(&self.hostmem, &blob)?;
            } else {
                self.path.unmap(&self.hostmem, &blob)?;
            }
            let seen = self.probe.read_u64(blob.offset)?;
            let c = &mut self.checks;
            match (mapping, seen) {
                (true, ProbeRead::Value(v)) if v == blob.first_qword() => c.guest_verified += 1,
                (false, ProbeRead::Value(0)) => c.guest_verified += 1,
                (_, ProbeRead::Hole { .. }) => {
                    c.guest_holes += 1;
                    if mapping {
                        c.stale_reads += 1;
                    }
                }
                (true, ProbeRead::Value(0)) => c.stale_reads += 1,
                (false, ProbeRead::Value(v)) if v == blob.first_qword() => c.stale_reads += 1,
                _ => c.guest_mismatches += 1,
            }
            self.remap.sync_remaps += 1;
        }
        if !opts.sync_remaps.is_multiple_of(2) {
            let last = if ((opts.sync_remaps - 1) / 2).is_multiple_of(2) {
                a
            } else {
                b
            };
            self.path.unmap(&self.hostmem, &last)?;
        }
        // Concurrent: a vCPU spins on the offset on another thread while the host remaps.
        let stop = AtomicBool::new(false);
        let CaseRun {
            probe,
            path,
            hostmem,
            remap,
            ..
        } = self;
        let (spin, host): (anyhow::Result<RemapReport>, anyhow::Result<u64>) =
            std::thread::scope(|s| {
                let spinner = s.spawn(|| -> anyhow::Result<RemapReport> {
                    let mut r = RemapReport::default();
                    // At least one chunk, however fast the host is.
                    loop {
                        let st = probe.spin_read(a.offset, SPIN_CHUNK)?;
                        r.spin_reads += st.reads;
                        r.spin_changes += st.changes;
                        r.spin_zero_reads += st.zero_reads;
                        r.spin_holes += st.holes;
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                    }
                    Ok(r)
                });
                let host = (|| -> anyhow::Result<u64> {
                    let mut n = 0u64;
                    // Ends with blob `a` mapped.
                    let rounds = opts.remaps.div_ceil(4).max(1);
                    for _ in 0..rounds {
                        for blob in [b, a] {
                            path.map(hostmem, &blob)?;
                            path.unmap(hostmem, &blob)?;
                            n += 2;
                        }
                    }
                    path.map(hostmem, &a)?;
                    Ok(n + 1)
                })();
                stop.store(true, Ordering::Release);
                let spin = spinner
                    .join()
                    .unwrap_or_else(|_| Err(anyhow!("spinner panicked")));
                (spin, host)
            });
        let host_ops = host?;
        let sp = spin?;
        remap.remaps = host_ops;
        remap.spin_reads = sp.spin_reads;
        remap.spin_changes = sp.spin_changes;
        remap.spin_zero_reads = sp.spin_zero_reads;
        remap.spin_holes = sp.spin_holes;
        self.checks.guest_holes += sp.spin_holes;
        // Quiescent: every read must now be blob `a`, nothing older.
        let st = self.probe.spin_read(a.offset, SPIN_CHUNK)?;
        if st.holes > 0 || st.zero_reads > 0 || st.last != a.first_qword() || st.changes != 1 {
            self.checks.stale_reads += 1;
            log::error!(
                "{}: after the last remap the guest still saw older content: {st:?}",
                self.kind.name()
            );
        } else {
            self.checks.guest_verified += 1;
        }
        self.path.unmap(&self.hostmem, &a)?;
        Ok(())
    }

    fn peak_live(&self) -> usize {
        match &self.path {
            Route::Floor { peak, .. } => *peak,
            _ => self.hostmem.max_live_seen(),
        }
    }

    fn device_pid(&self) -> Option<i32> {
        match &self.path {
            Route::Sandboxed {
                device: Some(d), ..
            } => Some(d.pid()),
            _ => None,
        }
    }

    fn teardown(&mut self) {
        if let Route::Sandboxed { driver, device } = &mut self.path {
            drop(driver.take());
            if let Some(d) = device.take() {
                d.stop("bench done");
            }
        }
    }
}

/// One point of the sweep over live placements.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    /// Background placements live during the cycles.
    pub live: usize,
    /// Map+unmap cycle cost (µs; pipelined: batch wall time per cycle).
    pub cycle_us: Latency,
    /// MAP_BLOB latency.
    pub map_us: Latency,
    /// UNMAP_BLOB latency.
    pub unmap_us: Latency,
    /// Cycles measured.
    pub cycles: u64,
}

/// The numbers of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseReport {
    /// Case name.
    pub name: &'static str,
    /// `fixed` or `per-blob-slot`.
    pub mode: &'static str,
    /// MAP latency (µs) at the first level.
    pub map_us: Latency,
    /// UNMAP latency (µs) at the first level.
    pub unmap_us: Latency,
    /// Map+unmap cycle cost (µs) at the first level (pipelined: batch wall time / cycles).
    pub cycle_us: Latency,
    /// Whole map+unmap cycles per second of host time at the first level.
    pub cycles_per_s: f64,
    /// Cycles measured at the first level.
    pub cycles: u64,
    /// Memslot changes of the window over the whole run (setup, levels, remap test).
    pub memslot_changes: u64,
    /// Memslot changes per timed cycle.
    pub memslot_changes_per_cycle: f64,
    /// Most placements live at once.
    pub peak_live: usize,
    /// Time (µs) for the guest to re-read its RAM working set after a cycle, first level.
    pub guest_refault_us: Latency,
    /// Holes the guest hit (see [`Checks`]).
    pub guest_holes: u64,
    /// Stale reads (see [`Checks`]).
    pub stale_reads: u64,
    /// All checks.
    pub checks: Checks,
    /// The remap test.
    pub remap: RemapReport,
    /// Per level of live placements.
    pub sweep: Vec<SweepPoint>,
    /// The case failed here (its numbers are partial).
    pub failed: Option<String>,
}

/// A target with its verdict.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// What is measured.
    pub name: String,
    /// The goal.
    pub goal: String,
    /// Measured value (`None`: a case it needs did not run).
    pub value: Option<f64>,
    /// Verdict.
    pub pass: Option<bool>,
}

/// The largest number of simultaneously mapped blobs in one mode.
#[derive(Debug, Clone, Serialize)]
pub struct LimitReport {
    /// `fixed` or `per-blob-slot`.
    pub mode: &'static str,
    /// `vmm` (the VMM's mapping service alone, fds from one memfd) or `sandboxed` (the
    /// jailed device creating a shm blob for each).
    pub path: &'static str,
    /// The VMM's live-placement limit in force.
    pub max_live_limit: Option<usize>,
    /// Blobs mapped at once when it stopped.
    pub mapped: usize,
    /// What stopped it.
    pub stopped_by: String,
    /// Seconds the search took (mapping only).
    pub seconds: f64,
}

/// Device facts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceMemory {
    /// Resident memory of a fresh device right after Ready (KiB, median).
    pub idle_rss_kib: u64,
    /// Resident memory of the fixed-sandboxed device after its run (KiB).
    pub after_run_rss_kib: Option<u64>,
}

/// The machine.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs available.
    pub cores: usize,
    /// Kernel release.
    pub kernel: String,
    /// CPU model.
    pub cpu: String,
    /// `KVM_CAP_NR_MEMSLOTS`.
    pub kvm_max_memslots: usize,
    /// `vm.max_map_count`.
    pub max_map_count: usize,
}

/// Options as reported.
#[derive(Debug, Clone, Serialize)]
pub struct OptionsReport {
    /// Window bytes.
    pub window: u64,
    /// Seed.
    pub seed: u64,
    /// Cycled blobs and their sizes.
    pub blob_sizes: Vec<u64>,
    /// Levels of background placements.
    pub levels: Vec<usize>,
    /// Rounds per level.
    pub rounds: usize,
    /// Cycles per batch.
    pub batch: usize,
    /// Pipelined queue depth.
    pub queue_depth: usize,
    /// Guest working set re-read after every cycle.
    pub working_set: u64,
    /// Device jailed.
    pub jailed: bool,
}

/// The bench report (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    /// Where it ran.
    pub machine: Machine,
    /// With what.
    pub options: OptionsReport,
    /// Per case.
    pub cases: Vec<CaseReport>,
    /// Guest refault (µs) per case.
    pub guest_refault: BTreeMap<String, Latency>,
    /// Holes per case.
    pub guest_holes: BTreeMap<String, u64>,
    /// Stale reads per case.
    pub stale_reads: BTreeMap<String, u64>,
    /// Device cold start, spawn to Ready (ms).
    pub cold_start_ms: Latency,
    /// Cold starts timed.
    pub cold_starts: usize,
    /// Device memory.
    pub device_memory: DeviceMemory,
    /// Ratios (see [`ratios`]).
    pub ratios: BTreeMap<String, f64>,
    /// Targets and verdicts.
    pub targets: Vec<Target>,
    /// The `--limits` search.
    pub limits: Vec<LimitReport>,
    /// Errors (failed cases, failed cold starts).
    pub errors: Vec<String>,
    /// Wall time.
    pub seconds: f64,
    /// Cycle samples per case at the first level (for the plot; not in JSON).
    #[serde(skip)]
    pub cycle_samples: Vec<(String, Vec<f64>)>,
}

fn lat(v: &[f64]) -> Latency {
    let mut v = v.to_vec();
    Latency::of(&mut v)
}

impl BenchReport {
    /// The case called `name`.
    pub fn case(&self, name: &str) -> Option<&CaseReport> {
        self.cases.iter().find(|c| c.name == name)
    }
}

/// Ratios from the case numbers (`None` entries are left out):
/// * `slot_vs_fixed_sandboxed_cycle`: slot-sandboxed / fixed-sandboxed map+unmap p50;
/// * `slot_vs_fixed_sandboxed_refault`: the same for the guest re-read;
/// * `slot_vs_fixed_inproc_cycle`, `slot_vs_fixed_inproc_refault`: the in-process pair;
/// * `fixed_sandboxed_vs_floor`, `pipelined_vs_floor`, `fixed_inproc_vs_floor`: cycle p50
///   over the floor's.
pub fn ratios(cases: &[CaseReport]) -> BTreeMap<String, f64> {
    let get = |n: &str| cases.iter().find(|c| c.name == n && c.cycles > 0);
    let mut out = BTreeMap::new();
    let mut put = |k: &str, num: Option<f64>, den: Option<f64>| {
        if let (Some(n), Some(d)) = (num, den) {
            if d > 0.0 {
                out.insert(k.to_string(), n / d);
            }
        }
    };
    let cyc = |n: &str| get(n).map(|c| c.cycle_us.p50);
    let rf = |n: &str| get(n).map(|c| c.guest_refault_us.p50);
    put(
        "slot_vs_fixed_sandboxed_cycle",
        cyc("slot-sandboxed"),
        cyc("fixed-sandboxed"),
    );
    put(
        "slot_vs_fixed_sandboxed_refault",
        rf("slot-sandboxed"),
        rf("fixed-sandboxed"),
    );
    put(
        "slot_vs_fixed_inproc_cycle",
        cyc("slot-inproc"),
        cyc("fixed-inproc"),
    );
    put(
        "slot_vs_fixed_inproc_refault",
        rf("slot-inproc"),
        rf("fixed-inproc"),
    );
    put(
        "fixed_sandboxed_vs_floor",
        cyc("fixed-sandboxed"),
        cyc("floor"),
    );
    put(
        "pipelined_vs_floor",
        cyc("fixed-sandboxed-pipelined"),
        cyc("floor"),
    );
    put("fixed_inproc_vs_floor", cyc("fixed-inproc"), cyc("floor"));
    out
}

/// The targets and verdicts.
pub fn targets(
    cases: &[CaseReport],
    ratios: &BTreeMap<String, f64>,
    cold_start_ms: Option<f64>,
) -> Vec<Target> {
    let t = |name: &str, goal: &str, value: Option<f64>, ok: &dyn Fn(f64) -> bool| Target {
        name: name.into(),
        goal: goal.into(),
        value,
        pass: value.map(ok),
    };
    let r = |k: &str| ratios.get(k).copied();
    let fixed: Vec<&CaseReport> = cases
        .iter()
        .filter(|c| c.mode == Mode::Fixed.name())
        .collect();
    let bad = (!fixed.is_empty()).then(|| {
        fixed
            .iter()
            .map(|c| c.guest_holes + c.stale_reads)
            .sum::<u64>() as f64
    });
    vec![
        t(
            "fixed-sandboxed map+unmap p50 faster than slot-sandboxed",
            ">= 2x",
            r("slot_vs_fixed_sandboxed_cycle"),
            &|v| v >= 2.0,
        ),
        t(
            "guest re-read after a cycle cheaper (fixed vs slot, sandboxed)",
            ">= 5x",
            r("slot_vs_fixed_sandboxed_refault"),
            &|v| v >= 5.0,
        ),
        t(
            "fixed-sandboxed map+unmap p50 over floor",
            "<= 5x",
            r("fixed_sandboxed_vs_floor"),
            &|v| v <= 5.0,
        ),
        t(
            "pipelined map+unmap p50 over floor",
            "<= 2x",
            r("pipelined_vs_floor"),
            &|v| v <= 2.0,
        ),
        t("holes + stale reads in fixed mode", "0", bad, &|v| v == 0.0),
        t("device cold start p50 (ms)", "< 50", cold_start_ms, &|v| {
            v < 50.0
        }),
    ]
}

fn machine() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    Machine {
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cpu,
        kvm_max_memslots: Vm::open().map(|v| v.max_memslots()).unwrap_or(0),
        max_map_count: procfs::max_map_count().unwrap_or(0),
    }
}

fn progress(show: bool, done: usize, total: usize, what: &str) {
    if show {
        let w = 30 * done / total.max(1);
        eprint!(
            "\r[{}{}] {done}/{total} {what:<24}",
            "#".repeat(w),
            " ".repeat(30 - w)
        );
    }
}

/// Runs the benchmark.
pub fn run(opts: &BenchOptions) -> anyhow::Result<BenchReport> {
    let t0 = Instant::now();
    Vm::available().map_err(|why| anyhow!("/dev/kvm unusable: {why}"))?;
    let wl = Workload::new(opts)?;
    let show = opts.show_progress && std::io::stderr().is_terminal();
    let mut errors = Vec::new();
    let mut cases: Vec<CaseRun> = Vec::new();
    for k in &opts.cases {
        progress(show, 0, 1, &format!("setup {}", k.name()));
        cases.push(
            CaseRun::setup(*k, opts, &wl).with_context(|| format!("setting up {}", k.name()))?,
        );
    }
    let mut vhost_user = match crate::bench_vhost_user::VhostUserCase::wanted(opts) {
        true => crate::bench_vhost_user::VhostUserCase::setup(opts, &wl)
            .map_err(|e| errors.push(format!("{}: setup: {e:#}", crate::bench_vhost_user::NAME)))
            .ok(),
        false => None,
    };
    let cold_hm = Arc::new(Hostmem::new(
        8 << 20,
        None,
        DEFAULT_WINDOW_GPA,
        Mode::Fixed,
        Limits::default(),
    )?);
    let (mut cold_ms, mut idle_rss) = (Vec::new(), Vec::new());
    let timed_start = |cold_ms: &mut Vec<f64>,
                       idle_rss: &mut Vec<f64>,
                       errors: &mut Vec<String>| {
        match cold_start(&opts.device, &cold_hm) {
            Ok((ms, rss)) => {
                cold_ms.push(ms);
                idle_rss.push(rss as f64);
            }
            Err(e) => errors.push(format!("cold start: {e:#}")),
        }
    };
    let total = opts.levels.len() * opts.rounds;
    let mut done = 0;
    for &level in &opts.levels {
        for c in cases.iter_mut().filter(|c| c.failed.is_none()) {
            if let Err(e) = c.set_background(level, &wl) {
                c.failed = Some(format!("background {level}: {e:#}"));
            }
        }
        if let Some(v) = vhost_user.as_mut() {
            v.set_background(level, &wl);
        }
        for r in 0..opts.rounds {
            let n = cases.len();
            for j in 0..n {
                let c = &mut cases[(r + j) % n];
                if c.failed.is_some() {
                    continue;
                }
                if let Err(e) = c.batch(opts, &wl) {
                    log::error!("{}: {e:#}", c.kind.name());
                    c.failed = Some(format!("{e:#}"));
                }
            }
            if let Some(v) = vhost_user.as_mut() {
                v.batch(opts, &wl);
            }
            if cold_ms.len() + errors.len() < opts.cold_starts {
                timed_start(&mut cold_ms, &mut idle_rss, &mut errors);
            }
            done += 1;
            progress(show, done, total, &format!("{} live", level));
        }
    }
    while cold_ms.len() < opts.cold_starts && errors.len() < opts.cold_starts {
        timed_start(&mut cold_ms, &mut idle_rss, &mut errors);
    }
    for c in cases.iter_mut().filter(|c| c.failed.is_none()) {
        progress(show, done, total, &format!("remaps {}", c.kind.name()));
        let res = c
            .set_background(0, &wl)
            .and_then(|()| c.remap_test(opts, &wl));
        if let Err(e) = res {
            c.failed = Some(format!("remap test: {e:#}"));
        }
    }
    if show {
        eprintln!();
    }
    let after_run_rss_kib = cases
        .iter()
        .find(|c| c.kind == CaseKind::FixedSandboxed)
        .and_then(|c| c.device_pid())
        .and_then(|pid| procfs::status_of(&pid.to_string()).ok())
        .map(|s| s.vm_rss_kib);
    let mut reports = Vec::new();
    let mut cycle_samples = Vec::new();
    for c in cases.iter_mut() {
        c.teardown();
        if let Some(f) = &c.failed {
            errors.push(format!("{}: {f}", c.kind.name()));
        }
        let first = c.levels.first().map(|(_, s)| s.clone()).unwrap_or_default();
        let timed: u64 = c.levels.iter().map(|(_, s)| s.cycles).sum();
        let slot_changes: u64 = c.levels.iter().map(|(_, s)| s.memslot_changes).sum();
        cycle_samples.push((c.kind.name().to_string(), first.cycle_us.clone()));
        reports.push(CaseReport {
            name: c.kind.name(),
            mode: c.kind.mode().name(),
            map_us: lat(&first.map_us),
            unmap_us: lat(&first.unmap_us),
            cycle_us: lat(&first.cycle_us),
            cycles_per_s: if first.op_seconds > 0.0 {
                first.cycles as f64 / first.op_seconds
            } else {
                0.0
            },
            cycles: first.cycles,
            memslot_changes: c.hostmem.memslot_changes(),
            memslot_changes_per_cycle: if timed > 0 {
                slot_changes as f64 / timed as f64
            } else {
                0.0
            },
            peak_live: c.peak_live(),
            guest_refault_us: lat(&first.refault_us),
            guest_holes: c.checks.guest_holes,
            stale_reads: c.checks.stale_reads,
            checks: c.checks,
            remap: c.remap,
            sweep: c
                .levels
                .iter()
                .map(|(live, s)| SweepPoint {
                    live: *live,
                    cycle_us: lat(&s.cycle_us),
                    map_us: lat(&s.map_us),
                    unmap_us: lat(&s.unmap_us),
                    cycles: s.cycles,
                })
                .collect(),
            failed: c.failed.clone(),
        });
    }
    drop(cases);
    if let Some(v) = vhost_user.take() {
        let r = v.report();
        if let Some(f) = &r.failed {
            errors.push(format!("{}: {f}", r.name));
        }
        reports.push(r);
    }
    let limits = if opts.limits {
        progress(show, 0, 1, "limits");
        let r = run_limits(opts);
        if show {
            eprintln!();
        }
        r
    } else {
        vec![]
    };
    let cold = lat(&cold_ms);
    let mut ratios = ratios(&reports);
    crate::bench_vhost_user::add_ratios(&reports, &mut ratios);
    let targets = targets(&reports, &ratios, (!cold_ms.is_empty()).then_some(cold.p50));
    Ok(BenchReport {
        machine: machine(),
        options: OptionsReport {
            window: opts.window,
            seed: opts.seed,
            blob_sizes: wl.cycling.iter().map(|b| b.size).collect(),
            levels: opts.levels.clone(),
            rounds: opts.rounds,
            batch: opts.batch,
            queue_depth: opts.queue_depth,
            working_set: opts.working_set,
            jailed: opts.device.jailed,
        },
        guest_refault: reports
            .iter()
            .map(|c| (c.name.to_string(), c.guest_refault_us))
            .collect(),
        guest_holes: reports
            .iter()
            .map(|c| (c.name.to_string(), c.guest_holes))
            .collect(),
        stale_reads: reports
            .iter()
            .map(|c| (c.name.to_string(), c.stale_reads))
            .collect(),
        cases: reports,
        cold_start_ms: cold,
        cold_starts: cold_ms.len(),
        device_memory: DeviceMemory {
            idle_rss_kib: lat(&idle_rss).p50 as u64,
            after_run_rss_kib,
        },
        ratios,
        targets,
        limits,
        errors,
        seconds: t0.elapsed().as_secs_f64(),
        cycle_samples,
    })
}

/// Starts a device, times spawn → Ready, reads its resident memory, stops it.
fn cold_start(cfg: &DeviceConfig, hm: &Arc<Hostmem>) -> anyhow::Result<(f64, u64)> {
    let d = Device::start(cfg, hm.clone())?;
    let ms = d.facts().start_ms;
    let rss = procfs::status_of(&d.pid().to_string())?.vm_rss_kib;
    d.stop("bench cold start");
    Ok((ms, rss))
}

/// The `--limits` search for both modes, through the VMM alone and through the device.
pub fn run_limits(opts: &BenchOptions) -> Vec<LimitReport> {
    let mut out = Vec::new();
    let unlimited = Limits {
        max_live: usize::MAX,
    };
    for (mode, limits) in [
        (Mode::PerBlobSlot, Limits::default()),
        (Mode::PerBlobSlot, unlimited),
        (Mode::Fixed, Limits::default()),
        (Mode::Fixed, unlimited),
    ] {
        out.push(
            limit_vmm(mode, limits, opts).unwrap_or_else(|e| LimitReport {
                mode: mode.name(),
                path: "vmm",
                max_live_limit: Some(limits.max_live).filter(|m| *m != usize::MAX),
                mapped: 0,
                stopped_by: format!("setup failed: {e:#}"),
                seconds: 0.0,
            }),
        );
    }
    for mode in [Mode::PerBlobSlot, Mode::Fixed] {
        out.push(limit_sandboxed(mode, opts).unwrap_or_else(|e| LimitReport {
            mode: mode.name(),
            path: "sandboxed",
            max_live_limit: Some(Limits::default().max_live),
            mapped: 0,
            stopped_by: format!("setup failed: {e:#}"),
            seconds: 0.0,
        }));
    }
    out
}

fn limit_window(cap: usize) -> u64 {
    (cap as u64 * BG_STRIDE)
        .next_multiple_of(2 << 20)
        .max(8 << 20)
}

/// The VMM's own limit: placement events for 4 KiB blobs (fds of one sealed memfd, closed
/// after each placement as a received fd is) until one is refused.
fn limit_vmm(mode: Mode, limits: Limits, opts: &BenchOptions) -> anyhow::Result<LimitReport> {
    let vm = Arc::new(Vm::open()?);
    let cap = opts.limit_cap;
    let hm = Hostmem::new(
        limit_window(cap),
        Some(vm),
        DEFAULT_WINDOW_GPA,
        mode,
        limits,
    )?;
    let src = SharedMemory::new("bench-limit", PAGE)?;
    src.seal_size()?;
    let t = Instant::now();
    let mut mapped = 0usize;
    let stopped_by = loop {
        if mapped >= cap {
            break format!("bench cap ({cap} blobs)");
        }
        if t.elapsed().as_secs_f64() > opts.limit_seconds {
            break format!("bench time cap ({} s)", opts.limit_seconds);
        }
        let res = 1 + mapped as u32;
        let ev = MapEvent {
            resource_id: res,
            offset: mapped as u64 * BG_STRIDE,
            len: PAGE,
            fd_offset: 0,
            prot: Prot::READ_WRITE.bits(),
        };
        let fd = src.try_clone_fd()?;
        match hm.handle_map(&ev, Some(fd)) {
            Outcome::Ok => mapped += 1,
            Outcome::Refused { code, reason } => break format!("{code:?}: {reason}"),
        }
    };
    let seconds = t.elapsed().as_secs_f64();
    hm.reset()?;
    Ok(LimitReport {
        mode: mode.name(),
        path: "vmm",
        max_live_limit: Some(limits.max_live).filter(|m| *m != usize::MAX),
        mapped,
        stopped_by,
        seconds,
    })
}

/// The product path's limit: the jailed device creates and maps 4 KiB shm blobs until a
/// command fails.
fn limit_sandboxed(mode: Mode, opts: &BenchOptions) -> anyhow::Result<LimitReport> {
    let vm = Arc::new(Vm::open()?);
    let cap = opts.limit_cap;
    let hm = Arc::new(Hostmem::new(
        limit_window(cap),
        Some(vm),
        DEFAULT_WINDOW_GPA,
        mode,
        Limits::default(),
    )?);
    let device = Device::start(&opts.device, hm.clone())?;
    let mut driver = QueueDriver::new(device.transport())?;
    driver.ctx_create(CTX, 0)?;
    let t = Instant::now();
    let mut mapped = 0usize;
    let stopped_by = loop {
        if mapped >= cap {
            break format!("bench cap ({cap} blobs)");
        }
        if t.elapsed().as_secs_f64() > opts.limit_seconds {
            break format!("bench time cap ({} s)", opts.limit_seconds);
        }
        let res = 1 + mapped as u32;
        if let Err(e) = driver.create_blob(CTX, res, 0, PAGE) {
            break format!("CREATE_BLOB #{}: {e}", mapped + 1);
        }
        if let Err(e) = driver.map_blob(CTX, res, mapped as u64 * BG_STRIDE) {
            break format!("MAP_BLOB #{}: {e}", mapped + 1);
        }
        mapped += 1;
    };
    let seconds = t.elapsed().as_secs_f64();
    drop(driver);
    device.stop("bench limits done");
    Ok(LimitReport {
        mode: mode.name(),
        path: "sandboxed",
        max_live_limit: Some(Limits::default().max_live),
        mapped,
        stopped_by,
        seconds,
    })
}

/// The report as a terminal table.
pub fn render(r: &BenchReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let m = &r.machine;
    let _ = writeln!(
        s,
        "hostmem bench: {} cores ({}), kernel {}, KVM memslots {}, window {} MiB, seed {}, {} live at the headline level",
        m.cores,
        m.cpu,
        m.kernel,
        m.kvm_max_memslots,
        r.options.window >> 20,
        r.options.seed,
        r.options.levels.first().copied().unwrap_or(0)
    );
    let _ = writeln!(
        s,
        "\n{:<27} {:>17} {:>17} {:>17} {:>9} {:>9} {:>5} {:>17} {:>6} {:>6}",
        "case",
        "map p50/p99 µs",
        "unmap p50/p99 µs",
        "cycle p50/p99 µs",
        "cycles/s",
        "memslots",
        "peak",
        "refault p50/p99",
        "holes",
        "stale"
    );
    let pair = |l: &Latency| format!("{:.1} / {:.1}", l.p50, l.p99);
    for c in &r.cases {
        let _ = writeln!(
            s,
            "{:<27} {:>17} {:>17} {:>17} {:>9.0} {:>9} {:>5} {:>17} {:>6} {:>6}{}",
            c.name,
            pair(&c.map_us),
            pair(&c.unmap_us),
            pair(&c.cycle_us),
            c.cycles_per_s,
            c.memslot_changes,
            c.peak_live,
            pair(&c.guest_refault_us),
            c.guest_holes,
            c.stale_reads,
            if c.failed.is_some() { "  FAILED" } else { "" }
        );
    }
    if let Some(first) = r.cases.first() {
        let _ = write!(
            s,
            "\nmap+unmap cycle p50 µs by live placements:\n{:<27}",
            "case"
        );
        for p in &first.sweep {
            let _ = write!(s, " {:>9}", p.live);
        }
        let _ = writeln!(s);
        for c in &r.cases {
            let _ = write!(s, "{:<27}", c.name);
            for p in &c.sweep {
                let _ = write!(s, " {:>9.1}", p.cycle_us.p50);
            }
            let _ = writeln!(s);
        }
    }
    let _ = writeln!(s, "\nremap test (two blobs alternating at one offset):");
    for c in &r.cases {
        let x = &c.remap;
        let _ = writeln!(
            s,
            "  {:<27} {} sync + {} concurrent remaps, spinning vCPU: {} reads, {} changes seen, {} background zeros, {} holes",
            c.name, x.sync_remaps, x.remaps, x.spin_reads, x.spin_changes, x.spin_zero_reads, x.spin_holes
        );
    }
    let _ = writeln!(s, "\nratios:");
    for (k, v) in &r.ratios {
        let _ = writeln!(s, "  {k:<34} {v:8.2}");
    }
    let _ = writeln!(
        s,
        "\ndevice cold start (spawn, jail, seccomp, handshake -> Ready): p50 {:.1} ms, p99 {:.1} ms ({} starts); RSS idle {} KiB, after the run {}",
        r.cold_start_ms.p50,
        r.cold_start_ms.p99,
        r.cold_starts,
        r.device_memory.idle_rss_kib,
        r.device_memory
            .after_run_rss_kib
            .map_or("-".to_string(), |k| format!("{k} KiB"))
    );
    if !r.limits.is_empty() {
        let _ = writeln!(s, "\nlimits (largest number of blobs mapped at once):");
        for l in &r.limits {
            let limit = l
                .max_live_limit
                .map_or("no live limit".to_string(), |m| format!("live limit {m}"));
            let _ = writeln!(
                s,
                "  {:<14} {:<10} {:<17} {:>6} mapped in {:5.1} s; stopped by: {}",
                l.mode, l.path, limit, l.mapped, l.seconds, l.stopped_by
            );
        }
    }
    let _ = writeln!(s, "\ntargets:");
    for t in &r.targets {
        let verdict = match t.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "n/a ",
        };
        let _ = writeln!(
            s,
            "  {verdict} {:<62} {:>9} (goal {})",
            t.name,
            t.value.map_or("-".into(), |v| format!("{v:.2}")),
            t.goal
        );
    }
    for e in &r.errors {
        let _ = writeln!(s, "error: {e}");
    }
    let _ = writeln!(s, "{:.1} s", r.seconds);
    s
}

/// Writes `bench.json` and `bench.svg` into `dir`.
pub fn write_out(r: &BenchReport, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("bench.json"), serde_json::to_string_pretty(r)?)?;
    plot(r, &dir.join("bench.svg"))
}

/// The SVG: cycle latency distributions per case (CDF, log µs) and cycle cost against live
/// placements.
pub fn plot(r: &BenchReport, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(700);
    let vals = r
        .cycle_samples
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| *v > 0.0);
    let (lo, hi) = vals.fold((f64::MAX, 0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (lo, hi) = if hi > 0.0 {
        (lo * 0.8, hi * 1.25)
    } else {
        (1.0, 1000.0)
    };
    let mut ch = ChartBuilder::on(&left)
        .caption(
            "map+unmap cycle cost, distribution (no background)",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..1f64)?;
    ch.configure_mesh()
        .x_desc("µs per cycle (log scale)")
        .y_desc("fraction of cycles")
        .draw()?;
    for (i, (name, v)) in r.cycle_samples.iter().enumerate() {
        let mut v = v.clone();
        v.sort_by(|a, b| a.total_cmp(b));
        let n = v.len().max(1) as f64;
        let color = Palette99::pick(i).to_rgba();
        ch.draw_series(LineSeries::new(
            v.iter()
                .enumerate()
                .map(|(k, x)| (x.max(lo), (k + 1) as f64 / n)),
            color.stroke_width(2),
        ))?
        .label(name.as_str())
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;

    let max_live = r
        .cases
        .iter()
        .flat_map(|c| c.sweep.iter().map(|p| p.live))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let ys = r
        .cases
        .iter()
        .flat_map(|c| c.sweep.iter().map(|p| p.cycle_us.p50))
        .filter(|v| *v > 0.0);
    let (ylo, yhi) = ys.fold((f64::MAX, 0f64), |(a, b), v| (a.min(v), b.max(v)));
    let (ylo, yhi) = if yhi > 0.0 {
        (ylo * 0.7, yhi * 1.5)
    } else {
        (1.0, 1000.0)
    };
    let mut ch = ChartBuilder::on(&right)
        .caption(
            "map+unmap cycle p50 against live placements",
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..max_live * 1.05, (ylo..yhi).log_scale())?;
    ch.configure_mesh()
        .x_desc("placements live in the window")
        .y_desc("µs per cycle (log scale)")
        .draw()?;
    for (i, c) in r.cases.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = c
            .sweep
            .iter()
            .filter(|p| p.cycle_us.p50 > 0.0)
            .map(|p| (p.live as f64, p.cycle_us.p50))
            .collect();
        ch.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(c.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        ch.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    root.present()?;
    Ok(())
}
