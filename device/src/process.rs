//! The device process: what `hostmem-gpu-device` runs after the launcher exec'd it.
//!
//! Order matters: the launcher installed the seccomp filter right before the exec (the
//! loader and the runtime's start-up already run filtered); the device's first act, before
//! any input is read, is its SIGSYS reporter (`child_install_sigsys_reporter`), in both
//! modes (native and `--vhost-user`). Then the handshake on the mapping tube, the hostmem memfd (mapped as
//! the mirror), the backend, `Ready { backend, num_capsets }`, and [`serve`]: the poll loop
//! over the transport tube (fd 3: guest memory, queue setup, reset, stats) and the enabled
//! queues' kick eventfds ([`crate::virtio`]) until the VMM closes the transport tube.

use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use hostmem_base::shm::SharedMemory;
use hostmem_base::window::Window;

use hostmem_ipc::protocol::{handshake, DeviceMsg, Role, TransportMsg, TransportReply, VmmMsg};
use hostmem_ipc::{Error as TubeError, Message, Tube};

use nix::poll::PollTimeout;

use hostmem_base::size::parse_size;

use crate::backend::{Backend, BackendKind};
use crate::display::DisplayConfig;
use crate::gpu::{Gpu, Placer};
use crate::mirror::MirrorPlacer;
use crate::virtio::{guest_memory, VirtioGpu};
use crate::{Error, Result};

/// Transport messages the device dropped or refused (the guest's queue set-ups reach it
/// this way): logged the 1st, 2nd, 4th, … time of each kind, all counted in the stats.
pub static TRANSPORT_WARNINGS: hostmem_base::log_limit::LogLimiter =
    hostmem_base::log_limit::LogLimiter::new("hostmem_device::process");

/// Exit code when the VMM broke the protocol or the mapping tube failed.
pub const EXIT_TUBE: i32 = 3;
/// Exit code for bad arguments or a failed start.
pub const EXIT_START: i32 = 2;

/// Parsed command line (`hostmem-gpu-device --help`).
#[derive(Debug, Clone, PartialEq, Eq, clap::Parser)]
#[command(
    name = "hostmem-gpu-device",
    about = "The hostmem virtio-gpu device process. Started by the VMM's launcher in the jail: \
             with --transport-fd/--mapping-fd (hostmem's own transport) or --vhost-user \
             --socket-fd (a vhost-user backend on an inherited listening socket)."
)]
pub struct Args {
    /// Fd of the transport tube (the virtio transport's messages).
    #[arg(long, value_name = "FD", required_unless_present = "vhost_user")]
    pub transport_fd: Option<i32>,
    /// Fd of the mapping tube.
    #[arg(long, value_name = "FD", required_unless_present = "vhost_user")]
    pub mapping_fd: Option<i32>,
    /// Fd holding the compiled seccomp program, if any.
    #[arg(long, value_name = "FD")]
    pub seccomp_fd: Option<i32>,
    /// Renderer backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Shm)]
    pub backend: BackendKind,
    /// Bytes all live blobs may hold together (the VMM passes the device's memory limit):
    /// a CREATE_BLOB past it is refused with ERR_OUT_OF_MEMORY. K/M/G suffixes allowed.
    #[arg(long, value_name = "BYTES", value_parser = parse_size)]
    pub blob_budget: Option<u64>,
    /// How long the idle loop may poll its fds before it sleeps, in microseconds: the
    /// window adapts between 100 µs and this ([`IdlePoll`]); 0 sleeps at once, at most 1 s.
    #[arg(
        long,
        value_name = "US",
        default_value_t = IDLE_POLL_MAX.as_micros() as u64,
        value_parser = clap::value_parser!(u64).range(0..=IDLE_POLL_LIMIT_US)
    )]
    pub idle_poll_max_us: u64,
    /// The test knobs: flags only with the cargo feature `fault-injection` (the tests'
    /// builds); a user's build has none of them and they keep their defaults (off).
    #[cfg_attr(feature = "fault-injection", command(flatten))]
    #[cfg_attr(not(feature = "fault-injection"), arg(skip))]
    pub knobs: TestKnobs,
    /// The scanouts: `WIDTHxHEIGHT`, or several separated by commas (at most 16; each side
    /// 16 to 4095). Both transports report them all: natively the count goes in `Ready`
    /// (the VMM's device configuration reads it), over vhost-user in `GET_CONFIG`.
    #[arg(
        long,
        value_name = "WxH[,WxH...]",
        default_value = "1024x768",
        value_parser = clap::value_parser!(DisplayConfig)
    )]
    pub display: DisplayConfig,
    /// Guest-physical address of the hostmem window (the VMM's BAR): no 2D resource's
    /// backing may lie in `GPA .. GPA + window size` (it is not guest RAM to the device
    /// either; this makes the refusal explicit).
    #[arg(long, value_name = "GPA")]
    pub window_gpa: Option<u64>,
    /// virgl: the inherited fd of a socket to a running render server (the VMM starts the
    /// server).
    #[arg(long = "virgl-server-fd", value_name = "FD")]
    pub render_server_fd: Option<i32>,
    /// Serve as a vhost-user backend on the listening socket `--socket-fd` (the device
    /// never opens a path).
    #[arg(long, requires = "socket_fd", conflicts_with_all = ["transport_fd", "mapping_fd"])]
    pub vhost_user: bool,
    /// vhost-user: the inherited fd of the listening UNIX stream socket.
    #[arg(long, value_name = "FD", requires = "vhost_user")]
    pub socket_fd: Option<i32>,
    /// vhost-user: size of shared memory region 1 in bytes (a power of two; K/M/G suffixes
    /// allowed).
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = crate::vhost_user::DEFAULT_SHMEM_SIZE,
        value_parser = parse_size
    )]
    pub shmem_size: u64,
    /// vhost-user: fd of a tube to the supervisor: the Hello handshake, then wait for its go
    /// (a second Hello, once it checked the jail from /proc), then Ready.
    #[arg(long, value_name = "FD", requires = "vhost_user")]
    pub control_fd: Option<i32>,
}

