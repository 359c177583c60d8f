//! `hostmem run`: the main job. A seeded workload of blobs created, filled by the renderer,
//! mapped at generated offsets (many live at once), checked through a real KVM guest,
//! written by the guest and checked by the device, unmapped (the guest must then read
//! zeros) and unref'd, all through the jailed device process.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use hostmem_base::kvm::Vm;
use hostmem_base::procfs;
use hostmem_device::backend::shm::{checksum, encode_stream, pattern_bytes, ShmOp};
use serde::Serialize;

use crate::device::{Device, DeviceConfig, DeviceExit, DeviceFacts};
use crate::hostmem::{Hostmem, Limits, Mode, DEFAULT_WINDOW_GPA};
use crate::probe::{expected_hash, GuestProbe, ProbeRead};
use crate::queue_driver::{CmdError, QueueDriver};
use crate::resources::{Histogram, Usage, UsageCheck};

const PAGE: u64 = 4096;
/// The context the workload's blobs live in.
const CTX: u32 = 1;
/// virgl backend: the context of the device's hostmem-private test ops, where the FILL and
/// CHECKSUM streams run through the renderer's own mapping (see `backend::virgl`).
const VIRGL_OPS_CTX: u32 = 2;
/// virgl backend: the venus capset; the workload's blobs are venus SHM blobs (blob_id 0,
/// flags exactly MAPPABLE).
const VIRTIO_GPU_CAPSET_VENUS: u32 = 4;
/// The virgl backend's test capset (`hostmem_device::backend::virgl::TEST_CAPSET_ID`).
#[cfg(feature = "virgl")]
const VIRGL_TEST_CAPSET: u32 = hostmem_device::backend::virgl::TEST_CAPSET_ID;
/// Without the feature the device has no virgl backend and refuses to start with it.
#[cfg(not(feature = "virgl"))]
const VIRGL_TEST_CAPSET: u32 = 0x49;
/// Guest RAM for the probe.
const PROBE_RAM: usize = 8 << 20;

/// When to restart a dead device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Never: the run ends with the device.
    Never,
    /// Up to this many times.
    OnFailure(u32),
}

impl std::str::FromStr for Restart {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(Restart::Never),
            "on-failure" => Ok(Restart::OnFailure(3)),
            _ => match s.strip_prefix("on-failure:").map(str::parse) {
                Some(Ok(n)) => Ok(Restart::OnFailure(n)),
                _ => Err(format!("--restart: expected never|on-failure[:N], got {s}")),
            },
        }
    }
}

/// Options of a run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Placement mode.
    pub mode: Mode,
    /// Window size in bytes.
    pub window: u64,
    /// Blobs to create and map.
    pub blobs: u32,
    /// Seed of the generator.
    pub seed: u64,
    /// Most blobs mapped at once.
    pub max_live: usize,
    /// Device options.
    pub device: DeviceConfig,
    /// Restart policy.
    pub restart: Restart,
    /// Fault injection: SIGKILL the device once this many blobs are mapped.
    pub kill_after: Option<u32>,
    /// Draw a progress bar on a terminal.
    pub show_progress: bool,
    /// Use KVM if it is there (tests may turn it off).
    pub use_kvm: bool,
    /// How long one guest command may take before the device is declared hung, killed and
    /// restarted ([`crate::queue_driver::COMMAND_TIMEOUT`] by default; tests shorten it).
    pub command_timeout: std::time::Duration,
}

/// Latency summary in µs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

