//! `hostmem vhost-user --socket PATH`: the jailed device as a vhost-user backend for any
//! frontend (QEMU's `vhost-user-test-device-pci`, ...).
//!
//! [`bind_socket`] creates the listening UNIX socket (a stale socket file at the path is
//! removed first; anything else there is an error). [`start_backend`] starts the device in
//! the same jail as the native transport (namespaces, empty root, no capabilities,
//! seccomp under `gpu_device_vhost_user.policy` installed by the launcher right before the
//! exec, with the device's SIGSYS reporter, and the device's own memory cgroup at
//! [`DeviceConfig::memory_limit`]: all as `Device::start` does) with a duplicate of the listening socket at
//! fd 3 (`--vhost-user --socket-fd 3`: the device never opens a path) and a control tube
//! at fd 4: the device says Hello, the supervisor checks its jail from `/proc`
//! ([`launch::verify_jailed`], `Seccomp: 2`, `NoNewPrivs: 1`, `CapEff: 0`) and only then
//! sends the go (a second Hello; the region's size went in `--shmem-size`, and the frontend
//! owns the region), the device answers `Ready` and accepts frontends. [`supervise`] restarts a
//! device that ended (a crash, a seccomp kill, an OOM kill at its memory limit, said by
//! name), with a short back-off; the listening
//! socket stays, so a frontend reconnects to the new device at the same path.
//!
//! What the device does with a connection: `hostmem_device::vhost_user`.

use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hostmem_base::procfs;
use hostmem_ipc::protocol::{handshake, DeviceMsg, Hello, Role, VmmMsg};
use hostmem_ipc::Tube;
use hostmem_jail::launch::{self, ExitInfo, JailedChild, SigsysFinding};

use nix::sys::signal::Signal;

use crate::device::{memory_end, DeviceCgroup, DeviceConfig, DeviceFacts};
use crate::stop::StopSignals;

/// Fd number of the listening socket in the device (`--socket-fd`).
pub const SOCKET_FD: i32 = 3;
/// Fd number of the control tube in the device (`--control-fd`).
pub const CONTROL_FD: i32 = 4;

/// Creates the listening socket at `path`, removing a stale socket file first (a file of
/// another type at the path is left alone: error).
pub fn bind_socket(path: &Path) -> anyhow::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("removing the stale socket {}", path.display()))?,
        Ok(_) => bail!("{} exists and is not a socket", path.display()),
        Err(_) => {}
    }
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

/// The device config for vhost-user mode: `cfg` with the vhost-user policy from the same
/// folder (`gpu_device_vhost_user.policy`; `gpu_device_vhost_user_virgl.policy` for the
/// virgl backend).
pub fn vhost_user_device(mut cfg: DeviceConfig) -> DeviceConfig {
    if let Some(p) = cfg.policy.take() {
        let dir = p.parent().map(Path::to_path_buf).unwrap_or_default();
        let name = if cfg.backend.is_virgl() {
            "gpu_device_vhost_user_virgl.policy"
        } else {
            "gpu_device_vhost_user.policy"
        };
        cfg.policy = Some(dir.join(name));
    }
    cfg
}

/// A running backend device.
pub struct BackendDevice {
    child: JailedChild,
    /// The control tube: after `Ready` the device sends its frames and cursor changes on
    /// it ([`BackendDevice::feed`]).
    control: std::sync::Arc<Tube>,
    facts: DeviceFacts,
    /// Its memory cgroup (removed after it is reaped, when this is dropped).
    cgroup: Option<DeviceCgroup>,
    /// virgl: the render server the device's venus contexts run in (killed with it).
    render_server: Option<Box<JailedChild>>,
}

impl std::fmt::Debug for BackendDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendDevice")
            .field("facts", &self.facts)
            .finish()
    }
}

impl BackendDevice {
    /// What was checked at start.
    pub fn facts(&self) -> &DeviceFacts {
        &self.facts
    }

    /// The control tube (to shut a [`BackendDevice::feed`] down).
    pub fn control(&self) -> &std::sync::Arc<Tube> {
        &self.control
    }