/// The device's test knobs ([`Args::knobs`]): command-line flags only in a build with the
/// cargo feature `fault-injection` (docs/decisions/059-test-knobs-behind-features.md);
/// without it every knob is off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[cfg_attr(feature = "fault-injection", derive(clap::Args))]
pub struct TestKnobs {
    /// Test knob: allow the mirror only this many VMAs above the count at start (8 of them
    /// kept in reserve), to exercise the headroom refusal.
    #[cfg_attr(feature = "fault-injection", arg(long, value_name = "N"))]
    pub vma_limit: Option<usize>,
    /// Test knob: the Nth mirror placement fails after its Map event was sent (as if its
    /// MAP_FIXED returned ENOMEM), to exercise the take-back ([`crate::mirror::MirrorFaults`]).
    #[cfg_attr(feature = "fault-injection", arg(long, value_name = "N"))]
    pub test_fail_mirror_place: Option<u64>,
    /// Test knob: the Nth mirror restore fails after its Unmap event was sent (the device
    /// then exits; [`crate::mirror::MirrorFaults`]).
    #[cfg_attr(feature = "fault-injection", arg(long, value_name = "N"))]
    pub test_fail_mirror_restore: Option<u64>,
    /// Test knob: the backend's hostmem-private test ops (virgl: see `backend::virgl`).
    #[cfg_attr(feature = "fault-injection", arg(long))]
    pub test_ops: bool,
}

impl Args {
    /// Parses the arguments after the program name; the error is clap's message (also for
    /// `--help`: see [`main_with_args`]).
    pub fn parse(args: &[String]) -> std::result::Result<Args, String> {
        Self::parse_clap(args).map_err(|e| e.to_string())
    }

    fn parse_clap(args: &[String]) -> std::result::Result<Args, clap::Error> {
        use clap::Parser;
        Args::try_parse_from(
            std::iter::once("hostmem-gpu-device".to_string()).chain(args.iter().cloned()),
        )
    }
}

/// Creates the backend.
pub fn make_backend(kind: BackendKind) -> Result<Box<dyn Backend>> {
    make_backend_with(kind, false, None)
}

/// Creates the backend; `test_ops` turns on its hostmem-private test ops (virgl),
/// `render_server` (a socket to a running render server) runs virgl's venus there.
pub fn make_backend_with(
    kind: BackendKind,
    test_ops: bool,
    render_server: Option<std::os::fd::OwnedFd>,
) -> Result<Box<dyn Backend>> {
    if render_server.is_some() && kind != BackendKind::Virgl {
        return Err(Error::Backend(format!(
            "a render server is for the virgl backend, not {kind}"
        )));
    }
    match kind {
        BackendKind::Shm => Ok(Box::new(crate::backend::shm::ShmBackend::new())),
        #[cfg(feature = "virgl")]
        BackendKind::Virgl => {
            let opts = crate::backend::virgl::VirglOptions {
                test_ops,
                render_server,
            };
            crate::backend::virgl::VirglBackend::with_options(opts)
                .map(|b| Box::new(b) as Box<dyn Backend>)
                .map_err(|e| Error::Backend(format!("virgl: {e}")))
        }
        #[cfg(not(feature = "virgl"))]
        BackendKind::Virgl => {
            let _ = test_ops;
            Err(Error::Backend(
                "backend virgl is not in this build (cargo feature `virgl`; this build has: shm)"
                    .into(),
            ))
        }
    }
}

/// Logging to stderr for the device process: `RUST_LOG` (default `info`), no colours (so no
/// terminal ioctl is ever needed under seccomp).
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .write_style(env_logger::WriteStyle::Never)
        .init();
}

