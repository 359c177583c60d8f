//! `hostmem run`: the main job. A KVM guest runs hostmem's virtio-gpu guest driver
//! ([`crate::guest`]), which finds the GPU on PCI, sets up its virtqueues and runs a seeded
//! workload of blobs created, filled by the renderer, mapped at generated offsets (many
//! live at once, batches in flight), checked byte for byte through the hostmem BAR,
//! written by the guest and checked by the device, unmapped (the guest must then read
//! zeros) and unref'd, all through the jailed device process. The VMM serves the guest's
//! PCI and BAR0 exits ([`crate::virtio_pci`]), the device's placement events
//! ([`crate::service`]) and the device's life (restart policy, fault injection, resource
//! accounting at the guest's warm-up and drain events).
//!
//! Two transports reach the same jailed device binary through the same virtio-pci code:
//! `virtio-pci` (hostmem's own transport tube and mapping tube, [`crate::device`]) and
//! `vhost-user` (the device as a vhost-user backend, the VMM its frontend placing every
//! `SHMEM_MAP` in the window, [`crate::vhost_frontend`]).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use hostmem_base::kvm::Vm;
use hostmem_base::procfs;
use serde::Serialize;

use crate::device::{DeviceConfig, DeviceExit, DeviceFacts};
use crate::guest::{GuestEvent, GuestParams, GuestVm, OPS_NONE};
use crate::hostmem::{Hostmem, Limits, Mode, DEFAULT_WINDOW_GPA};
pub use crate::latency::Latency;
use crate::resources::{Usage, UsageCheck};
use crate::virtio_pci::{PciLayout, VirtioPciGpu};
pub use hostmem_device::backend::BackendKind;

mod session;

use hostmem_base::log_limit::merge_counts;
pub use session::Transport;
use session::{add_stats, connect, Session};

const PAGE: u64 = 4096;
/// virgl backend: the venus capset; the workload's blobs are venus SHM blobs (blob_id 0,
/// flags exactly MAPPABLE).
const VIRTIO_GPU_CAPSET_VENUS: u32 = 4;
/// The virgl backend's test capset (`hostmem_device::backend::virgl::TEST_CAPSET_ID`).
#[cfg(feature = "virgl")]
const VIRGL_TEST_CAPSET: u32 = hostmem_device::backend::virgl::TEST_CAPSET_ID;
/// Without the feature the device has no virgl backend and refuses to start with it.
#[cfg(not(feature = "virgl"))]
const VIRGL_TEST_CAPSET: u32 = 30;
/// virgl: whether [`device_config`] gives the device `--test-ops`, with which the run proves
/// renderer <-> guest sharing through the backend's test ops. A test knob: only in a build
/// with the cargo feature `fault-injection` (tools/test's). A virgl device without it gets
/// no streams: the guest writes each blob's pattern itself ([`OPS_NONE`]) and the report's
/// `device_fills` is false.
const VIRGL_SHARING_CHECKED: bool = cfg!(feature = "fault-injection");
/// How long one guest command may take before the device is declared hung, killed and
/// restarted.
pub const COMMAND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
    /// How the transport reaches the device.
    pub transport: Transport,
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
    /// Fault injection: SIGKILL the device once this many blobs are mapped (cargo feature
    /// `fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub kill_after: Option<u32>,
    /// Draw a progress bar on a terminal.
    pub show_progress: bool,
    /// How long one guest command may take before the device is declared hung, killed and
    /// restarted ([`COMMAND_TIMEOUT`] by default; tests shorten it).
    pub command_timeout: std::time::Duration,
    /// Test knob (cargo feature `fault-injection`): the guest driver raises its repeatable
    /// events this many times each ([`GuestParams::flood_events`]).
    #[cfg(feature = "fault-injection")]
    pub guest_event_flood: u64,
    /// Write scanout 0's latest frame here as PNG at the end of the run (`--screenshot`).
    pub screenshot: Option<std::path::PathBuf>,
}