impl Latency {
    /// From samples in µs.
    pub fn of(samples: &mut [f64]) -> Latency {
        if samples.is_empty() {
            return Latency::default();
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Latency {
            p50: at(0.5),
            p99: at(0.99),
        }
    }
}

/// The report of a run (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `fixed` or `per-blob-slot`.
    pub mode: &'static str,
    /// Backend.
    pub backend: String,
    /// Window size.
    pub window_bytes: u64,
    /// Seed.
    pub seed: u64,
    /// Blobs mapped successfully.
    pub blobs_mapped: u64,
    /// Whether a KVM guest checked what it sees.
    pub kvm: bool,
    /// Guest checks that matched (blob patterns, zeros after unmap, guest writes seen by
    /// the device).
    pub guest_verified: u64,
    /// Guest checks that did not match.
    pub guest_mismatches: u64,
    /// Guest reads that hit unbacked memory.
    pub guest_holes: u64,
    /// Memslot changes made by the hostmem window over the whole run (the window's own
    /// registration included, the warm-up blob's not).
    pub memslot_changes: u64,
    /// Most placements live at once.
    pub max_live_placements: usize,
    /// MAP_BLOB latency (guest command to completion) in µs.
    pub map_latency_us: Latency,
    /// UNMAP_BLOB latency in µs.
    pub unmap_latency_us: Latency,
    /// Facts of the (last) device.
    pub device: DeviceFacts,
    /// Device exits (crashes, kills) and what was restored.
    pub device_exits: Vec<DeviceExit>,
    /// Device restarts.
    pub restarts: u32,
    /// Events the VMM refused.
    pub refused_events: u64,
    /// Fds of the VMM once the window, VM and probe exist, and at the end (after the
    /// device was stopped): equal unless something leaked.
    pub vmm_fds: (usize, usize),
    /// Fds, VMAs and anonymous RSS of the VMM and the device at the start and the end of
    /// the blob traffic; any difference is also listed in `errors`.
    pub usage: UsageCheck,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Syscalls the device's seccomp filter refused or (log mode) logged, by name.
    pub seccomp_violations: Vec<String>,
    /// Errors that are not guest mismatches.
    pub errors: Vec<String>,
}

/// splitmix64: the seeded generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// A blob size from 4 KiB to 2 MiB, log-uniform in pages.
    pub fn blob_size(&mut self) -> u64 {
        let shift = self.below(10); // 1..512 pages
        let pages = (1u64 << shift) + self.below(1u64 << shift);
        pages.min(512) * PAGE
    }
}

#[derive(Debug, Clone, Copy)]
struct LiveBlob {
    res: u32,
    offset: u64,
    size: u64,
}

struct Session {
    device: Device,
    driver: QueueDriver,
}

fn connect(opts: &RunOptions, hostmem: &Arc<Hostmem>) -> anyhow::Result<Session> {
    let device = Device::start(&opts.device, hostmem.clone())?;
    let _ = hostmem;
    let mut driver = QueueDriver::new(device.transport())?;
    driver.set_timeout(opts.command_timeout)?;
    if opts.device.backend == "virgl" {
        driver
            .ctx_create(CTX, VIRTIO_GPU_CAPSET_VENUS)
            .context("CTX_CREATE (venus)")?;
        driver
            .ctx_create(VIRGL_OPS_CTX, VIRGL_TEST_CAPSET)
            .context("CTX_CREATE (virgl test ops)")?;
    } else {
        driver.ctx_create(CTX, 0).context("CTX_CREATE")?;
    }
    Ok(Session { device, driver })
}

struct Checker<'a> {
    probe: Option<&'a mut GuestProbe>,
    /// Per-blob-slot mode: an unmapped range has no memslot, so the guest sees a hole there.
    holes_expected: bool,
    verified: u64,
    mismatches: u64,
    holes: u64,
    errors: &'a mut Vec<String>,
}