/// The device's main: returns the process exit code.
pub fn main_with_args(args: &[String]) -> i32 {
    let args = match Args::parse_clap(args) {
        Ok(a) => a,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                // --help: clap prints to stdout.
                let _ = e.print();
                return 0;
            }
            log::error!("hostmem-gpu-device: {e}");
            return EXIT_START;
        }
    };
    // The launcher installed the seccomp filter before the exec (it covers the loader and
    // the runtime's start-up). First act: the SIGSYS reporter, if the launcher asked for it
    // (a program-installed filter, `--seccomp-fd`, is still honoured).
    let installed = match args.seccomp_fd {
        Some(fd) => hostmem_jail::launch::child_install_seccomp(fd),
        None => hostmem_jail::launch::child_install_sigsys_reporter(),
    };
    if let Err(e) = installed {
        log::error!("seccomp set-up failed: {e}");
        return EXIT_START;
    }
    let result = if args.vhost_user {
        run_vhost_user(&args)
    } else {
        run(&args)
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            log::error!("device: {e}");
            EXIT_TUBE
        }
    }
}

/// The end of start-up, before the first input: the device's code is loaded (its backend's
/// libraries too), so it stacks the run-time filter (`hostmem_jail::runtime`: no new
/// executable pages, no exec) on all its threads. The VMM checks it after `Ready`.
pub fn end_start_up() -> Result<()> {
    hostmem_jail::runtime::forbid_new_code()?;
    Ok(())
}

fn run(args: &Args) -> Result<()> {
    let take = |fd| hostmem_base::fd::take_inherited(fd).map_err(Error::Base);
    let need = |fd: Option<i32>, flag: &str| {
        fd.ok_or_else(|| Error::Protocol(format!("{flag} is required")))
    };
    let transport = Tube::from_fd(take(need(args.transport_fd, "--transport-fd")?)?)?;
    let mapping = Tube::from_fd(take(need(args.mapping_fd, "--mapping-fd")?)?)?;
    handshake::<DeviceMsg, VmmMsg>(&mapping, Role::Device, Duration::from_secs(20))?;
    mapping.set_recv_timeout(Some(Duration::from_secs(20)))?;
    let (msg, mut fds) = mapping.recv::<VmmMsg>()?;
    let VmmMsg::Hostmem { size } = msg else {
        return Err(Error::Protocol(format!("expected Hostmem, got {msg:?}")));
    };
    let memfd = fds
        .pop()
        .ok_or_else(|| Error::Protocol("Hostmem without fd".into()))?;
    // The VMM zeroes the background it shares with us after its own restores; our policy
    // has no fallocate.
    let mirror = Window::mirror_of(SharedMemory::from_fd(memfd, size)?)?;
    if let Some(limit) = args.knobs.vma_limit {
        let now = hostmem_base::procfs::vma_count()?;
        log::warn!("test knob: mirror VMA limit {now} + {limit} (reserve 8)");
        mirror.set_vma_limit(now + limit, 8);
    }
    let server = match args.render_server_fd {
        Some(fd) => Some(hostmem_base::fd::take_inherited(fd)?),
        None => None,
    };
    let backend = make_backend_with(args.backend, args.knobs.test_ops, server)?;
    // All our code is loaded (the backend's libraries too): from here on nothing new may
    // run (W^X for the whole run; the VMM checks Seccomp_filters after Ready).
    end_start_up()?;
    let backend_name = backend.name().to_string();
    let num_capsets = u32::try_from(backend.capsets().len()).unwrap_or(u32::MAX);
    mapping.send(
        &DeviceMsg::Ready {
            backend: backend_name.clone(),
            num_capsets,
            num_scanouts: args.display.num_scanouts(),
        },
        &[],
    )?;
    log::info!(
        "device ready: backend {backend_name} ({num_capsets} capsets), window {size:#x} bytes"
    );
    // Frames go to the VMM on the mapping tube too (a duplicate: F_DUPFD_CLOEXEC), as
    // `DeviceMsg::Frame`, never waited for (`TubeSink`).
    let frames =
        Tube::from_fd(mapping.as_fd().try_clone_to_owned().map_err(|e| {
            Error::Protocol(format!("duplicating the mapping tube for frames: {e}"))
        })?)?;
    let placer = MirrorPlacer::new(mirror, mapping);
    #[cfg(feature = "fault-injection")]
    let placer = {
        let mut placer = placer;
        placer.set_test_faults(crate::mirror::MirrorFaults {
            fail_place: args.knobs.test_fail_mirror_place,
            fail_restore: args.knobs.test_fail_mirror_restore,
        });
        placer
    };
    let mut gpu = Gpu::new(backend, placer);
    gpu.set_blob_budget(args.blob_budget);
    gpu.set_display(args.display.clone());
    gpu.set_frame_sink(Box::new(crate::display::TubeSink::new(
        std::sync::Arc::new(frames),
    )));
    if let Some(gpa) = args.window_gpa {
        gpu.set_backing_exclusions(vec![(gpa, size)]);
    }
    let mut dev = VirtioGpu::new(gpu);
    let poll = IdlePoll::new(Duration::from_micros(args.idle_poll_max_us));
    let end = serve(&transport, &mut dev, poll);
    // What waits for room in the tube (the last cursor, a frame) still goes out.
    dev.gpu_mut()
        .display_mut()
        .flush_sink(Duration::from_millis(500));
    end
}

