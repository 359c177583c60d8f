//! `hostmem`: the VMM-side command line.
//!
//! * `hostmem run`: the main job (see `hostmem_vmm::run`).
//! * `hostmem policy check|explain|lint`: seccomp policy tools.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hostmem_base::size::parse_size;
use hostmem_device::backend::BackendKind;
use hostmem_vmm::hostmem::Mode;
use hostmem_vmm::run::{self, Restart, RunOptions};

mod policy_cmd;

#[derive(Debug, Parser)]
#[command(
    name = "hostmem",
    version,
    about = "Sandboxed virtio-gpu hostmem: one memslot, MAP_FIXED blobs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the workload: a KVM guest's virtio-gpu driver maps blobs through the jailed device.
    Run(RunArgs),
    /// Benchmark: fixed vs memslot-per-blob, in-process vs sandboxed, against the MAP_FIXED floor.
    Bench(BenchArgs),
    /// Serve the jailed device as a vhost-user backend on a listening UNIX socket (for
    /// QEMU's vhost-user-test-device-pci, virtio-id 16, 2 queues, config_size 16).
    VhostUser(VhostUserArgs),
    /// Seccomp policy tools.
    #[command(subcommand)]
    Policy(policy_cmd::PolicyCmd),
    /// Run as the device process (what the launcher execs when hostmem-gpu-device is not
    /// installed beside hostmem).
    #[command(hide = true)]
    Device {
        /// The device's own arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, clap::Args)]
struct VhostUserArgs {
    /// Path of the listening socket (a stale socket there is removed).
    #[arg(long)]
    socket: PathBuf,
    /// Renderer backend: shm (always) or virgl (feature `virgl`).
    #[arg(long, value_enum, default_value_t = BackendKind::Shm)]
    backend: BackendKind,
    /// Size of shared memory region 1 (a power of two; K/M/G suffixes allowed).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    shmem_size: u64,
    /// Folder of the seccomp policies (default: the checkout's jail-policies/x86_64).
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    /// Stop after this many device starts (default: restart forever).
    #[arg(long)]
    max_starts: Option<usize>,
    /// The device's memory limit (cgroup v1 memory controller; RLIMIT_DATA/FSIZE where no
    /// memory cgroup can be made); 0 = unlimited.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    device_memory: u64,
    /// virgl: run venus in virglrenderer's render server, this program (as for `run`). Each
    /// device start gets a fresh server and serves one frontend.
    #[arg(long)]
    virgl_render_server: Option<PathBuf>,
    /// An extra read-only bind mount for the jailed device (and render server).
    #[arg(long)]
    ro_bind: Vec<PathBuf>,
    /// Write scanout 0's latest frame here as PNG at exit (SIGTERM/SIGINT too) and on
    /// each SIGUSR1.
    #[arg(long, value_name = "PATH")]
    screenshot: Option<PathBuf>,
    /// How long the device's idle loop may poll before it sleeps, in µs (as the device's
    /// own flag; default: the device's, 200; 0: sleep at once).
    #[arg(long, value_name = "US", value_parser = idle_poll_us())]
    idle_poll_max_us: Option<u64>,
}

/// `--idle-poll-max-us`: the device's range (0 to 1 s).
fn idle_poll_us() -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(0..=hostmem_device::process::IDLE_POLL_LIMIT_US)
}