    /// Reads the device's frames and cursor changes off the control tube into `frames` on
    /// a thread of its own, until the device's end closes. Every frame is checked
    /// ([`crate::display::Frames::receive`]); this supervisor gives the device no file,
    /// only sockets, which the regular-file check refuses.
    pub fn feed(&self, frames: &crate::display::Frames) -> std::thread::JoinHandle<()> {
        let (tube, frames) = (self.control.clone(), frames.clone());
        std::thread::spawn(move || loop {
            match tube.recv::<DeviceMsg>() {
                Ok((DeviceMsg::Frame(f), fds)) => {
                    frames.receive(&f, fds, &|_| None);
                }
                Ok((DeviceMsg::Cursor(c), _)) => frames.cursor(&c),
                Ok((other, _)) => {
                    crate::display::FRAME_WARNINGS.warn(
                        "unexpected control message",
                        format_args!("control tube: unexpected message from the device: {other:?}"),
                    );
                }
                Err(hostmem_ipc::Error::Hangup) => return,
                Err(
                    e @ (hostmem_ipc::Error::Malformed(_)
                    | hostmem_ipc::Error::UnexpectedFds { .. }
                    | hostmem_ipc::Error::TooManyFds { .. }
                    | hostmem_ipc::Error::Truncated
                    | hostmem_ipc::Error::ControlTruncated { .. }),
                ) => {
                    crate::display::FRAME_WARNINGS.warn(
                        "bad control message",
                        format_args!("control tube: dropped a bad message from the device: {e}"),
                    );
                }
                Err(e) => {
                    log::warn!("control tube: {e}: no more frames from this device");
                    return;
                }
            }
        })
    }

    /// Waits for the device to end (its render server, whose only client it was, is
    /// ended then too).
    pub fn wait(&mut self) -> anyhow::Result<ExitInfo> {
        let info = self.child.wait()?;
        self.end_render_server();
        Ok(info)
    }

    /// The exit, if the device has ended (then its render server is ended too).
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitInfo>> {
        let info = self.child.try_wait()?;
        if info.is_some() {
            self.end_render_server();
        }
        Ok(info)
    }

    /// Kills the device and waits for it.
    pub fn kill(mut self) -> Option<ExitInfo> {
        self.child.kill(libc::SIGKILL);
        let info = self.child.wait().ok();
        self.end_render_server();
        info
    }

    /// Kills the render server (it has nothing to finish without its client) and logs how
    /// it ended, with the calls its filter refused.
    fn end_render_server(&mut self) -> Vec<String> {
        let Some(mut server) = self.render_server.take() else {
            return Vec::new();
        };
        server.kill(libc::SIGKILL);
        match server.wait() {
            Ok(i) => log::info!(
                "render server pid {}: {}",
                server.pid(),
                crate::device::describe(&i, &server)
            ),
            Err(e) => log::warn!("render server pid {}: {e}", server.pid()),
        }
        server
            .seccomp_log()
            .iter()
            .map(|r| format!("render server: {r}"))
            .collect()
    }

    /// How the device ended, in words (for SIGSYS: the syscall).
    pub fn describe(&self, info: &ExitInfo) -> String {
        crate::device::describe(info, &self.child)
    }

    /// True if the kernel's OOM killer killed the device at its memory limit (its cgroup
    /// counted a kill and `info` is a SIGKILL).
    pub fn oom_killed(&self, info: &ExitInfo) -> bool {
        memory_end(Some(info), self.cgroup.as_ref()).0
    }

    /// Kills the device (a no-op on one that already ended), waits for it and says how it
    /// ended: the exit, in words, the refused syscall for SIGSYS, the seccomp violations
    /// logged (log mode) and whether its memory cgroup's OOM killer ended it. For
    /// `hostmem run --transport vhost-user`.
    pub fn end(mut self) -> BackendEnd {
        self.child.kill(libc::SIGKILL);
        let info = self.child.wait().ok();
        // Only the cgroup's counter tells an OOM kill from our own SIGKILL.
        let (oom_killed, max_memory) = memory_end(info.as_ref(), self.cgroup.as_ref());
        let sigsys = match info {
            Some(ExitInfo::Signaled { signal, .. }) if signal == libc::SIGSYS => {
                self.child.sigsys_finding()
            }
            _ => SigsysFinding::default(),
        };
        let mut violations: Vec<String> = self
            .child
            .seccomp_log()
            .iter()
            .map(|r| r.to_string())
            .collect();
        violations.extend(self.end_render_server());
        violations.sort();
        violations.dedup();
        BackendEnd {
            described: info.map(|i| crate::device::describe(&i, &self.child)),
            info,
            syscall: sigsys.syscall().map(|r| r.to_string()),
            sigsys,
            violations,
            oom_killed,
            max_memory,
        }
    }
}