/// vhost-user mode: the supervisor handshake (if `--control-fd`), then
/// [`crate::vhost_user::serve_listener`] on the inherited listening socket.
fn run_vhost_user(args: &Args) -> Result<()> {
    use crate::vhost_user::Options;
    let size = args.shmem_size;
    if size == 0 || !size.is_power_of_two() || !hostmem_base::mmap::is_page_aligned(size) {
        return Err(Error::Protocol(format!(
            "--shmem-size {size:#x}: a power of two of at least a page"
        )));
    }
    let fd = args
        .socket_fd
        .ok_or_else(|| Error::Protocol("--socket-fd is required".into()))?;
    let listener = std::os::unix::net::UnixListener::from(hostmem_base::fd::take_inherited(fd)?);
    let server = match args.render_server_fd {
        Some(fd) => Some(hostmem_base::fd::take_inherited(fd)?),
        None => None,
    };
    // With a render server the backend made here (on its socket) serves the one frontend
    // this device takes: the library owns the socket from init to cleanup, so a second
    // frontend needs a fresh device and server (the supervisor restarts it).
    let with_server = server.is_some();
    let opts = Options {
        backend: args.backend,
        test_ops: args.knobs.test_ops,
        shmem_size: size,
        max_connections: with_server.then_some(1),
        ack_timeout: crate::vhost_user::ACK_TIMEOUT,
        blob_budget: args.blob_budget,
        display: args.display.clone(),
        frames: None,
        idle_poll_max: Duration::from_micros(args.idle_poll_max_us),
    };
    // Fail before the supervisor hears Ready if the backend cannot start.
    let probe = make_backend_with(args.backend, args.knobs.test_ops, server)?;
    // As in `run`: no new code once the backend (and its libraries) exist.
    end_start_up()?;
    let num_capsets = u32::try_from(probe.capsets().len()).unwrap_or(u32::MAX);
    let backend_name = probe.name().to_string();
    let first = if with_server {
        Some(probe)
    } else {
        drop(probe);
        None
    };
    let mut frames = None;
    if let Some(cfd) = args.control_fd {
        let control = Tube::from_fd(hostmem_base::fd::take_inherited(cfd)?)?;
        handshake::<DeviceMsg, VmmMsg>(&control, Role::Device, Duration::from_secs(20))?;
        control.set_recv_timeout(Some(Duration::from_secs(20)))?;
        // The go: a second Hello, sent once the supervisor checked our jail from /proc.
        let (msg, _) = control.recv::<VmmMsg>()?;
        if !matches!(msg, VmmMsg::Hello(_)) {
            return Err(Error::Protocol(format!(
                "expected the go (Hello), got {msg:?}"
            )));
        }
        control.send(
            &DeviceMsg::Ready {
                backend: backend_name.clone(),
                num_capsets,
                num_scanouts: args.display.num_scanouts(),
            },
            &[],
        )?;
        // The tube stays open (its EOF is the supervisor's end); frames and cursor
        // updates go to the supervisor on it (`TubeSink`), nothing else is said on it.
        frames = Some(std::sync::Arc::new(control));
    }
    log::info!(
        "vhost-user backend ready: backend {backend_name} ({num_capsets} capsets), region 1 of {size:#x} bytes"
    );
    let opts = Options { frames, ..opts };
    crate::vhost_user::serve_listener_with(&listener, &opts, first)
}

/// Placements in flight at most before the device waits for the oldest verdict.
pub const MAX_IN_FLIGHT: usize = 32;

/// How long the loop looks for a verdict (and for kicks) without blocking while
/// placements are in flight and nothing else is to do, before it blocks on the oldest
/// verdict ([`hostmem_ipc::REPLY_SPIN`], as the tube's own receive would spin). A pipelined
/// batch's verdicts come tens of microseconds apart, and a chain that comes meanwhile is
/// taken at once instead of after the verdict the loop waited for.
pub const VERDICT_POLL: Duration = hostmem_ipc::REPLY_SPIN;

/// Where the idle loop's polling window starts and what it shrinks back to ([`IdlePoll`]):
/// after its last work the loop keeps polling its fds (kick eventfds, transport tube)
/// without sleeping this long at least, like QEMU's `poll-max-ns`: a wake-up from sleep
/// costs more than the next command usually takes to come (decisions 043, 044).
pub const IDLE_SPIN: Duration = Duration::from_micros(100);