/// The report of a run (`--json` prints it).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The frames the device sent ([`crate::display`]): accepted, refused, scanout 0's
    /// latest frame's size.
    pub display: crate::display::DisplayReport,
    /// `--screenshot`: where scanout 0's latest frame was written (`None`: not asked, or
    /// no frame came).
    pub screenshot: Option<String>,
    /// `fixed` or `per-blob-slot`.
    pub mode: &'static str,
    /// Backend: `shm` or `virgl`.
    pub backend: &'static str,
    /// How the VMM reaches the device: `virtio-pci` (transport and mapping tubes) or
    /// `vhost-user` (the VMM as vhost-user frontend). The guest sees virtio-pci either way.
    pub transport: &'static str,
    /// Window size.
    pub window_bytes: u64,
    /// Seed.
    pub seed: u64,
    /// Blobs mapped successfully.
    pub blobs_mapped: u64,
    /// A KVM guest ran the driver and checked what it sees (always, since the guest driver
    /// is the workload).
    pub kvm: bool,
    /// Guest checks that matched (blob patterns, zeros after unmap, guest writes seen by
    /// the device).
    pub guest_verified: u64,
    /// Guest checks that did not match.
    pub guest_mismatches: u64,
    /// Whether the device wrote each blob's pattern and checksummed the guest's writes (shm:
    /// the backend; virgl: through the renderer's own mapping, the backend's test ops, only
    /// in a build with the cargo feature `fault-injection`, as tools/test's). `false`: the
    /// guest wrote each pattern itself and read it back through the window (virgl in a
    /// user's build), so the run did not prove renderer <-> guest sharing.
    pub device_fills: bool,
    /// Guest reads that hit unbacked memory.
    pub guest_holes: u64,
    /// Memslot changes made by the hostmem window over the whole run (the window's own
    /// registration included, the warm-up blob's not).
    pub memslot_changes: u64,
    /// Most placements live at once.
    pub max_live_placements: usize,
    /// MAP_BLOB latency in µs, measured by the guest driver from putting the command in
    /// the available ring to seeing it in the used ring (its TSC), batches in flight.
    pub map_latency_us: Latency,
    /// UNMAP_BLOB latency in µs, measured the same way.
    pub unmap_latency_us: Latency,
    /// What the guest driver did.
    pub guest_driver: GuestDriverReport,
    /// The virtqueues' counters.
    pub virtqueue: VirtqueueReport,
    /// Facts of the (last) device.
    pub device: DeviceFacts,
    /// How the device's memory is bounded (limit and mechanism; as in `device`).
    pub device_memory_limit: crate::device::MemoryLimitFacts,
    /// Device ends that were OOM kills at that limit.
    pub device_oom_kills: u32,
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
    /// The stop signal (SIGINT/SIGTERM) that ended the run early, if one did.
    pub stopped_by: Option<String>,
    /// Errors that are not guest mismatches: at most [`MAX_ERRORS`], then one line that
    /// says how many more.
    pub errors: Vec<String>,
    /// The blob memory bounds and how close the run came to them.
    pub blob_memory: BlobMemoryReport,
    /// Warnings the guest or the device caused, by kind: every one counted, each kind
    /// logged only the 1st, 2nd, 4th, … time (`hostmem_base::log_limit`).
    pub warnings: WarningsReport,
}

/// `"blob_memory"` in the JSON: what bounds the blob memory the guest can make the host
/// hold, on both sides (issue 22: the pages are charged to whoever touches them first).
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct BlobMemoryReport {
    /// The device's budget for all its live blobs together, in bytes (its memory limit;
    /// `null`: none): CREATE_BLOB past it is refused with ERR_OUT_OF_MEMORY.
    pub device_budget: Option<u64>,
    /// Most bytes the device's live blobs held at once (the largest over device lifetimes).
    pub device_bytes_max: u64,
    /// CREATE_BLOBs the device refused at its budget (summed over lifetimes).
    pub device_refused: u64,
    /// The VMM's own bound on the bytes of live placements (`null`: the window only),
    /// independent of what the device says.
    pub vmm_placed_limit: Option<u64>,
    /// Most bytes the VMM had placed at once.
    pub vmm_placed_bytes_max: u64,
    /// Placements the VMM refused at its bound (`ERR_OUT_OF_MEMORY` to the guest).
    pub vmm_refused: u64,
}

/// Most errors a report lists.
pub const MAX_ERRORS: usize = 64;