/// How a backend device ended ([`BackendDevice::end`]).
#[derive(Debug, Clone)]
pub struct BackendEnd {
    /// Exit status, if it could be collected.
    pub info: Option<ExitInfo>,
    /// The same in words.
    pub described: Option<String>,
    /// For SIGSYS: the syscall, by the kernel's word (`None` when its audit record could
    /// not be read: never the device's own claim).
    pub syscall: Option<String>,
    /// For SIGSYS: the kernel's record, why it is missing, and the device's claim.
    pub sigsys: SigsysFinding,
    /// Seccomp violations logged.
    pub violations: Vec<String>,
    /// The kernel's OOM killer killed it at its memory limit (its cgroup counted a kill).
    pub oom_killed: bool,
    /// Most memory its cgroup ever held, in bytes (0 without a cgroup).
    pub max_memory: u64,
}

/// Starts the device on `listener` (a duplicate goes to the device), checks its jail from
/// `/proc` before it may serve, and waits for `Ready`.
pub fn start_backend(
    cfg: &DeviceConfig,
    listener: &UnixListener,
    shmem_size: u64,
) -> anyhow::Result<BackendDevice> {
    let t0 = Instant::now();
    let (control, control_dev) = Tube::pair()?;
    let sock: OwnedFd = listener.try_clone()?.into();
    let mut args: Vec<String> = cfg.pre_args.clone();
    args.extend([
        "--vhost-user".into(),
        "--socket-fd".into(),
        SOCKET_FD.to_string(),
        "--control-fd".into(),
        CONTROL_FD.to_string(),
        "--shmem-size".into(),
        shmem_size.to_string(),
        "--backend".into(),
        cfg.backend.name().into(),
    ]);
    // The poll loop's idle window, as for the native device (`Device::start`).
    if let Some(max) = cfg.idle_poll_max {
        args.extend(["--idle-poll-max-us".into(), max.as_micros().to_string()]);
    }
    args.extend(cfg.extra_args.iter().cloned());
    let mut keep_fds = vec![(sock, SOCKET_FD), (control_dev.into_fd(), CONTROL_FD)];
    // virgl: the render server first, as for the native device; the device takes one
    // frontend with it and exits when that frontend goes (restarted with a fresh server).
    let render_server = match &cfg.render_server {
        Some(rs) => {
            let (ours, theirs) = Tube::pair()?;
            let server = crate::device::spawn_render_server(cfg, rs, theirs.into_fd())?;
            keep_fds.push((ours.into_fd(), crate::device::RENDER_SERVER_FD));
            args.extend([
                "--virgl-server-fd".into(),
                crate::device::RENDER_SERVER_FD.to_string(),
            ]);
            Some(Box::new(server))
        }
        None => None,
    };
    // Jailed exactly as `Device::start` jails the native device.
    let (jail, memory, cgroup) = crate::device::jail_config(cfg, args, keep_fds)?;
    let mut child = launch::spawn(jail).context("spawning the vhost-user device")?;
    let pid = child.pid();
    crate::device::pin_or_kill(&mut child, &cfg.device_cpus, "vhost-user device")?;
    let connect = || -> anyhow::Result<DeviceFacts> {
        handshake::<VmmMsg, DeviceMsg>(&control, Role::Vmm, cfg.start_timeout)
            .context("handshake with the device")?;
        // The jail is checked from outside before the device may accept a frontend.
        let st = crate::device::check_jailed(cfg, pid)?;
        // The go: a second Hello (the region's size went in the arguments).
        control.send(&VmmMsg::Hello(Hello::new(Role::Vmm)), &[])?;
        control.set_recv_timeout(Some(cfg.start_timeout))?;
        let (msg, _) = control.recv::<DeviceMsg>().context("waiting for Ready")?;
        let DeviceMsg::Ready {
            num_capsets,
            num_scanouts,
            ..
        } = msg
        else {
            bail!("device sent {msg:?} instead of Ready");
        };
        let seccomp_filters = crate::device::check_runtime_filter(cfg, pid)?;
        Ok(DeviceFacts {
            pid,
            jailed: cfg.jailed,
            seccomp: st.seccomp,
            seccomp_filters,
            no_new_privs: st.no_new_privs,
            cap_eff: format!("{:016x}", st.cap_eff),
            open_fds: procfs::open_fds_of(&pid.to_string())?.len(),
            start_ms: t0.elapsed().as_secs_f64() * 1e3,
            num_capsets,
            num_scanouts,
            memory_limit: memory.clone(),
        })
    };
    match connect() {
        Ok(facts) => {
            log::info!(
                "vhost-user device pid {pid} up in {:.1} ms ({}jailed, seccomp {} ({} filters), no_new_privs {}, CapEff {}, memory limit {} MiB by {})",
                facts.start_ms,
                if facts.jailed { "" } else { "NOT " },
                facts.seccomp,
                facts.seccomp_filters,
                facts.no_new_privs,
                facts.cap_eff,
                facts.memory_limit.bytes >> 20,
                facts.memory_limit.how
            );
            Ok(BackendDevice {
                child,
                control: std::sync::Arc::new(control),
                facts,
                cgroup,
                render_server,
            })
        }
        Err(e) => {
            child.kill(libc::SIGKILL);
            let why = child
                .wait()
                .ok()
                .map(|x| crate::device::describe(&x, &child))
                .unwrap_or_default();
            Err(e.context(format!("vhost-user device pid {pid} failed to start {why}")))
        }
    }
}