/// How far the polling window may grow by default (`--idle-poll-max-us`): KVM's default
/// `halt_poll_ns` on x86. A device with a CPU of its own can afford more (`hostmem bench
/// --cpu-layout split` gives it 1 ms).
pub const IDLE_POLL_MAX: Duration = Duration::from_micros(200);

/// The largest idle-poll maximum an operator may set, in µs (1 s): a poll that never
/// sleeps is not a setting.
pub const IDLE_POLL_LIMIT_US: u64 = 1_000_000;

/// The idle loop's polling window, adapted as KVM adapts a vCPU's halt polling: a sleep
/// that ended before `max` (work came soon after the window closed) doubles the window, up
/// to `max`; a longer one halves it, down to [`IDLE_SPIN`] (or `max`, if that is less). A
/// burst of commands with short pauses (a guest that maps, reads, unmaps) is then served
/// without a wake-up from sleep per burst, and an idle device soon sleeps at once again.
/// `max` zero: never poll.
#[derive(Debug, Clone)]
pub struct IdlePoll {
    window: Duration,
    max: Duration,
    asleep_since: Option<Instant>,
}

impl IdlePoll {
    /// A window of [`IDLE_SPIN`] (at most `max`) that may grow to `max`.
    pub fn new(max: Duration) -> Self {
        IdlePoll {
            window: IDLE_SPIN.min(max),
            max,
            asleep_since: None,
        }
    }

    /// How long to poll after the last work.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The loop goes to sleep at `now` (its window ran out).
    pub fn sleeping(&mut self, now: Instant) {
        self.asleep_since = Some(now);
    }

    /// The loop woke at `now`: adapt the window to how long it slept.
    pub fn woke(&mut self, now: Instant) {
        let Some(since) = self.asleep_since.take() else {
            return;
        };
        let floor = IDLE_SPIN.min(self.max);
        self.window = if now.saturating_duration_since(since) < self.max {
            self.window.saturating_mul(2).max(floor).min(self.max)
        } else {
            (self.window / 2).max(floor)
        };
    }
}