/// `"warnings"` in the JSON: counts by kind, at most `log_limit::MAX_KINDS` kinds each.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WarningsReport {
    /// Counted by the VMM: refused events and protocol errors on the mapping tube, bad
    /// register writes and refused queue set-ups in the transport, refused backend
    /// requests.
    pub vmm: std::collections::BTreeMap<String, u64>,
    /// What the device says it refused (bad chains, bad commands, transport messages),
    /// summed over device lifetimes: the device's claim.
    pub device: std::collections::BTreeMap<String, u64>,
}

/// The workspace's seeded generator (splitmix64, `hostmem_base::rng`).
pub use hostmem_base::rng::SplitMix64 as Rng;

/// A blob size from 4 KiB to 2 MiB, log-uniform in pages.
pub fn blob_size(rng: &mut Rng) -> u64 {
    let shift = rng.below(10); // 1..512 pages
    let pages = (1u64 << shift) + rng.below(1u64 << shift);
    pages.min(512) * PAGE
}

/// Where BAR0 (common/notify/ISR/device configuration) sits in guest-physical memory.
pub const BAR0_GPA: u64 = 0xC000_0000;
/// BAR0's size.
pub const BAR0_SIZE: u64 = 0x4000;
/// The GSI the queues' call eventfds raise (the function's INTx line).
pub const IRQ_GSI: u32 = 10;

/// Blobs the guest driver creates, fills and maps per batch (each batch is two kicks with
/// up to 16 commands in flight, then the unmaps and unrefs up to 32 at a time).
pub const GUEST_BATCH: u64 = 8;

/// What the run's guest driver did (`"guest_driver"` in the JSON).
#[derive(Debug, Clone, Default, Serialize)]
pub struct GuestDriverReport {
    /// Commands the guest driver completed through the controlq.
    pub commands: u64,
    /// Commands answered with an error response.
    pub errors: u64,
    /// Most commands in the controlq at once.
    pub in_flight_max: u64,
    /// Checks in the guest that did not match.
    pub mismatches: u64,
    /// GET_CAPSET_INFO answered.
    pub capsets: u64,
    /// Times the driver reset the device after it was lost.
    pub device_resets: u64,
    /// Resets the guest wrote that read DEVICE_NEEDS_RESET instead of 0: the device did
    /// not complete them and was stopped; the driver reset again.
    pub resets_refused: u64,
    /// Port I/O and MMIO exits the VMM served (PCI configuration, BAR0, events, holes).
    pub vm_exits: u64,
    /// `num_scanouts` the driver read in the device configuration (the device's, from its
    /// `Ready`).
    pub num_scanouts: u64,
}

/// The virtqueues' counters (`"virtqueue"` in the JSON).
#[derive(Debug, Clone, Default, Serialize)]
pub struct VirtqueueReport {
    /// Notifications (kick eventfd counts the device read), summed over device lifetimes.
    pub kicks: u64,
    /// Notify writes the guest driver made (each a `KVM_IOEVENTFD` hit, no VMM exit).
    pub guest_kicks: u64,
    /// Descriptor chains the device took.
    pub chains: u64,
    /// Chains the device refused as malformed.
    pub bad_chains: u64,
    /// Call eventfd signals (`KVM_IRQFD`): 0 when the driver suppresses them.
    pub interrupts: u64,
    /// Used-ring polls of the guest driver (it runs with interrupts off and polls).
    pub polls: u64,
    /// Notify writes that exited to the VMM instead of hitting the ioeventfd (the VMM then
    /// kicks by hand); 0 where KVM matches the ioeventfd.
    pub notify_exits: u64,
}