/// `--ro-bind` folders (canonical) and `--virgl-render-server` (its jail and policy from the
/// device's policy folder) added to `device`.
fn add_binds_and_server(
    device: &mut hostmem_vmm::device::DeviceConfig,
    backend: BackendKind,
    ro_bind: &[PathBuf],
    server: Option<&PathBuf>,
) -> anyhow::Result<()> {
    for dir in ro_bind {
        let dir = std::fs::canonicalize(dir)
            .map_err(|e| anyhow::anyhow!("--ro-bind {}: {e}", dir.display()))?;
        device.ro_binds.push(dir);
    }
    if let Some(server) = server {
        if !backend.is_virgl() {
            anyhow::bail!("--virgl-render-server needs --backend virgl");
        }
        let program = std::fs::canonicalize(server)
            .map_err(|e| anyhow::anyhow!("render server {}: {e}", server.display()))?;
        // Jailed: its policy comes from the device's policy folder.
        let policy = device
            .policy
            .as_ref()
            .and_then(|p| p.parent())
            .map(|dir| dir.join("virgl_render_server.policy"));
        device.render_server = Some(hostmem_vmm::device::RenderServerConfig {
            program,
            ro_binds: hostmem_vmm::policy::render_server_ro_binds(),
            policy,
        });
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// How the VMM reaches the jailed device: virtio-pci (hostmem's transport and mapping
    /// tubes) or vhost-user (the VMM as the device's vhost-user frontend, each SHMEM_MAP
    /// checked and placed in the one-memslot window).
    #[arg(long, value_enum, default_value = "virtio-pci")]
    transport: run::Transport,
    /// Placement mode.
    #[arg(long, value_enum, default_value = "fixed")]
    mode: Mode,
    /// Window size (bytes; K/M/G suffixes allowed).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    window: u64,
    /// Number of blobs.
    #[arg(long, default_value_t = 1000)]
    blobs: u32,
    /// Seed of the generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Most blobs mapped at once.
    #[arg(long, default_value_t = 64)]
    max_live: usize,
    /// Renderer backend: shm (always) or virgl (feature `virgl`).
    #[arg(long, value_enum, default_value_t = BackendKind::Shm)]
    backend: BackendKind,
    /// Restart policy: `never` or `on-failure[:N]`.
    #[arg(long, default_value = "on-failure:3")]
    restart: Restart,
    /// Log seccomp violations (name and args) instead of killing the device.
    #[arg(long)]
    seccomp_log: bool,
    /// Run the device without the jail (for comparison only).
    #[arg(long)]
    no_jail: bool,
    /// virgl: run venus in virglrenderer's render server, this program (needed by a
    /// virglrenderer that builds venus only there, such as Debian's 1.3.0). The VMM starts
    /// it first, in a jail of its own when the device is jailed, and hands the device a
    /// socket to it.
    #[arg(long)]
    virgl_render_server: Option<PathBuf>,
    /// An extra read-only bind mount for the jailed device (and render server), e.g. the
    /// folder of a private glibc that the device program's interpreter lives in.
    #[arg(long)]
    ro_bind: Vec<PathBuf>,
    /// Folder of the seccomp policies (default: the checkout's jail-policies/x86_64).
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    /// The device's memory limit (cgroup v1 memory controller; RLIMIT_DATA/FSIZE where no
    /// memory cgroup can be made); 0 = unlimited.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    device_memory: u64,
    /// CPUs the device process may run on (e.g. `1` or `0-3`; default: any).
    #[arg(long)]
    device_cpus: Option<hostmem_vmm::affinity::CpuList>,
    /// CPUs the VMM's mapping-service thread may run on (default: any).
    #[arg(long)]
    service_cpus: Option<hostmem_vmm::affinity::CpuList>,
    /// How long the device's idle loop may poll before it sleeps, in µs (the device's own
    /// flag, either transport; default: the device's, 200; 0: sleep at once). More suits a
    /// device on a CPU of its own (`--device-cpus`). Old name: `--device-idle-poll-max-us`.
    #[arg(
        long,
        alias = "device-idle-poll-max-us",
        value_name = "US",
        value_parser = idle_poll_us()
    )]
    idle_poll_max_us: Option<u64>,
    /// Test knob (cargo feature `fault-injection`): SIGKILL the device once this many blobs
    /// are mapped.
    #[cfg(feature = "fault-injection")]
    #[arg(long)]
    kill_after: Option<u32>,
    /// Print one JSON object instead of the summary.
    #[arg(long)]
    json: bool,
    /// Write scanout 0's latest frame here as PNG at the end of the run.
    #[arg(long, value_name = "PATH")]
    screenshot: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// Short run (under a minute on 2 cores).
    #[arg(long)]
    quick: bool,
    /// Also find the largest number of simultaneously mapped blobs per mode.
    #[arg(long)]
    limits: bool,
    /// Also measure the window's cost as it grows (256 MiB to 16 GiB, 0 to 10k live).
    #[arg(long)]
    growth: bool,
    /// Commands in flight in the pipelined case.
    #[arg(long, default_value_t = 16)]
    queue_depth: usize,
    /// Seed of blob sizes, offsets and patterns.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Window size (bytes; K/M/G suffixes allowed).
    #[arg(long, value_parser = parse_size)]
    window: Option<u64>,
    /// Rounds per level (each case runs one batch per round).
    #[arg(long)]
    rounds: Option<usize>,
    /// Cycles per batch.
    #[arg(long)]
    batch: Option<usize>,
    /// Levels of background placements, e.g. 0,128,512 (the first gives the headline).
    #[arg(long, value_delimiter = ',')]
    levels: Option<Vec<usize>>,
    /// Cases to run (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    cases: Option<Vec<hostmem_vmm::bench::CaseKind>>,
    /// Folder of the seccomp policies (default: the checkout's jail-policies/x86_64).
    #[arg(long)]
    policy_dir: Option<PathBuf>,
    /// Print the numbers as JSON instead of the table.
    #[arg(long)]
    json: bool,
    /// Write bench.json and bench.svg into this folder.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Where the driver, the devices and the mapping services run: split (the VMM's
    /// driver and mapping services on the first CPU, the devices on the last, polling up
    /// to 1 ms when idle) or none (nothing pinned, the devices' default poll).
    #[arg(long, value_enum, default_value = "split")]
    cpu_layout: hostmem_vmm::bench::CpuLayout,
    /// The layouts to measure in one run, the first as --cpu-layout: `split,none` also runs
    /// fixed-sandboxed and its pipelined case unpinned, in the same rounds (--quick's
    /// default); `split` alone does not.
    #[arg(long, value_enum, value_delimiter = ',')]
    layouts: Option<Vec<hostmem_vmm::bench::CpuLayout>>,
    /// Run the whole bench N times in this process and summarize across the runs (per
    /// target: each run's median and how many runs passed). With --json: one object with
    /// every run and the summary; with --out: each run in `run-<i>/` and repeat.json.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
}