/// How [`supervise`] runs.
#[derive(Debug, Clone)]
pub struct SuperviseOptions {
    /// The socket path.
    pub socket: PathBuf,
    /// Size of shared memory region 1.
    pub shmem_size: u64,
    /// Stop after this many device starts (tests); `None`: forever.
    pub max_starts: Option<usize>,
    /// Pause before a restart.
    pub backoff: Duration,
    /// Where every device's frames go (kept across restarts); `None`: not read.
    pub frames: Option<crate::display::Frames>,
    /// Where a SIGUSR1 writes scanout 0's latest frame as PNG.
    pub screenshot: Option<PathBuf>,
}

/// How [`supervise`] ended.
#[derive(Debug, Clone, Default)]
pub struct SuperviseEnd {
    /// Devices started.
    pub starts: usize,
    /// The stop signal that ended it (`None`: `max_starts` were served).
    pub stopped_by: Option<Signal>,
    /// The last device's pid and how it ended, in words.
    pub last_device: Option<(i32, String)>,
    /// The socket file was removed.
    pub socket_removed: bool,
    /// The last device's memory cgroup, if it had one, and whether it is gone.
    pub cgroup: Option<(PathBuf, bool)>,
}

impl std::fmt::Display for SuperviseEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.stopped_by {
            Some(s) => write!(f, "stopped by {s}")?,
            None => write!(f, "done")?,
        }
        write!(f, " after {} device start(s)", self.starts)?;
        if let Some((pid, how)) = &self.last_device {
            write!(f, "; device pid {pid} {how}")?;
        }
        write!(
            f,
            "; socket {}",
            if self.socket_removed {
                "removed"
            } else {
                "NOT removed"
            }
        )?;
        if let Some((dir, gone)) = &self.cgroup {
            let state = if *gone { "removed" } else { "NOT removed" };
            write!(f, "; memory cgroup {} {state}", dir.display())?;
        }
        Ok(())
    }
}

/// The socket file we bound, removed when dropped (if it is still ours: same inode).
struct SocketFile {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl SocketFile {
    fn new(path: &Path) -> SocketFile {
        use std::os::unix::fs::MetadataExt;
        let id = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        SocketFile {
            path: path.to_path_buf(),
            id,
        }
    }