/// The device's loop: poll(2) on the transport tube and every enabled queue's kick
/// eventfd. Kicks serve their queue; transport messages are answered in order
/// ([`handle_transport`]). While MAP/UNMAP placements are in flight the poll does not
/// sleep: when nothing new came, the oldest verdict is settled (as the control-queue loop
/// did), and at [`MAX_IN_FLIGHT`] the device settles before it takes more. When idle it
/// polls without sleeping for `poll`'s window first (yielding the CPU between polls;
/// [`IdlePoll`]). Returns
/// when the transport tube closes (EOF: exit 0) or the VMM asked for shutdown; an error
/// when the mapping tube broke.
pub fn serve(
    transport: &Tube,
    dev: &mut VirtioGpu<MirrorPlacer>,
    mut poll: IdlePoll,
) -> Result<()> {
    let mut idle_since: Option<Instant> = None;
    // Since when the loop has been looking for a verdict (placements in flight, nothing
    // else to do) without blocking.
    let mut verdict_since: Option<Instant> = None;
    loop {
        if dev.in_flight() >= MAX_IN_FLIGHT {
            dev.finish_one();
            dev.gpu_mut().placer_mut().note_used();
            if stop_if_asked(dev.gpu())? {
                return Ok(());
            }
            continue;
        }
        let working = dev.in_flight() > 0 || dev.busy();
        let spinning = !working && idle_since.is_some_and(|t| t.elapsed() < poll.window());
        let sink_waits = dev.gpu().display().sink_pending();
        let timeout = if working || spinning {
            PollTimeout::ZERO
        } else if sink_waits {
            // A frame waits for room in the tube: come back for it soon.
            PollTimeout::from(1u8)
        } else {
            poll.sleeping(Instant::now());
            PollTimeout::NONE
        };
        let waited = dev.wait(transport.as_fd(), timeout);
        if timeout == PollTimeout::NONE {
            poll.woke(Instant::now());
        }
        let (transport_ready, kicked) = match waited {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(e) => return Err(Error::Poll(e)),
        };
        if !kicked.is_empty() {
            dev.gpu_mut().placer_mut().note_woke();
        }
        if sink_waits {
            dev.gpu_mut().display_mut().retry_sink();
        }
        dev.poll_fences();
        if dev.busy() {
            dev.process_busy();
        } else if !transport_ready && kicked.is_empty() {
            if working {
                // Nothing new while placements are in flight: settle the verdicts that
                // came (all of them, in order). None yet: look again, at the kicks too,
                // for up to VERDICT_POLL before blocking on the oldest one, so chains
                // that come meanwhile are taken at once and not after the verdict.
                let since = *verdict_since.get_or_insert_with(Instant::now);
                if dev.gpu_mut().placer_mut().next_verdict_ready()
                    || since.elapsed() >= VERDICT_POLL
                {
                    verdict_since = None;
                    dev.finish_ready();
                } else {
                    std::thread::yield_now();
                    continue;
                }
            } else if spinning {
                std::thread::yield_now();
                continue;
            }
        }
        if !kicked.is_empty() || transport_ready || !working {
            verdict_since = None;
        }
        for index in kicked {
            dev.kick(index);
        }
        dev.gpu_mut().placer_mut().note_used();
        if transport_ready {
            match transport.try_recv_bytes() {
                Ok(Some((bytes, fds))) => {
                    #[cfg(feature = "trace")]
                    let reply = match trace_request(dev, &bytes) {
                        Some(r) => Some(r),
                        None => handle_transport(dev, &bytes, fds),
                    };
                    #[cfg(not(feature = "trace"))]
                    let reply = handle_transport(dev, &bytes, fds);
                    if let Some(reply) = reply {
                        match transport.send(&reply, &[]) {
                            Ok(()) => {}
                            Err(TubeError::Hangup) => {
                                log::info!("transport tube closed: exiting");
                                return Ok(());
                            }
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Ok(None) => {}
                Err(TubeError::Hangup) => {
                    log::info!("transport tube closed: exiting");
                    return Ok(());
                }
                Err(e) => {
                    TRANSPORT_WARNINGS.warn(
                        "bad transport message",
                        format_args!("transport tube: dropped a bad message: {e}"),
                    );
                }
            }
        }
        if stop_if_asked(dev.gpu())? {
            return Ok(());
        }
        // Work was done (or a message came): spin again before the next sleep.
        idle_since = Some(Instant::now());
    }
}

/// Trace records per [`TransportReply::Trace`]: each is ~300 bytes of JSON, and a tube
/// message holds 64 KiB.
#[cfg(feature = "trace")]
pub const TRACE_PER_MESSAGE: usize = 128;

/// The trace messages ([`TransportMsg::Trace`], [`TransportMsg::TraceTake`]), which need
/// the mirror placer; `None` for any other message. Only with the cargo feature `trace`.
#[cfg(feature = "trace")]
fn trace_request(dev: &mut VirtioGpu<MirrorPlacer>, bytes: &[u8]) -> Option<TransportReply> {
    match serde_json::from_slice::<TransportMsg>(bytes).ok()? {
        TransportMsg::Trace { seq, on } => {
            dev.gpu_mut().placer_mut().set_trace(on);
            log::info!("trace {}", if on { "on" } else { "off" });
            Some(TransportReply::Done { seq, error: None })
        }
        TransportMsg::TraceTake { seq } => Some(TransportReply::Trace {
            seq,
            records: dev.gpu_mut().placer_mut().take_trace(TRACE_PER_MESSAGE),
        }),
        _ => None,
    }
}

/// Handles one transport message (its JSON `bytes` and the fds that came with it) and
/// returns the reply: `Done` (with the reason when refused) or `Stats`, with the message's
/// `seq`. `None` for bytes that are no transport message (logged; there is no seq to
/// answer).
///
/// * `GuestMemory`: mapped with [`guest_memory`] and taken with
///   [`VirtioGpu::set_memory`] (refused while a queue is enabled).
/// * `QueueEnable`: [`VirtioGpu::enable_queue`] with its kick and call eventfds.
/// * `Reset`: [`VirtioGpu::reset`]; the reply goes out only after every placement was
///   undone through the placer, so the VMM has heard every `Unmap` first.
/// * `Stats`: the counters.
pub fn handle_transport<P: Placer>(
    dev: &mut VirtioGpu<P>,
    bytes: &[u8],
    fds: Vec<OwnedFd>,
) -> Option<TransportReply> {
    let msg: TransportMsg = match serde_json::from_slice(bytes) {
        Ok(m) => m,
        Err(e) => {
            TRANSPORT_WARNINGS.warn(
                "bad transport message",
                format_args!("transport: not a message ({} bytes): {e}", bytes.len()),
            );
            return None;
        }
    };
    let seq = match &msg {
        TransportMsg::GuestMemory { seq, .. }
        | TransportMsg::QueueEnable { seq, .. }
        | TransportMsg::Reset { seq }
        | TransportMsg::Stats { seq } => *seq,
        #[cfg(feature = "trace")]
        TransportMsg::Trace { seq, .. } | TransportMsg::TraceTake { seq } => *seq,
    };
    let done = |r: Result<()>| {
        let error = r.err().map(|e| {
            TRANSPORT_WARNINGS.warn(
                "transport message refused",
                format_args!("transport message {seq} refused: {e}"),
            );
            e.to_string()
        });
        Some(TransportReply::Done { seq, error })
    };
    if fds.len() != msg.fd_count() {
        return done(Err(Error::Protocol(format!(
            "expected {} fds, got {}",
            msg.fd_count(),
            fds.len()
        ))));
    }
    match msg {
        TransportMsg::GuestMemory { regions, .. } => {
            let r = guest_memory(&regions, fds).and_then(|m| dev.set_memory(m));
            if r.is_ok() {
                log::info!("guest memory: {} regions", regions.len());
            }
            done(r)
        }
        TransportMsg::QueueEnable { queue, .. } => {
            let mut it = fds.into_iter();
            match (it.next(), it.next()) {
                (Some(kick), Some(call)) => done(dev.enable_queue(&queue, kick, call)),
                _ => done(Err(Error::Protocol("QueueEnable without 2 fds".into()))),
            }
        }
        TransportMsg::Reset { .. } => {
            dev.reset();
            done(Ok(()))
        }
        TransportMsg::Stats { .. } => Some(TransportReply::Stats {
            seq,
            stats: dev.stats(),
        }),
        // Only the device loop over the mirror placer traces ([`serve`]).
        #[cfg(feature = "trace")]
        TransportMsg::Trace { .. } | TransportMsg::TraceTake { .. } => done(Err(Error::Protocol(
            "this device loop does not trace placements".into(),
        ))),
    }
}

/// `true` when the VMM asked for shutdown; an error when the mapping tube broke.
fn stop_if_asked(gpu: &Gpu<MirrorPlacer>) -> Result<bool> {
    let placer = gpu.placer();
    if placer.shutdown_requested() {
        log::info!("VMM asked for shutdown");
        return Ok(true);
    }
    if let Some(why) = placer.broken() {
        return Err(Error::Protocol(format!("mapping tube: {why}")));
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> std::result::Result<Args, String> {
        Args::parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    /// Sleeps for `slept` and wakes.
    fn nap(p: &mut IdlePoll, at: Instant, slept: Duration) {
        p.sleeping(at);
        p.woke(at + slept);
    }

    #[test]
    fn idle_poll_grows_on_short_sleeps_and_shrinks_on_long_ones() {
        let us = Duration::from_micros;
        let t = Instant::now();
        let mut p = IdlePoll::new(us(1000));
        assert_eq!(p.window(), IDLE_SPIN);
        // Work came 300 µs into a sleep: polling longer would have caught it.
        nap(&mut p, t, us(300));
        assert_eq!(p.window(), us(200));
        for _ in 0..5 {
            nap(&mut p, t, us(300));
        }
        assert_eq!(p.window(), us(1000), "capped at max");
        // A sleep longer than max: the device is idle, poll less.
        nap(&mut p, t, us(5000));
        assert_eq!(p.window(), us(500));
        for _ in 0..10 {
            nap(&mut p, t, us(5000));
        }
        assert_eq!(p.window(), IDLE_SPIN, "never below the start");
        // A wake without a sleep before it changes nothing.
        p.woke(t);
        assert_eq!(p.window(), IDLE_SPIN);
    }

    #[test]
    fn idle_poll_of_zero_never_polls_and_a_small_max_caps_the_start() {
        let us = Duration::from_micros;
        let t = Instant::now();
        let mut p = IdlePoll::new(Duration::ZERO);
        nap(&mut p, t, us(1));
        assert_eq!(p.window(), Duration::ZERO);
        let mut p = IdlePoll::new(us(40));
        assert_eq!(p.window(), us(40));
        nap(&mut p, t, us(10));
        assert_eq!(p.window(), us(40));
        nap(&mut p, t, us(100));
        assert_eq!(p.window(), us(40));
    }

    #[test]
    fn idle_poll_max_defaults_to_kvm_halt_polling_and_can_be_set() {
        let with = |max: Option<&str>| {
            let mut a = vec!["--transport-fd", "3", "--mapping-fd", "4"];
            a.extend(max.iter().flat_map(|m| ["--idle-poll-max-us", m]));
            parse(&a)
        };
        assert_eq!(with(None).unwrap().idle_poll_max_us, 200);
        assert_eq!(with(Some("1000")).unwrap().idle_poll_max_us, 1000);
        let e = with(Some("2000000")).unwrap_err();
        assert!(e.contains("idle-poll-max-us"), "{e}");
    }

    #[test]
    fn display_defaults_to_one_1024x768_scanout_and_can_be_set() {
        let with = |d: Option<&str>| {
            let mut a = vec!["--vhost-user", "--socket-fd", "3"];
            a.extend(d.iter().flat_map(|d| ["--display", d]));
            parse(&a)
        };
        assert_eq!(with(None).unwrap().display.modes(), &[(1024, 768)]);
        let two = with(Some("1920x1080,640x480")).unwrap();
        assert_eq!(two.display.num_scanouts(), 2);
        for bad in ["0x0", "1024", "99999x10", "a,b"] {
            let e = with(Some(bad)).unwrap_err();
            assert!(e.contains("display"), "{bad}: {e}");
        }
        let a = parse(&[
            "--transport-fd",
            "3",
            "--mapping-fd",
            "4",
            "--window-gpa",
            "4294967296",
        ]);
        assert_eq!(a.unwrap().window_gpa, Some(1 << 32));
    }

    #[test]
    fn args_name_the_render_server_socket() {
        let a = parse(&[
            "--transport-fd",
            "3",
            "--mapping-fd",
            "4",
            "--backend",
            "virgl",
            "--virgl-server-fd",
            "5",
        ])
        .unwrap();
        assert_eq!(
            (a.backend, a.render_server_fd),
            (BackendKind::Virgl, Some(5))
        );
        let bad = parse(&[
            "--transport-fd",
            "3",
            "--mapping-fd",
            "4",
            "--virgl-server-fd",
            "x",
        ]);
        assert!(bad.unwrap_err().contains("virgl-server-fd"));
        assert!(parse(&[
            "--transport-fd",
            "3",
            "--mapping-fd",
            "4",
            "--virgl-server-fd"
        ])
        .is_err());
    }

    #[test]
    fn args_keep_every_flag_and_add_vhost_user() {
        let a = parse(&[
            "--transport-fd",
            "3",
            "--mapping-fd",
            "4",
            "--seccomp-fd",
            "9",
            "--vma-limit",
            "12",
            "--test-ops",
            "--test-fail-mirror-place",
            "2",
        ])
        .unwrap();
        assert_eq!(
            (
                a.knobs.test_fail_mirror_place,
                a.knobs.test_fail_mirror_restore
            ),
            (Some(2), None)
        );
        assert_eq!(
            (
                a.transport_fd,
                a.mapping_fd,
                a.seccomp_fd,
                a.knobs.vma_limit,
                a.knobs.test_ops
            ),
            (Some(3), Some(4), Some(9), Some(12), true)
        );
        assert!(!a.vhost_user);
        // Native mode needs both tubes; vhost-user mode needs the socket and no tubes.
        assert!(parse(&["--transport-fd", "3"]).is_err());
        let v = parse(&["--vhost-user", "--socket-fd", "3", "--control-fd", "4"]).unwrap();
        assert_eq!(
            (v.vhost_user, v.socket_fd, v.control_fd),
            (true, Some(3), Some(4))
        );
        assert_eq!(v.shmem_size, crate::vhost_user::DEFAULT_SHMEM_SIZE);
        assert!(parse(&["--vhost-user"]).is_err());
        assert!(parse(&["--vhost-user", "--socket-fd", "3", "--transport-fd", "4"]).is_err());
        let help = Args::parse_clap(&["--help".to_string()]).unwrap_err();
        assert_eq!(help.kind(), clap::error::ErrorKind::DisplayHelp);
        assert!(help.to_string().contains("--vhost-user"));
    }

    #[test]
    fn an_unknown_backend_is_refused_with_the_names() {
        let base = ["--transport-fd", "3", "--mapping-fd", "4", "--backend"];
        let e = parse(&[&base[..], &["foo"]].concat()).unwrap_err();
        assert!(
            e.contains("foo") && e.contains("shm") && e.contains("virgl"),
            "{e}"
        );
        let a = parse(&[&base[..], &["shm"]].concat()).unwrap();
        assert_eq!(a.backend, BackendKind::Shm);
        assert_eq!(BackendKind::Virgl.to_string(), "virgl");
    }

    #[test]
    fn sizes_take_suffixes() {
        let a = parse(&[
            "--transport-fd",
            "3",
            "--mapping-fd",
            "4",
            "--blob-budget",
            "512M",
        ]);
        assert_eq!(a.unwrap().blob_budget, Some(512 << 20));
        let a = parse(&[
            "--transport-fd",
            "3",
            "--mapping-fd",
            "4",
            "--blob-budget",
            "1073741824",
        ]);
        assert_eq!(a.unwrap().blob_budget, Some(1 << 30));
        let v = parse(&["--vhost-user", "--socket-fd", "3", "--shmem-size", "64M"]).unwrap();
        assert_eq!(v.shmem_size, 64 << 20);
        let e = parse(&["--vhost-user", "--socket-fd", "3", "--shmem-size", "64Q"]).unwrap_err();
        assert!(e.contains("shmem-size") && e.contains("K, M or G"), "{e}");
    }

    #[test]
    fn a_render_server_is_for_virgl_only() {
        let (a, _b) = hostmem_ipc::Tube::pair().unwrap();
        match make_backend_with(BackendKind::Shm, false, Some(a.into_fd())) {
            Err(e) => assert!(e.to_string().contains("not shm"), "{e}"),
            Ok(b) => panic!("the {} backend took a render server", b.name()),
        }
    }
}