impl Checker<'_> {
    /// After an unmap (or a device death) the guest must see background: zeros in fixed
    /// mode; in per-blob-slot mode unbacked memory (a hole), which is counted but expected.
    fn guest_sees_gone(&mut self, offset: u64, len: u64, what: &str) {
        let Some(probe) = self.probe.as_deref_mut() else {
            return;
        };
        match probe.hash(offset, len) {
            Ok(ProbeRead::Hole { .. }) if self.holes_expected => {
                self.holes += 1;
                self.verified += 1;
            }
            Ok(ProbeRead::Value(h)) if h == expected_hash(&vec![0u8; len as usize]) => {
                self.verified += 1
            }
            Ok(other) => {
                self.mismatches += 1;
                log::error!("guest saw {other:?} at {offset:#x}+{len:#x}, not background: {what}");
            }
            Err(e) => self.errors.push(format!("guest probe: {e}")),
        }
    }

    /// The guest reads `len` bytes at `offset` and must see `expected`.
    fn guest_sees(&mut self, offset: u64, expected: &[u8], what: &str) {
        let Some(probe) = self.probe.as_deref_mut() else {
            return;
        };
        match probe.hash(offset, expected.len() as u64) {
            Ok(ProbeRead::Value(h)) if h == expected_hash(expected) => self.verified += 1,
            Ok(ProbeRead::Value(_)) => {
                self.mismatches += 1;
                log::error!(
                    "guest mismatch: {what} at {offset:#x}+{:#x}",
                    expected.len()
                );
            }
            Ok(ProbeRead::Hole { gpa }) => {
                self.holes += 1;
                self.mismatches += 1;
                log::error!("guest hit a hole at gpa {gpa:#x}: {what}");
            }
            Err(e) => self.errors.push(format!("guest probe: {e}")),
        }
    }
}