    fn remove(&mut self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some(id) = self.id.take() else {
            return false;
        };
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == id => std::fs::remove_file(&self.path).is_ok(),
            _ => false,
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        self.remove();
    }
}

/// SIGUSR1: scanout 0's latest frame to `opts.screenshot` (logged either way).
fn screenshot_on_request(opts: &SuperviseOptions) {
    let (Some(frames), Some(path)) = (&opts.frames, &opts.screenshot) else {
        log::warn!("SIGUSR1: no --screenshot path: nothing written");
        return;
    };
    match frames.screenshot(path) {
        Ok(true) => log::info!("SIGUSR1: screenshot written to {}", path.display()),
        Ok(false) => log::warn!("SIGUSR1: no frame yet: nothing written"),
        Err(e) => log::warn!("SIGUSR1: screenshot {}: {e:#}", path.display()),
    }
}

/// Binds the socket, starts the device and restarts it whenever it ends. `on_ready` is
/// called after each start (the first call is where `hostmem vhost-user` prints its one
/// line). Returns after `max_starts` starts have ended, when a stop signal arrives (the
/// device is killed and reaped, its cgroup and the socket file removed), or on a failed
/// start.
pub fn supervise(
    cfg: &DeviceConfig,
    opts: &SuperviseOptions,
    stop: Option<&StopSignals>,
    mut on_ready: impl FnMut(usize, &DeviceFacts),
) -> anyhow::Result<SuperviseEnd> {
    let listener = bind_socket(&opts.socket)?;
    let mut socket = SocketFile::new(&opts.socket);
    let mut end = SuperviseEnd::default();
    let stopped = |end: &mut SuperviseEnd, socket: &mut SocketFile, sig: Signal| {
        end.stopped_by = Some(sig);
        end.socket_removed = socket.remove();
    };
    loop {
        if opts.max_starts.is_some_and(|m| end.starts >= m) {
            end.socket_removed = socket.remove();
            return Ok(end);
        }
        if let Some(sig) = stop.and_then(StopSignals::received) {
            stopped(&mut end, &mut socket, sig);
            return Ok(end);
        }
        let mut dev = start_backend(cfg, &listener, opts.shmem_size)?;
        if let Some(frames) = &opts.frames {
            let _ = dev.feed(frames);
        }
        end.starts += 1;
        on_ready(end.starts, dev.facts());
        let pid = dev.facts().pid;
        let cgroup = dev.facts().memory_limit.cgroup.clone();
        let info = match stop {
            None => dev.wait()?,
            Some(stop) => loop {
                if let Some(info) = dev.try_wait()? {
                    break info;
                }
                let sig = stop.wait(Duration::from_millis(200));
                if stop.take_screenshot_request() {
                    screenshot_on_request(opts);
                }
                if let Some(sig) = sig {
                    log::info!("{sig}: ending vhost-user device pid {pid}");
                    let how = dev.end();
                    end.last_device = Some((pid, how.described.unwrap_or_default()));
                    end.cgroup = cgroup.map(|d| {
                        let gone = !d.exists();
                        (d, gone)
                    });
                    stopped(&mut end, &mut socket, sig);
                    return Ok(end);
                }
            },
        };
        end.last_device = Some((pid, dev.describe(&info)));
        let oom = if dev.oom_killed(&info) {
            let limit = &dev.facts().memory_limit;
            log::error!(
                "vhost-user device pid {}: out of memory: killed by the kernel's OOM killer at its memory limit of {} MiB",
                dev.facts().pid,
                limit.bytes >> 20
            );
            "; out of memory at its limit"
        } else {
            ""
        };
        log::warn!(
            "vhost-user device pid {} {}{oom}: restarting",
            dev.facts().pid,
            dev.describe(&info)
        );
        drop(dev);
        match stop {
            Some(s) => {
                if let Some(sig) = s.wait(opts.backoff) {
                    stopped(&mut end, &mut socket, sig);
                    return Ok(end);
                }
            }
            None => std::thread::sleep(opts.backoff),
        }
    }
}