/// The device's last cursor against what the guest driver sent (its `cursor_sent`, and
/// the image it drew for `seed`): the fields that differ (7 when there is no cursor) and
/// the errors to report.
fn cursor_check(
    seed: u64,
    results: &crate::guest::GuestResults,
    got: Option<&hostmem_ipc::protocol::CursorMsg>,
) -> (u64, Vec<String>) {
    let [scanout_id, x, y, resource_id, hot_x, hot_y] = results.cursor_sent;
    let want = hostmem_ipc::protocol::CursorMsg {
        scanout_id,
        x,
        y,
        resource_id,
        hot_x,
        hot_y,
        image_hash: hostmem_ipc::protocol::image_hash(&crate::guest::cursor_image(seed)),
    };
    let mut errors = Vec::new();
    if results.cursor_commands < 2 {
        errors.push(format!(
            "the guest driver sent {} of its 2 cursor commands",
            results.cursor_commands
        ));
    }
    let Some(got) = got else {
        errors.push("no cursor of the guest's reached the VMM".into());
        return (7, errors);
    };
    let bad = [
        got.scanout_id == want.scanout_id,
        got.x == want.x,
        got.y == want.y,
        got.resource_id == want.resource_id,
        got.hot_x == want.hot_x,
        got.hot_y == want.hot_y,
        got.image_hash == want.image_hash,
    ]
    .iter()
    .filter(|ok| !**ok)
    .count() as u64;
    if bad > 0 {
        errors.push(format!(
            "the cursor the VMM saw ({got:?}) is not the one the guest driver sent ({want:?})"
        ));
    }
    (bad, errors)
}

/// Runs the workload and returns its report.
pub fn run(opts: &RunOptions) -> anyhow::Result<Report> {
    run_until_stopped(opts, None)
}