/// Runs the workload and returns its report.
pub fn run(opts: &RunOptions) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    let vm = if opts.use_kvm {
        match Vm::available() {
            Ok(()) => Some(Arc::new(Vm::open()?)),
            Err(why) => {
                log::warn!("no KVM ({why}): running without the guest probe, nothing is verified");
                None
            }
        }
    } else {
        None
    };
    let hostmem = Arc::new(Hostmem::new(
        opts.window,
        vm.clone(),
        DEFAULT_WINDOW_GPA,
        opts.mode,
        Limits::default(),
    )?);
    let mut probe = match &vm {
        Some(vm) => Some(GuestProbe::new(
            vm.clone(),
            DEFAULT_WINDOW_GPA,
            opts.window,
            PROBE_RAM,
        )?),
        None => None,
    };
    // Baseline after the window, VM and probe exist: from here on the device's comings and
    // goings must leave the VMM's fd count unchanged.
    let fds_start = procfs::fd_count()?;
    log::debug!("VMM fds at start: {:?}", procfs::open_fds()?);
    let mut errors = Vec::new();
    let mut exits = Vec::new();
    let mut violations: Vec<String> = Vec::new();
    let mut restarts = 0u32;
    let mut session = Some(connect(opts, &hostmem)?);
    let mut facts = session
        .as_ref()
        .map(|s| s.device.facts().clone())
        .unwrap_or_default();
    let mut rng = Rng::new(opts.seed);
    let mut live: Vec<LiveBlob> = Vec::new();
    // Fixed-size histograms: a long soak must not grow the VMM by recording samples.
    let (mut map_us, mut unmap_us) = (Histogram::default(), Histogram::default());
    let mut usage = UsageCheck::default();
    let device_usage = |s: &Session| Usage::of(&s.device.pid().to_string());
    let mut next_res = 1u32;
    // Warm-up: one blob created, mapped, unmapped and unreferenced before the baseline, so
    // that state both processes create lazily on their first event (the mapping-service
    // thread's malloc arena, buffers) is part of it and not mistaken for a leak.
    let slots_before_warm_up = hostmem.memslot_changes();
    if let Some(s) = session.as_mut() {
        let res = next_res;
        next_res += 1;
        let warm = s
            .driver
            .create_blob(CTX, res, 0, PAGE)
            .and_then(|()| s.driver.map_blob(CTX, res, 0).map(drop))
            .and_then(|()| s.driver.unmap_blob(CTX, res))
            .and_then(|()| s.driver.unref(res));
        if let Err(e) = warm {
            errors.push(format!("warm-up blob: {e}"));
        }
    }
    // Not part of the workload: per-blob-slot mode's add and delete for the warm-up blob.
    let warm_up_slots = hostmem.memslot_changes() - slots_before_warm_up;
    if let Some(s) = &session {
        usage.vmm_start = Usage::of("self")?;
        usage
            .vmm_rss_anon_kib_samples
            .push(usage.vmm_start.rss_anon_kib);
        usage.device_start = device_usage(s)?;
    }
    let tenth = (opts.blobs / 10).max(1);
    let mut mapped = 0u64;
    let mut killed = false;
    let mut chk = Checker {
        probe: probe.as_mut(),
        holes_expected: opts.mode == Mode::PerBlobSlot,
        verified: 0,
        mismatches: 0,
        holes: 0,
        errors: &mut errors,
    };
    let progress = opts.show_progress && std::io::stderr().is_terminal();
    // Where the renderer-side FILL / CHECKSUM streams go (virgl: the test-ops context).
    let ops_ctx = if opts.device.backend == "virgl" {
        VIRGL_OPS_CTX
    } else {
        CTX
    };

    let mut i = 0u32;
    while i < opts.blobs {
        let Some(s) = session.as_mut() else { break };
        if i > 0 && i.is_multiple_of(tenth) {
            if let Ok(u) = Usage::of("self") {
                usage.vmm_rss_anon_kib_samples.push(u.rss_anon_kib);
            }
        }
        if progress && i.is_multiple_of(10) {
            let w = 40 * i as usize / opts.blobs.max(1) as usize;
            eprint!(
                "\r[{}{}] {i}/{}",
                "#".repeat(w),
                " ".repeat(40 - w),
                opts.blobs
            );
        }
        if opts.kill_after == Some(i) && !killed && !live.is_empty() {
            killed = true;
            log::warn!(
                "fault injection: SIGKILL to device pid {} with {} live blobs",
                s.device.pid(),
                live.len()
            );
            s.device.kill(libc::SIGKILL);
        }
        let step = (|| -> Result<(), CmdError> {
            // Make room: unmap (or unref while mapped) the oldest blobs beyond the limit.
            while live.len() >= opts.max_live || (live.len() > 1 && rng.below(4) == 0) {
                let b = live.remove(0);
                let t = Instant::now();
                if rng.below(8) == 0 {
                    s.driver.unref(b.res)?; // unref of a mapped blob unmaps it first
                    unmap_us.record(t.elapsed());
                } else {
                    s.driver.unmap_blob(CTX, b.res)?;
                    unmap_us.record(t.elapsed());
                    s.driver.unref(b.res)?;
                }
                chk.guest_sees_gone(b.offset, b.size, "after unmap");
            }
            let size = rng.blob_size();
            let res = next_res;
            next_res += 1;
            let seed = rng.next_u64();
            s.driver.create_blob(CTX, res, 0, size)?;
            let fill = encode_stream(&[ShmOp::Fill {
                resource_id: res,
                offset: 0,
                len: size,
                seed,
            }]);
            s.driver.submit_3d(ops_ctx, fill)?;
            let Some(offset) = free_offset(&mut rng, &live, size, opts.window) else {
                s.driver.unref(res)?;
                return Ok(());
            };
            let t = Instant::now();
            s.driver.map_blob(CTX, res, offset)?;
            map_us.record(t.elapsed());
            mapped += 1;
            let mut expected = pattern_bytes(seed, 0, size as usize);
            chk.guest_sees(offset, &expected, "blob pattern");
            // Now and then the guest writes into the blob and the device must see it.
            if res.is_multiple_of(4) {
                if let Some(p) = chk.probe.as_deref_mut() {
                    let at = rng.below(size / 8) * 8;
                    let value = rng.next_u64();
                    match p.write_u64(offset + at, value) {
                        Ok(_) => {
                            expected[at as usize..at as usize + 8]
                                .copy_from_slice(&value.to_le_bytes());
                            let q = encode_stream(&[ShmOp::Checksum {
                                resource_id: res,
                                offset: 0,
                                len: size,
                            }]);
                            let reply = s.driver.submit_3d(ops_ctx, q)?;
                            let got = reply
                                .get(..8)
                                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])));
                            if got == Some(checksum(&expected)) {
                                chk.verified += 1;
                            } else {
                                chk.mismatches += 1;
                                log::error!(
                                    "device checksum after a guest write at {:#x} does not match",
                                    offset + at
                                );
                            }
                        }
                        Err(e) => chk.errors.push(format!("guest write: {e}")),
                    }
                }
            }
            live.push(LiveBlob { res, offset, size });
            Ok(())
        })();
        match step {
            Ok(()) => i += 1,
            Err(e) if e.device_lost() => {
                let Some(s) = session.take() else { break };
                let before: Vec<LiveBlob> = std::mem::take(&mut live);
                let exit = s.device.stop(&e.to_string());
                exits_violations(&mut violations, &exit);
                // Everything the dead device had placed must read zeros now.
                for b in &before {
                    chk.guest_sees(
                        b.offset,
                        &vec![0u8; b.size as usize],
                        "zeros after device death",
                    );
                }
                if hostmem.live() != 0 {
                    chk.errors
                        .push(format!("{} placements survived the device", hostmem.live()));
                }
                exits.push(exit);
                match opts.restart {
                    Restart::OnFailure(n) if restarts < n => {
                        restarts += 1;
                        match connect(opts, &hostmem) {
                            Ok(s) => {
                                facts = s.device.facts().clone();
                                match device_usage(&s) {
                                    Ok(u) => usage.device_start = u,
                                    Err(e) => chk.errors.push(format!("device usage: {e}")),
                                }
                                session = Some(s);
                            }
                            Err(e) => chk.errors.push(format!("restart failed: {e:#}")),
                        }
                    }
                    _ => chk
                        .errors
                        .push(format!("device lost and not restarted: {e}")),
                }
            }
            Err(e) => {
                // A refused command: log it and go on with the next blob.
                chk.errors.push(format!("blob {i}: {e}"));
                i += 1;
            }
        }
    }
    if progress {
        eprintln!("\r[{}] {}/{}", "#".repeat(40), opts.blobs, opts.blobs);
    }
    // Drain: unmap and unref everything still live, checking zeros.
    if let Some(s) = session.as_mut() {
        for b in std::mem::take(&mut live) {
            let t = Instant::now();
            match s
                .driver
                .unmap_blob(CTX, b.res)
                .and_then(|()| s.driver.unref(b.res))
            {
                Ok(()) => {
                    unmap_us.record(t.elapsed());
                    chk.guest_sees_gone(b.offset, b.size, "after unmap");
                }
                Err(e) => chk.errors.push(format!("final unmap of {}: {e}", b.res)),
            }
        }
        // Everything is unmapped and unreferenced and the device still serves: both
        // processes must be back where they started.
        match (Usage::of("self"), device_usage(s)) {
            (Ok(v), Ok(d)) => {
                usage.vmm_end = v;
                usage.vmm_rss_anon_kib_samples.push(v.rss_anon_kib);
                usage.device_end = d;
                chk.errors.extend(usage.problems(opts.blobs));
            }
            (Err(e), _) | (_, Err(e)) => chk.errors.push(format!("usage at the end: {e}")),
        }
    }
    let (verified, mismatches, holes) = (chk.verified, chk.mismatches, chk.holes);
    if let Some(s) = session.take() {
        drop(s.driver);
        let exit = s.device.stop("run finished");
        exits_violations(&mut violations, &exit);
        if exit.code != Some(0) {
            errors.push(format!("device did not exit cleanly at the end: {exit:?}"));
        }
    }
    let counters = hostmem.counters();
    let report = Report {
        mode: opts.mode.name(),
        backend: opts.device.backend.clone(),
        window_bytes: opts.window,
        seed: opts.seed,
        blobs_mapped: mapped,
        kvm: vm.is_some(),
        guest_verified: verified,
        guest_mismatches: mismatches,
        guest_holes: holes,
        memslot_changes: hostmem.memslot_changes() - warm_up_slots,
        max_live_placements: hostmem.max_live_seen(),
        map_latency_us: map_us.latency(),
        unmap_latency_us: unmap_us.latency(),
        device: facts,
        device_exits: exits,
        restarts,
        refused_events: counters.refused,
        seccomp_violations: violations,
        usage,
        vmm_fds: (fds_start, {
            log::debug!("VMM fds at the end: {:?}", procfs::open_fds()?);
            procfs::fd_count()?
        }),
        seconds: t0.elapsed().as_secs_f64(),
        errors,
    };
    Ok(report)
}