fn main() -> ExitCode {
    let raw: Vec<String> = std::env::args().collect();
    if raw.get(1).map(String::as_str) == Some("device") {
        // Device mode: same start-up as hostmem-gpu-device (no clap, seccomp first).
        hostmem_device::process::init_logging();
        return ExitCode::from(hostmem_device::process::main_with_args(&raw[2..]) as u8);
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    let cli = Cli::parse();
    // The supervisors take SIGINT/SIGTERM as "stop": installed while this is the only thread.
    let stop = || {
        hostmem_vmm::stop::StopSignals::install()
            .map_err(|e| anyhow::anyhow!("blocking SIGINT/SIGTERM: {e}"))
    };
    let res = match cli.cmd {
        Cmd::Run(a) => stop().and_then(|s| cmd_run(a, &s)),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::VhostUser(a) => stop().and_then(|s| cmd_vhost_user(a, &s)),
        Cmd::Policy(p) => policy_cmd::run(p),
        Cmd::Device { .. } => unreachable!("handled before clap"),
    };
    match res {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("hostmem: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn cmd_vhost_user(a: VhostUserArgs, stop: &hostmem_vmm::stop::StopSignals) -> anyhow::Result<i32> {
    use hostmem_vmm::vhost_user::{supervise, vhost_user_device, SuperviseOptions};
    let mut device = vhost_user_device(run::default_device(a.backend, a.policy_dir)?);
    device.memory_limit = Some(a.device_memory);
    device.idle_poll_max = a.idle_poll_max_us.map(std::time::Duration::from_micros);
    add_binds_and_server(
        &mut device,
        a.backend,
        &a.ro_bind,
        a.virgl_render_server.as_ref(),
    )?;
    let opts = SuperviseOptions {
        socket: a.socket.clone(),
        shmem_size: a.shmem_size,
        max_starts: a.max_starts,
        backoff: std::time::Duration::from_millis(200),
        frames: Some(hostmem_vmm::display::Frames::new()),
        screenshot: a.screenshot.clone(),
    };
    let end = supervise(&device, &opts, Some(stop), |n, facts| {
        if n == 1 {
            // The one line a script waits for.
            println!(
                "hostmem vhost-user: ready on {} (device pid {}, jailed {}, seccomp {}, no_new_privs {}, CapEff {}, {} capsets, region 1 of {} bytes, memory limit {} MiB by {})",
                opts.socket.display(),
                facts.pid,
                facts.jailed,
                facts.seccomp,
                facts.no_new_privs,
                facts.cap_eff,
                facts.num_capsets,
                opts.shmem_size,
                facts.memory_limit.bytes >> 20,
                facts.memory_limit.how
            );
        } else {
            log::warn!("vhost-user device restarted (start {n}, pid {})", facts.pid);
        }
    })?;
    let frames = opts.frames.clone().unwrap_or_default();
    let shot = screenshot_at_exit(&frames, a.screenshot.as_deref());
    let d = frames.report();
    println!(
        "hostmem vhost-user: {end}; {} frames ({} refused){shot}",
        d.frames, d.refused
    );
    Ok(0)
}

/// `--screenshot` at exit: what the summary line says of it.
fn screenshot_at_exit(
    frames: &hostmem_vmm::display::Frames,
    path: Option<&std::path::Path>,
) -> String {
    let Some(path) = path else {
        return String::new();
    };
    match frames.screenshot(path) {
        Ok(true) => format!(", screenshot written to {}", path.display()),
        Ok(false) => ", no frame: no screenshot".to_string(),
        Err(e) => format!(", screenshot {} FAILED: {e:#}", path.display()),
    }
}

fn cmd_run(a: RunArgs, stop: &hostmem_vmm::stop::StopSignals) -> anyhow::Result<i32> {
    let mut device = run::default_device(a.backend, a.policy_dir)?;
    device.seccomp_log = a.seccomp_log;
    device.memory_limit = Some(a.device_memory);
    device.device_cpus = a.device_cpus.clone().map(|l| l.0).unwrap_or_default();
    device.service_cpus = a.service_cpus.clone().map(|l| l.0).unwrap_or_default();
    device.idle_poll_max = a.idle_poll_max_us.map(std::time::Duration::from_micros);
    if a.no_jail {
        device.jailed = false;
        device.policy = None;
        eprintln!("hostmem: --no-jail: the device runs WITHOUT namespaces or seccomp");
    }
    add_binds_and_server(
        &mut device,
        a.backend,
        &a.ro_bind,
        a.virgl_render_server.as_ref(),
    )?;
    let opts = RunOptions {
        transport: a.transport,
        mode: a.mode,
        window: a.window,
        blobs: a.blobs,
        seed: a.seed,
        max_live: a.max_live.max(1),
        device,
        restart: a.restart,
        #[cfg(feature = "fault-injection")]
        kill_after: a.kill_after,
        show_progress: !a.json,
        command_timeout: run::COMMAND_TIMEOUT,
        #[cfg(feature = "fault-injection")]
        guest_event_flood: 0,
        screenshot: a.screenshot.clone(),
    };
    let r = run::run_until_stopped(&opts, Some(stop))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "hostmem run: transport {}, mode {}, backend {}, window {} MiB, seed {}",
            r.transport,
            r.mode,
            r.backend,
            r.window_bytes >> 20,
            r.seed
        );
        println!("  blobs mapped          {}", r.blobs_mapped);
        println!(
            "  guest verified        {} ({} mismatches, {} holes)",
            r.guest_verified, r.guest_mismatches, r.guest_holes
        );
        let (g, q) = (&r.guest_driver, &r.virtqueue);
        println!(
            "  guest driver          {} commands over {} ({} errors, up to {} in flight)",
            g.commands, r.transport, g.errors, g.in_flight_max
        );
        println!(
            "  virtqueue             {} chains, {} kicks (ioeventfd), {} interrupts, {} used-ring polls",
            q.chains, q.kicks, q.interrupts, q.polls
        );
        println!(
            "  display               {} frames ({} refused), scanout 0 {}x{}{}",
            r.display.frames,
            r.display.refused,
            r.display.width,
            r.display.height,
            r.screenshot
                .as_ref()
                .map(|p| format!(", screenshot written to {p}"))
                .unwrap_or_default()
        );
        println!("  memslot changes       {}", r.memslot_changes);
        println!("  max live placements   {}", r.max_live_placements);
        println!(
            "  MAP_BLOB   p50 {:8.1} µs   p99 {:8.1} µs",
            r.map_latency_us.p50, r.map_latency_us.p99
        );
        println!(
            "  UNMAP_BLOB p50 {:8.1} µs   p99 {:8.1} µs",
            r.unmap_latency_us.p50, r.unmap_latency_us.p99
        );
        let d = &r.device;
        println!(
            "  device pid {}: jailed {}, seccomp {}, no_new_privs {}, CapEff {}, {} fds",
            d.pid, d.jailed, d.seccomp, d.no_new_privs, d.cap_eff, d.open_fds
        );
        let m = &r.device_memory_limit;
        println!(
            "  device memory limit: {} MiB by {}{}",
            m.bytes >> 20,
            m.how,
            m.fallback_reason
                .as_ref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default()
        );
        for x in &r.device_exits {
            println!("  device exit: {x:?}");
        }
        if !r.seccomp_violations.is_empty() {
            println!(
                "  seccomp violations (log mode): {}",
                r.seccomp_violations.join(", ")
            );
        }
        println!("  {:.1} s, {} errors", r.seconds, r.errors.len());
        for e in &r.errors {
            println!("    {e}");
        }
    }
    let ok = r.guest_mismatches == 0 && r.errors.is_empty() && r.blobs_mapped > 0;
    Ok(if ok { 0 } else { 1 })
}

fn cmd_bench(a: BenchArgs) -> anyhow::Result<i32> {
    use hostmem_vmm::bench;
    let mut device = run::default_device(BackendKind::Shm, a.policy_dir)?;
    if device.log_filter.is_none() {
        device.log_filter = Some("error".into());
    }
    let mut o = if a.quick {
        bench::BenchOptions::quick(device)
    } else {
        bench::BenchOptions::full(device)
    };
    o.limits = a.limits;
    o.growth = a.growth;
    o.cpu_layout = a.cpu_layout;
    if let Some(l) = &a.layouts {
        o.cpu_layout = l.first().copied().unwrap_or(a.cpu_layout);
        o.also_unpinned =
            o.cpu_layout == bench::CpuLayout::Split && l.contains(&bench::CpuLayout::None);
    }
    o.queue_depth = a.queue_depth.max(1);
    o.blobs = o.blobs.max(o.queue_depth);
    o.seed = a.seed;
    o.show_progress = !a.json;
    if let Some(w) = a.window {
        o.window = w;
    }
    if let Some(r) = a.rounds {
        o.rounds = r.max(1);
    }
    if let Some(b) = a.batch {
        o.batch = b.max(1);
    }
    if let Some(l) = a.levels {
        o.levels = l;
    }
    if let Some(c) = a.cases {
        o.cases = c;
    }
    if a.repeat > 1 {
        return bench_repeat(&o, a.repeat as usize, a.json, a.out.as_deref());
    }
    let r = bench::run(&o)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", bench::render(&r));
    }
    if let Some(dir) = &a.out {
        bench::write_out(&r, dir)?;
        if !a.json {
            println!("wrote {0}/bench.json and {0}/bench.svg", dir.display());
        }
    }
    Ok(if r.errors.is_empty() { 0 } else { 1 })
}