/// [`run`], ended early (the device stopped, the window restored, the report made, an
/// error saying so) when `stop` reports SIGINT or SIGTERM. A SIGUSR1 on `stop` writes a
/// screenshot (`--screenshot`) between guest events and the run goes on.
pub fn run_until_stopped(
    opts: &RunOptions,
    stop: Option<&crate::stop::StopSignals>,
) -> anyhow::Result<Report> {
    let t0 = Instant::now();
    if let Err(why) = Vm::available() {
        anyhow::bail!("hostmem run needs /dev/kvm ({why}): its guest driver runs in a KVM guest");
    }
    let vm = Arc::new(Vm::open()?);
    // The in-kernel irqchip must exist before the vCPU; the queues' irqfds need it.
    vm.create_irqchip().context("KVM_CREATE_IRQCHIP")?;
    // The guest may reach (and touch, charging the VMM) at most the device's memory limit
    // of blobs at once, whatever the device does; the device bounds its blobs the same.
    let hostmem = Arc::new(Hostmem::new(
        opts.window,
        Some(vm.clone()),
        DEFAULT_WINDOW_GPA,
        opts.mode,
        Limits {
            max_placed_bytes: opts.device.memory_limit.unwrap_or(u64::MAX),
            ..Limits::default()
        },
    )?);
    let virgl = opts.device.backend.is_virgl();
    let params = GuestParams {
        blobs: u64::from(opts.blobs),
        seed: opts.seed,
        max_live: opts.max_live as u64,
        batch: GUEST_BATCH,
        ctx_capset: if virgl { VIRTIO_GPU_CAPSET_VENUS } else { 0 },
        ops_capset: match (
            virgl,
            opts.device.extra_args.iter().any(|a| a == "--test-ops"),
        ) {
            (true, true) => VIRGL_TEST_CAPSET,
            (true, false) => OPS_NONE,
            (false, _) => 0,
        },
        holes_expected: opts.mode == Mode::PerBlobSlot,
        #[cfg(feature = "fault-injection")]
        flood_events: opts.guest_event_flood,
        #[cfg(not(feature = "fault-injection"))]
        flood_events: 0,
    };
    if params.ops_capset == OPS_NONE {
        log::info!(
            "virgl: no test ops in this build (cargo feature `fault-injection`): the guest \
             writes each blob's pattern itself, renderer <-> guest sharing is not checked"
        );
    }
    let mut guest = GuestVm::new(
        vm.clone(),
        DEFAULT_WINDOW_GPA,
        opts.window,
        (BAR0_GPA, BAR0_GPA + BAR0_SIZE),
        &params,
    )?;
    let mut pci = VirtioPciGpu::new(
        vm.clone(),
        PciLayout {
            bar0_gpa: BAR0_GPA,
            window_gpa: DEFAULT_WINDOW_GPA,
            window_size: opts.window,
            irq_gsi: IRQ_GSI,
        },
        vec![guest.ram_region()?],
    )?;
    // Every device attached gets guest RAM: none may hand it back as a blob.
    for fd in pci.guest_ram_fds() {
        hostmem.note_given("guest RAM", fd)?;
    }
    // A reset the device answered is complete only with nothing of it left in the window.
    pci.watch_window(hostmem.clone());
    // Baseline after the window, VM, guest and transport exist: from here on the device's
    // comings and goings must leave the VMM's fd count unchanged.
    let fds_start = procfs::fd_count()?;
    log::debug!("VMM fds at start: {:?}", procfs::open_fds()?);
    let mut errors = Vec::new();
    let mut exits = Vec::new();
    let mut violations: Vec<String> = Vec::new();
    let mut restarts = 0u32;
    let mut session = Some(connect(opts, &hostmem, &mut pci)?);
    let mut facts = session
        .as_ref()
        .map(|s| s.facts().clone())
        .unwrap_or_default();
    let mut usage = UsageCheck::default();
    let device_usage = |s: &Session| Usage::of(&s.pid().to_string());
    let mut vq = VirtqueueReport::default();
    let mut device_warnings = std::collections::BTreeMap::new();
    let mut blob_memory = BlobMemoryReport::default();
    let slots_at_start = hostmem.memslot_changes();
    let mut warm_up_slots = 0;
    let tenth = (u64::from(opts.blobs) / 10).max(1);
    let mut last_tenth = 0;
    #[cfg(feature = "fault-injection")]
    let mut killed = false;
    let mut drained = false;
    let mut warmed_up = false;
    let mut waiting_since: Option<Instant> = None;
    let progress = opts.show_progress && std::io::stderr().is_terminal();
    let guest_t0 = Instant::now();
    let mut guest_wall = None;
    let mut guest_failed = false;
    let mut stopped_by: Option<String> = None;
    // Wall time at the guest's last event, when it also read its TSC (`tsc_end`).
    let mut last_event_at = guest_t0.elapsed();

    loop {
        if let Some(sig) = stop.and_then(crate::stop::StopSignals::received) {
            log::warn!("{sig}: stopping the run");
            errors.push(format!("stopped by {sig}"));
            stopped_by = Some(sig.to_string());
            break;
        }
        // SIGUSR1 with --screenshot: scanout 0's latest frame now, the run goes on.
        if let (Some(stop), Some(path)) = (stop, &opts.screenshot) {
            if stop.take_screenshot_request() {
                match hostmem.frames().screenshot(path) {
                    Ok(true) => log::info!("SIGUSR1: screenshot written to {}", path.display()),
                    Ok(false) => log::warn!("SIGUSR1: no frame on scanout 0 yet, no screenshot"),
                    Err(e) => log::warn!("SIGUSR1: screenshot {}: {e:#}", path.display()),
                }
            }
        }
        let event = match guest.run_until_event(&mut pci) {
            Ok(e) => e,
            Err(e) => {
                errors.push(format!("guest: {e}"));
                guest_failed = true;
                break;
            }
        };
        last_event_at = guest_t0.elapsed();
        if !matches!(event, GuestEvent::Waiting(_)) {
            waiting_since = None;
        }
        let mut lost: Option<String> = None;
        match &event {
            GuestEvent::WarmedUp if warmed_up => {
                hostmem.warn(
                    "guest warmed up again",
                    format_args!("guest driver reported the warm-up again; ignored"),
                );
            }
            GuestEvent::WarmedUp => {
                warmed_up = true;
                // The warm-up blob is not part of the workload (per-blob-slot mode adds and
                // deletes a slot for it); the state both processes create lazily on their
                // first event is part of the baseline, so it is not taken for a leak.
                warm_up_slots = hostmem.memslot_changes() - slots_at_start;
                if let Some(s) = &session {
                    usage.vmm_start = Usage::of("self")?;
                    usage
                        .vmm_rss_anon_kib_samples
                        .push(usage.vmm_start.rss_anon_kib);
                    usage.device_start = device_usage(s)?;
                }
            }
            GuestEvent::Progress(done) => {
                // Only forward progress within the workload is sampled: at most 10 samples
                // (and `Samples` is bounded anyway).
                if *done <= u64::from(opts.blobs) && done / tenth > last_tenth {
                    last_tenth = done / tenth;
                    if let Ok(u) = Usage::of("self") {
                        usage.vmm_rss_anon_kib_samples.push(u.rss_anon_kib);
                    }
                }
                if progress {
                    let w = (40 * done / u64::from(opts.blobs).max(1)).min(40) as usize;
                    eprint!(
                        "\r[{}{}] {done}/{}",
                        "#".repeat(w),
                        " ".repeat(40 - w),
                        opts.blobs
                    );
                }
                #[cfg(feature = "fault-injection")]
                if let (Some(k), Some(s)) = (opts.kill_after, &session) {
                    if !killed && *done >= u64::from(k) && hostmem.live() > 0 {
                        killed = true;
                        log::warn!(
                            "fault injection: SIGKILL to device pid {} with {} live placements",
                            s.pid(),
                            hostmem.live()
                        );
                        s.kill(libc::SIGKILL);
                    }
                }
            }
            GuestEvent::Waiting(_) => {
                let since = *waiting_since.get_or_insert_with(Instant::now);
                if since.elapsed() > opts.command_timeout {
                    lost = Some(format!(
                        "timed out: no response for {:?}, device hung",
                        opts.command_timeout
                    ));
                }
            }
            GuestEvent::Reinitialised => {
                // The restarted device now holds what a serving device holds (guest RAM,
                // queue eventfds) and no blob: its baseline for the end-of-run check.
                if let Some(s) = &session {
                    match device_usage(s) {
                        Ok(u) => usage.device_start = u,
                        Err(e) => errors.push(format!("device usage: {e}")),
                    }
                }
            }
            GuestEvent::DeviceLost(live) => {
                hostmem.info(
                    "guest saw DEVICE_NEEDS_RESET",
                    format_args!("guest driver saw DEVICE_NEEDS_RESET with {live} blobs live: it resets the device"),
                );
            }
            GuestEvent::Drained if drained => {
                hostmem.warn(
                    "guest drained again",
                    format_args!("guest driver reported the drain again; ignored"),
                );
            }
            GuestEvent::Drained => {
                drained = true;
                if let Some(s) = &session {
                    // Everything is unmapped and unreferenced and the device still serves:
                    // both processes must be back where they started.
                    match (Usage::of("self"), device_usage(s)) {
                        (Ok(v), Ok(d)) => {
                            usage.vmm_end = v;
                            usage.vmm_rss_anon_kib_samples.push(v.rss_anon_kib);
                            usage.device_end = d;
                            errors.extend(usage.problems(opts.blobs));
                        }
                        (Err(e), _) | (_, Err(e)) => errors.push(format!("usage at the end: {e}")),
                    }
                    if hostmem.live() != 0 {
                        errors.push(format!(
                            "{} placements live after the drain",
                            hostmem.live()
                        ));
                    }
                }
            }
            GuestEvent::Done => {
                guest_wall = Some(guest_t0.elapsed());
                break;
            }
            GuestEvent::Fatal(why) => {
                errors.push(format!("guest driver gave up: {why}"));
                guest_failed = true;
                break;
            }
            GuestEvent::TransportLost(why) => {
                // The guest's access (a reset the device did not complete) waits in the
                // vCPU until the device is stopped and the window restored, below.
                lost = Some(why.clone());
            }
        }
        if lost.is_none() {
            if let Some(why) = pci.lost() {
                lost = Some(why.to_string());
            }
        }
        if lost.is_none() {
            if let Some(s) = &session {
                if s.has_ended() {
                    lost = Some("the device ended".into());
                } else if matches!(s, Session::VhostUser(_)) && !pci.is_attached() {
                    // The main socket broke (the device closes it on a protocol error and
                    // waits for the next frontend): restart it.
                    lost = Some("the vhost-user connection broke".into());
                }
            }
        }
        let Some(why) = lost else { continue };
        let Some(s) = session.take() else {
            // Nothing left to stop: the loss is settled.
            pci.detach();
            continue;
        };
        add_stats(&pci, &mut vq, &mut device_warnings, &mut blob_memory);
        let exit = s.stop(&why);
        pci.detach();
        exits_violations(&mut violations, &exit);
        if hostmem.live() != 0 {
            errors.push(format!("{} placements survived the device", hostmem.live()));
        }
        exits.push(exit);
        match opts.restart {
            Restart::OnFailure(n) if restarts < n => {
                restarts += 1;
                match connect(opts, &hostmem, &mut pci) {
                    Ok(s) => {
                        // Its usage baseline is taken when the guest has set it up
                        // (GuestEvent::Reinitialised).
                        facts = s.facts().clone();
                        session = Some(s);
                    }
                    Err(e) => {
                        errors.push(format!("restart failed: {e:#}"));
                        break;
                    }
                }
            }
            _ => {
                errors.push(format!("device lost and not restarted: {why}"));
                break;
            }
        }
    }
    if progress {
        eprintln!();
    }
    let results = guest.results()?;
    if let Some(s) = session.take() {
        add_stats(&pci, &mut vq, &mut device_warnings, &mut blob_memory);
        // A vhost-user backend serves until it is killed: it ended cleanly if it was still
        // serving when the run ended it.
        let serving = match &s {
            Session::Native(_) => None,
            Session::VhostUser(d) => Some(!d.has_ended()),
        };
        let exit = s.finish("run finished");
        pci.detach();
        exits_violations(&mut violations, &exit);
        if !serving.unwrap_or(exit.code == Some(0)) {
            errors.push(format!("device did not exit cleanly at the end: {exit:?}"));
        }
    }
    if results.errors > 0 {
        errors.push(format!(
            "{} guest commands failed (last: response {:#x} to command {:#x})",
            results.errors, results.last_error.0, results.last_error.1
        ));
    }
    if stopped_by.is_none() && !guest_failed && guest_wall.is_none() {
        errors.push("the guest driver did not finish".into());
    }
    if !results.message.is_empty() && !guest_failed {
        errors.push(format!("guest driver: {}", results.message));
    }
    for at in &results.mismatch_at {
        log::error!("guest mismatch at window offset {at:#x}");
    }
    // TSC ticks to µs: the guest's TSC runs at a constant rate in wall time; it read it last
    // at its last event.
    let us_per_tick = if results.tsc.1 > results.tsc.0 {
        last_event_at.as_secs_f64() * 1e6 / (results.tsc.1 - results.tsc.0) as f64
    } else {
        0.0
    };
    let lat = |l: crate::guest::TickLatency| Latency {
        p50: l.p50_ticks as f64 * us_per_tick,
        p99: l.p99_ticks as f64 * us_per_tick,
    };
    vq.guest_kicks = results.kicks;
    vq.polls = results.polls;
    vq.notify_exits = pci.notify_exits();
    let counters = hostmem.counters();
    // The driver drew its test pattern on scanout 0: the latest frame there must be it,
    // pixel for pixel.
    let mut display = hostmem.frames().report();
    if !guest_failed && stopped_by.is_none() && guest_wall.is_some() {
        let bad = match hostmem.frames().latest(0) {
            Some(f) => {
                crate::guest::draw_mismatches(opts.seed, f.msg.width, f.msg.height, &f.pixels)
            }
            None => {
                errors.push("no frame of the guest's test pattern reached the VMM".into());
                u64::from(crate::guest::DRAW_WIDTH) * u64::from(crate::guest::DRAW_HEIGHT)
            }
        };
        if bad > 0 && display.frames > 0 {
            errors.push(format!(
                "{bad} pixels of the guest's test pattern on scanout 0 are wrong"
            ));
        }
        display.mismatches = Some(bad);
        let (cursor_bad, why) = cursor_check(opts.seed, &results, display.cursor.as_ref());
        errors.extend(why);
        display.cursor_mismatches = Some(cursor_bad);
        let bad = match hostmem.frames().latest_blob0() {
            Some(f) => crate::guest::blob_scanout_mismatches(
                opts.seed,
                f.msg.width,
                f.msg.height,
                &f.pixels,
            ),
            None => {
                errors.push("no frame of the guest's blob scanout reached the VMM".into());
                u64::from(crate::guest::DRAW_WIDTH) * u64::from(crate::guest::DRAW_HEIGHT)
            }
        };
        if bad > 0 && results.blob_scanouts > 0 {
            errors.push(format!(
                "{bad} pixels of the blob the guest showed on scanout 0 are not the blob's bytes"
            ));
        }
        display.blob_scanout_mismatches = Some(bad);
    }
    let screenshot = match &opts.screenshot {
        Some(path) => match hostmem.frames().screenshot(path) {
            Ok(true) => Some(path.display().to_string()),
            Ok(false) => None,
            Err(e) => {
                errors.push(format!("screenshot {}: {e:#}", path.display()));
                None
            }
        },
        None => None,
    };
    if errors.len() > MAX_ERRORS {
        let more = errors.len() - MAX_ERRORS;
        errors.truncate(MAX_ERRORS);
        errors.push(format!("… and {more} more errors"));
    }
    let report = Report {
        display,
        screenshot,
        mode: opts.mode.name(),
        backend: opts.device.backend.name(),
        transport: opts.transport.name(),
        window_bytes: opts.window,
        seed: opts.seed,
        blobs_mapped: results.blobs_mapped,
        kvm: true,
        guest_verified: results.verified,
        guest_mismatches: results.mismatches,
        device_fills: params.ops_capset != OPS_NONE,
        guest_holes: guest.holes(),
        memslot_changes: hostmem.memslot_changes() - warm_up_slots,
        max_live_placements: hostmem.max_live_seen(),
        map_latency_us: lat(results.map),
        unmap_latency_us: lat(results.unmap),
        guest_driver: GuestDriverReport {
            commands: results.commands,
            errors: results.errors,
            in_flight_max: results.in_flight_max,
            mismatches: results.mismatches,
            capsets: results.capsets,
            device_resets: results.device_resets,
            resets_refused: results.resets_refused,
            vm_exits: guest.exits(),
            num_scanouts: results.num_scanouts,
        },
        virtqueue: vq,
        device_memory_limit: facts.memory_limit.clone(),
        device_oom_kills: exits.iter().filter(|x| x.oom_killed).count() as u32,
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
        stopped_by,
        errors,
        blob_memory: {
            let (_, max, refused) = hostmem.placed_bytes();
            let limit = hostmem.limits().max_placed_bytes;
            BlobMemoryReport {
                vmm_placed_limit: (limit != u64::MAX).then_some(limit),
                vmm_placed_bytes_max: max,
                vmm_refused: refused,
                ..blob_memory
            }
        },
        warnings: WarningsReport {
            vmm: {
                let mut w = hostmem.warnings();
                merge_counts(&mut w, &pci.warnings());
                merge_counts(&mut w, &crate::vhost_frontend::backend_request_warnings());
                w
            },
            device: device_warnings,
        },
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

/// Default device config for the run: the device binary found beside us, jailed under
/// `gpu_device_{backend}.policy`.
pub fn default_device(
    backend: BackendKind,
    policy_dir: Option<PathBuf>,
) -> anyhow::Result<DeviceConfig> {
    let virgl = backend.is_virgl();
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
    backend: BackendKind,
    policy_dir: Option<PathBuf>,
) -> DeviceConfig {
    let dir = policy_dir.unwrap_or_else(crate::policy::default_dir);
    let virgl = backend.is_virgl();
    let mut ro_binds = crate::policy::loader_ro_binds();
    if virgl {
        ro_binds.extend(crate::policy::virgl_ro_binds());
    }
    DeviceConfig {
        program,
        pre_args,
        // virgl: the run proves renderer <-> guest sharing through the test ops (a test
        // knob: only in a build with the cargo feature `fault-injection`).
        extra_args: if virgl && VIRGL_SHARING_CHECKED {
            vec!["--test-ops".into()]
        } else {
            vec![]
        },
        backend,
        jailed: true,
        policy: Some(dir.join(format!("gpu_device_{backend}.policy"))),
        seccomp_log: false,
        ro_binds,
        log_filter: std::env::var("RUST_LOG").ok(),
        start_timeout: crate::device::START_TIMEOUT,
        render_server: None,
        memory_limit: Some(crate::device::DEFAULT_DEVICE_MEMORY),
        device_cpus: vec![],
        service_cpus: vec![],
        idle_poll_max: None,
    }
}