fn exits_violations(all: &mut Vec<String>, exit: &DeviceExit) {
    for v in exit.seccomp_violations.iter().chain(exit.syscall.iter()) {
        if !all.contains(v) {
            all.push(v.clone());
        }
    }
}

/// A random page-aligned offset where `size` bytes fit without overlapping `live`.
fn free_offset(rng: &mut Rng, live: &[LiveBlob], size: u64, window: u64) -> Option<u64> {
    let slots = (window.checked_sub(size)? / PAGE) + 1;
    (0..64).find_map(|_| {
        let off = rng.below(slots) * PAGE;
        let clear = live
            .iter()
            .all(|b| off + size <= b.offset || b.offset + b.size <= off);
        clear.then_some(off)
    })
}

/// Default device config for the run: the device binary found beside us, jailed under
/// `gpu_device_{backend}.policy`.
pub fn default_device(backend: &str, policy_dir: Option<PathBuf>) -> anyhow::Result<DeviceConfig> {
    let virgl = backend == "virgl";
    let exe = std::env::current_exe()?;
    let (program, pre_args) = if virgl
        && cfg!(feature = "virgl")
        && std::env::var_os("HOSTMEM_DEVICE_BIN").is_none()
        && exe.file_name().is_some_and(|n| n == "hostmem")
    {
        // This hostmem was built with the virgl backend; a hostmem-gpu-device beside it may
        // not be (`cargo run -p hostmem-vmm --features virgl` does not rebuild it), so the
        // device is this binary in its device mode.
        (exe, vec!["device".to_string()])
    } else {
        DeviceConfig::find_program()?
    };
    Ok(device_config(program, pre_args, backend, policy_dir))
}

/// The run's device config for `backend` with a given device program: jailed under
/// `gpu_device_{backend}.policy` from `policy_dir` (default: ours), with the read-only
/// binds the backend needs.
pub fn device_config(
    program: PathBuf,
    pre_args: Vec<String>,
    backend: &str,
    policy_dir: Option<PathBuf>,
) -> DeviceConfig {
    let dir = policy_dir.unwrap_or_else(crate::policy::default_dir);
    let virgl = backend == "virgl";
    let mut ro_binds = crate::policy::loader_ro_binds();
    if virgl {
        ro_binds.extend(crate::policy::virgl_ro_binds());
    }
    DeviceConfig {
        program,
        pre_args,
        // virgl: the run proves renderer <-> guest sharing through the test ops.
        extra_args: if virgl {
            vec!["--test-ops".into()]
        } else {
            vec![]
        },
        backend: backend.to_string(),
        jailed: true,
        policy: Some(dir.join(format!("gpu_device_{backend}.policy"))),
        seccomp_log: false,
        ro_binds,
        log_filter: std::env::var("RUST_LOG").ok(),
        start_timeout: crate::device::START_TIMEOUT,
        render_server: None,
    }
}