/// `hostmem bench --repeat N`: N runs, each printed as it ends (text), then the summary.
fn bench_repeat(
    o: &hostmem_vmm::bench::BenchOptions,
    n: usize,
    json: bool,
    out: Option<&std::path::Path>,
) -> anyhow::Result<i32> {
    use hostmem_vmm::bench;
    let mut runs = Vec::with_capacity(n);
    for i in 0..n {
        let r = bench::run(o)?;
        if !json {
            print!("=== run {}/{n} ===\n{}", i + 1, bench::render(&r));
        }
        runs.push(r);
    }
    let summary = bench::summarize(&runs);
    let failed = summary.runs_with_errors > 0;
    let rep = bench::RepeatReport {
        repeat: n,
        runs,
        summary,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        print!("{}", bench::render_summary(&rep.summary));
    }
    if let Some(dir) = out {
        bench::write_repeat(&rep, dir)?;
        if !json {
            println!("wrote {0}/run-<i>/ and {0}/repeat.json", dir.display());
        }
    }
    Ok(if failed { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("hostmem").chain(args.iter().copied()))
    }

    fn run_args(args: &[&str]) -> RunArgs {
        match parse(&[&["run"], args].concat()).unwrap().cmd {
            Cmd::Run(a) => a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_unknown_backend_is_refused_with_the_names() {
        for cmd in [&["run"][..], &["vhost-user", "--socket", "/tmp/x"][..]] {
            let e = parse(&[cmd, &["--backend", "foo"]].concat()).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::InvalidValue);
            let msg = e.to_string();
            assert!(
                msg.contains("'foo'") && msg.contains("shm") && msg.contains("virgl"),
                "{msg}"
            );
        }
        assert_eq!(run_args(&[]).backend, BackendKind::Shm);
        assert_eq!(
            run_args(&["--backend", "virgl"]).backend,
            BackendKind::Virgl
        );
    }

    #[test]
    fn every_size_flag_takes_suffixes_and_refuses_garbage() {
        let a = run_args(&["--window", "1G", "--device-memory", "512M"]);
        assert_eq!((a.window, a.device_memory), (1 << 30, 512 << 20));
        let a = run_args(&["--window", "268435456", "--device-memory", "0"]);
        assert_eq!((a.window, a.device_memory), (256 << 20, 0));
        let Cmd::VhostUser(v) = parse(&["vhost-user", "--socket", "/s", "--shmem-size", "64K"])
            .unwrap()
            .cmd
        else {
            panic!()
        };
        assert_eq!((v.shmem_size, v.device_memory), (64 << 10, 1 << 30));
        let Cmd::Bench(b) = parse(&["bench", "--window", "2g"]).unwrap().cmd else {
            panic!()
        };
        assert_eq!(b.window, Some(2 << 30));
        for bad in [
            &["run", "--window", "1X"][..],
            &["run", "--device-memory=-1"][..],
            &["run", "--window", "99999999999G"][..],
            &["vhost-user", "--socket", "/s", "--shmem-size", "1.5M"][..],
            &["bench", "--window", ""][..],
        ] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.kind(), clap::error::ErrorKind::ValueValidation, "{bad:?}");
        }
    }

    #[test]
    fn the_idle_poll_has_the_devices_name_and_keeps_the_old_one() {
        assert_eq!(
            run_args(&["--idle-poll-max-us", "1000"]).idle_poll_max_us,
            Some(1000)
        );
        assert_eq!(
            run_args(&["--device-idle-poll-max-us", "7"]).idle_poll_max_us,
            Some(7)
        );
        assert_eq!(run_args(&[]).idle_poll_max_us, None);
        assert!(parse(&["run", "--idle-poll-max-us", "1000001"]).is_err());
        let Cmd::VhostUser(v) = parse(&["vhost-user", "--socket", "/s", "--idle-poll-max-us", "0"])
            .unwrap()
            .cmd
        else {
            panic!()
        };
        assert_eq!(v.idle_poll_max_us, Some(0));
    }
}
