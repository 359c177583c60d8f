//! Launching and supervising the device process.
//!
//! [`Device::start`] builds the jail (or, for comparison, a plain child with fd hygiene),
//! hands the device exactly two channels (the transport tube at fd 3, [`TRANSPORT_FD`], and
//! the mapping tube at fd 4, [`MAPPING_FD`]) plus stderr, completes the handshake, **checks
//! from outside that the device is jailed** (`/proc/<pid>/status`: `Seccomp: 2`,
//! `NoNewPrivs: 1`, `CapEff: 0`) and only then sends the hostmem memfd. A mapping-service
//! thread then serves the device's events. The transport tube ([`Device::transport`]) is the
//! virtio transport's channel to the device (guest RAM, queue setup with kick and call
//! eventfds, reset, counters: [`hostmem_ipc::protocol::TransportMsg`]); the guest's commands
//! never cross it, they live in virtqueues in guest RAM.
//!
//! [`Device::stop`] / death handling: on tube EOF, child exit or a command timeout the
//! device is asked to exit (the transport tube is shut down: EOF), killed if needed, its exit is reported (signal; for SIGSYS the syscall by the kernel's audit record, the device's own SIGSYS record only as its claim), the
//! whole window goes back to background and every blob memslot is deleted, so the guest keeps
//! running and reads zeros where blobs were.
//!
//! **The device's memory is bounded** ([`DeviceConfig::memory_limit`], default
//! [`DEFAULT_DEVICE_MEMORY`], `hostmem run --device-memory`). Preferred: a cgroup v1
//! `memory` controller group of its own, made below the VMM's own memory cgroup before the
//! spawn and joined by the launcher before the device runs its first instruction
//! (`memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes` where swap accounting exists).
//! Everything the device faults in is charged there: heap, the blobs' memfd pages, pages of
//! the window or guest RAM it touches first. At the limit the kernel's OOM killer kills the
//! device (it is the group's only task) and nothing else; the VMM sees a SIGKILL, reads
//! `oom_kill` in the group's `memory.oom_control`, and reports the device's end as out of
//! memory (log line and [`DeviceExit::oom_killed`]); the run restarts it by its policy.
//! Without a usable memory cgroup it falls back to rlimits: `RLIMIT_DATA` (heap and private
//! mappings) and `RLIMIT_FSIZE` (each memfd's size) at the limit. That bounds less (many
//! memfds, each below the limit, are not bounded together) and a breach is an allocation
//! failure, not a clean OOM kill; [`MemoryLimitFacts::how`] says which one is in force.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hostmem_base::procfs;
use hostmem_ipc::protocol::{handshake, DeviceMsg, Role, VmmMsg};
use hostmem_ipc::Tube;
use hostmem_jail::launch::{self, ExitInfo, JailConfig, JailedChild, SigsysFinding};
use serde::Serialize;

use crate::hostmem::Hostmem;

mod memory;
use crate::service::{serve, ServeEnd};
pub use memory::MemoryLimitFacts;
pub(crate) use memory::{memory_end, memory_limit, note_oom, DeviceCgroup};

/// Fd number of the transport tube in the device (`--transport-fd`).
pub const TRANSPORT_FD: i32 = 3;
/// Fd number of the mapping tube in the device.
pub const MAPPING_FD: i32 = 4;
/// Fd number of the render server socket in a virgl device (`--virgl-server-fd`).
pub const RENDER_SERVER_FD: i32 = 5;
/// Fd number of the socket in the render server (`--socket-fd`).
const SERVER_SOCKET_FD: i32 = 3;
/// RLIMIT_NOFILE wanted for the device: blobs are fds in the shm backend.
pub const DEVICE_NOFILE: u64 = 65536;

/// [`DEVICE_NOFILE`], capped at our own hard limit (a process in a new user namespace cannot
/// raise it past that).
pub(crate) fn device_nofile() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(_, hard)| hard.min(DEVICE_NOFILE))
}
/// How long the device has to say hello and get ready.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);
/// The device's memory limit unless configured: 1 GiB.
pub const DEFAULT_DEVICE_MEMORY: u64 = 1 << 30;
/// How to start the device.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The device program and the arguments that select device mode.
    pub program: PathBuf,
    /// Arguments before ours (e.g. `["device"]` when the program is `hostmem` itself).
    pub pre_args: Vec<String>,
    /// Arguments after ours (e.g. `--vma-limit N` for tests).
    pub extra_args: Vec<String>,
    /// Renderer backend (`--backend` on the device's command line).
    pub backend: hostmem_device::backend::BackendKind,
    /// Jail it (namespaces, empty root, no caps, seccomp).
    pub jailed: bool,
    /// The seccomp policy file (minijail syntax); `None` = no filter (only when unjailed).
    pub policy: Option<PathBuf>,
    /// Log violations instead of killing.
    pub seccomp_log: bool,
    /// Read-only bind mounts the backend needs (library paths for Mesa).
    pub ro_binds: Vec<PathBuf>,
    /// `RUST_LOG` for the device.
    pub log_filter: Option<String>,
    /// How long the device has to say hello and then `Ready` ([`START_TIMEOUT`] by
    /// default): a device that stays silent is killed and `Device::start` fails.
    pub start_timeout: Duration,
    /// virgl: start virglrenderer's render server first and hand the device a socket to it
    /// (venus runs there; Debian's 1.3.0 has venus nowhere else).
    pub render_server: Option<RenderServerConfig>,
    /// The device's memory limit in bytes (`None` or 0: unlimited); see the module doc.
    pub memory_limit: Option<u64>,
    /// CPUs the device process (and its render server) may run on; empty: any
    /// ([`crate::affinity`]).
    pub device_cpus: Vec<usize>,
    /// CPUs the VMM's mapping-service thread for this device may run on; empty: any.
    pub service_cpus: Vec<usize>,
    /// How long the device's idle loop may poll before it sleeps (`--idle-poll-max-us`;
    /// `None`: the device's default, 200 µs). More suits a device with a CPU of its own.
    pub idle_poll_max: Option<Duration>,
}

/// virglrenderer's render server (`virgl_render_server --socket-fd N`), started by the VMM
/// before a virgl device, as crosvm does: the device's jail forbids the fork and exec the
/// library would otherwise do. It runs in a jail of its own when the device is jailed
/// (namespaces, empty root with `ro_binds`, no capabilities, no_new_privs, and `policy`
/// installed before the exec: `jail-policies/x86_64/virgl_render_server.policy`).
#[derive(Debug, Clone)]
pub struct RenderServerConfig {
    /// The program.
    pub program: PathBuf,
    /// Read-only bind mounts beyond the device's (the Vulkan driver list).
    pub ro_binds: Vec<PathBuf>,
    /// Its seccomp policy (with the device's action: kill), installed by the launcher right
    /// before the exec, since the server cannot install ours; its workers inherit it.
    /// `None`: no filter (an unjailed comparison run).
    pub policy: Option<PathBuf>,
}

impl DeviceConfig {
    /// Finds the device program: `$HOSTMEM_DEVICE_BIN`, else `hostmem-gpu-device` next to
    /// the running executable (or one level up, for test binaries in `deps/`), else the
    /// running `hostmem` itself in its hidden `device` mode. Returns the program and the
    /// arguments that select device mode.
    pub fn find_program() -> anyhow::Result<(PathBuf, Vec<String>)> {
        if let Some(p) = std::env::var_os("HOSTMEM_DEVICE_BIN") {
            return Ok((PathBuf::from(p), vec![]));
        }
        let exe = std::env::current_exe()?;
        let mut dir = exe.parent().map(PathBuf::from);
        for _ in 0..2 {
            let Some(d) = dir else { break };
            let candidate = d.join("hostmem-gpu-device");
            if candidate.is_file() {
                return Ok((candidate, vec![]));
            }
            dir = d.parent().map(PathBuf::from);
        }
        if exe.file_name().is_some_and(|n| n == "hostmem") {
            return Ok((exe, vec!["device".into()]));
        }
        bail!(
            "hostmem-gpu-device not found next to {} (build it, or set HOSTMEM_DEVICE_BIN)",
            exe.display()
        )
    }
}

/// What was checked about the running device from outside.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DeviceFacts {
    /// Host pid.
    pub pid: i32,
    /// Started in the jail.
    pub jailed: bool,
    /// `Seccomp:` from /proc.
    pub seccomp: u32,
    /// `Seccomp_filters:` after Ready: the launch policy and the run-time filter.
    pub seccomp_filters: u32,
    /// `NoNewPrivs:`.
    pub no_new_privs: bool,
    /// `CapEff:` as 16 hex digits.
    pub cap_eff: String,
    /// Fds the device holds.
    pub open_fds: usize,
    /// Start-up time: spawn to Ready, in ms.
    pub start_ms: f64,
    /// Capsets the device's backend offers (from `Ready`; `virtio_gpu_config.num_capsets`).
    pub num_capsets: u32,
    /// Scanouts it serves (from `Ready`; `virtio_gpu_config.num_scanouts`).
    pub num_scanouts: u32,
    /// How its memory is bounded.
    pub memory_limit: MemoryLimitFacts,
}

/// How a device instance ended.
#[derive(Debug, Clone, Serialize)]
pub struct DeviceExit {
    /// Host pid.
    pub pid: i32,
    /// Exit code, if it exited.
    pub code: Option<i32>,
    /// Signal, if it was killed.
    pub signal: Option<i32>,
    /// For SIGSYS: the syscall that was refused, by the kernel's word (its audit record;
    /// `null` when that record could not be read: never the device's own claim).
    pub syscall: Option<String>,
    /// For SIGSYS, in the JSON as `kernel_record` (the kernel's audit record of the call,
    /// or `null`), `kernel_record_unavailable` (why it is `null`) and `device_claim` (what
    /// the device wrote to its SIGSYS report pipe: only its claim).
    #[serde(flatten)]
    pub sigsys: SigsysFinding,
    /// Placements that were live and have been restored to background.
    pub restored: usize,
    /// Seccomp violations the kernel logged for this device (log mode: the syscalls the
    /// policy is missing, by name).
    pub seccomp_violations: Vec<String>,
    /// The kernel's OOM killer killed it at its memory limit (cgroup).
    pub oom_killed: bool,
    /// Most memory its cgroup ever held, in bytes (0 without a cgroup).
    pub max_memory: u64,
    /// Why the VMM noticed (and, for an OOM kill, that it ran out of memory).
    pub cause: String,
}

/// A running device.
pub struct Device {
    child: JailedChild,
    /// The render server started for a virgl device (killed when the device ends).
    render_server: Option<JailedChild>,
    /// The transport tube; shutting it down tells a healthy device to exit.
    transport: Arc<Tube>,
    mapping: Arc<Tube>,
    service: Option<JoinHandle<ServeEnd>>,
    hostmem: Arc<Hostmem>,
    facts: DeviceFacts,
    /// Its memory cgroup (removed after it is reaped).
    cgroup: Option<DeviceCgroup>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("facts", &self.facts)
            .finish()
    }
}

impl Device {
    /// Starts a device and connects it to `hostmem`.
    pub fn start(cfg: &DeviceConfig, hostmem: Arc<Hostmem>) -> anyhow::Result<Device> {
        let t0 = Instant::now();
        let (transport, transport_dev) = Tube::pair()?;
        let (mapping, mapping_dev) = Tube::pair()?;
        let mut args: Vec<String> = cfg.pre_args.clone();
        args.extend([
            "--transport-fd".into(),
            TRANSPORT_FD.to_string(),
            "--mapping-fd".into(),
            MAPPING_FD.to_string(),
            "--backend".into(),
            cfg.backend.name().into(),
            // Where the window is to the guest: no 2D resource's backing may lie there.
            "--window-gpa".into(),
            hostmem.window_gpa().to_string(),
        ]);
        if let Some(max) = cfg.idle_poll_max {
            args.extend(["--idle-poll-max-us".into(), max.as_micros().to_string()]);
        }
        args.extend(cfg.extra_args.iter().cloned());
        let mut keep_fds = vec![
            (transport_dev.into_fd(), TRANSPORT_FD),
            (mapping_dev.into_fd(), MAPPING_FD),
        ];
        let render_server = match &cfg.render_server {
            Some(rs) => {
                let (ours, theirs) = Tube::pair()?;
                let server = spawn_render_server(cfg, rs, theirs.into_fd())?;
                keep_fds.push((ours.into_fd(), RENDER_SERVER_FD));
                args.extend(["--virgl-server-fd".into(), RENDER_SERVER_FD.to_string()]);
                Some(server)
            }
            None => None,
        };
        let (jail, memory, cgroup) = jail_config(cfg, args, keep_fds)?;
        let mut child = launch::spawn(jail).context("spawning the device")?;
        let pid = child.pid();
        pin_or_kill(&mut child, &cfg.device_cpus, "device")?;
        let connect = || -> anyhow::Result<DeviceFacts> {
            handshake::<VmmMsg, DeviceMsg>(&mapping, Role::Vmm, cfg.start_timeout)
                .context("handshake with the device")?;
            // Check the jail from outside before the device gets the hostmem memfd.
            let st = check_jailed(cfg, pid)?;
            let window = hostmem.window();
            mapping.send(
                &VmmMsg::Hostmem {
                    size: window.size(),
                },
                &[window.memfd().as_fd()],
            )?;
            mapping.set_recv_timeout(Some(cfg.start_timeout))?;
            let (msg, _) = mapping.recv::<DeviceMsg>().context("waiting for Ready")?;
            mapping.set_recv_timeout(None)?;
            let DeviceMsg::Ready {
                num_capsets,
                num_scanouts,
                ..
            } = msg
            else {
                bail!("device sent {msg:?} instead of Ready");
            };
            let seccomp_filters = check_runtime_filter(cfg, pid)?;
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
        let facts = match connect() {
            Ok(f) => f,
            Err(e) => {
                child.kill(libc::SIGKILL);
                let exit = child.wait().ok();
                let why = exit.map(|x| describe(&x, &child)).unwrap_or_default();
                return Err(e.context(format!("device pid {pid} failed to start {why}")));
            }
        };
        log::info!(
            "device pid {pid} up in {:.1} ms ({}jailed, seccomp {} ({} filters), no_new_privs {}, CapEff {}, {} fds, memory limit {} MiB by {})",
            facts.start_ms,
            if facts.jailed { "" } else { "NOT " },
            facts.seccomp,
            facts.seccomp_filters,
            facts.no_new_privs,
            facts.cap_eff,
            facts.open_fds,
            facts.memory_limit.bytes >> 20,
            facts.memory_limit.how
        );
        // Events come back to back while the guest maps: poll before sleeping.
        mapping.set_recv_spin(hostmem_ipc::REPLY_SPIN);
        let mapping = Arc::new(mapping);
        let service = {
            let (hm, tube) = (hostmem.clone(), mapping.clone());
            let cpus = cfg.service_cpus.clone();
            std::thread::Builder::new()
                .name(format!("mapping-service-{pid}"))
                .spawn(move || {
                    crate::affinity::pin_self_or_warn(&cpus, "mapping service");
                    serve(&hm, &tube)
                })?
        };
        Ok(Device {
            child,
            render_server,
            transport: Arc::new(transport),
            mapping,
            service: Some(service),
            hostmem,
            facts,
            cgroup,
        })
    }

    /// The transport tube (the virtio transport sends [`TransportMsg`]s here and reads one
    /// [`TransportReply`] per message). Shared: the holder must not keep it past
    /// [`Device::stop`], which shuts it down.
    ///
    /// [`TransportMsg`]: hostmem_ipc::protocol::TransportMsg
    /// [`TransportReply`]: hostmem_ipc::protocol::TransportReply
    pub fn transport(&self) -> Arc<Tube> {
        self.transport.clone()
    }

    /// What was checked at start.
    pub fn facts(&self) -> &DeviceFacts {
        &self.facts
    }

    /// Host pid.
    pub fn pid(&self) -> i32 {
        self.facts.pid
    }

    /// Kills the device with `signal` (e.g. for fault injection).
    pub fn kill(&self, signal: i32) {
        self.child.kill(signal);
    }

    /// True if the child has exited or the mapping service ended (the device closed its
    /// mapping tube). Does not block, so a VMM loop can poll it.
    pub fn has_ended(&self) -> bool {
        if self.service.as_ref().is_some_and(|s| s.is_finished()) {
            return true;
        }
        process_ended(self.facts.pid)
    }

    /// Ends the device (killing it if it is still alive), restores the window and reports
    /// how it ended. `cause` says why the VMM is doing this. For giving up on a device (lost,
    /// hung, failed): its end is logged at warn, since someone should look at it. A device
    /// the VMM is simply done with ends through [`Device::finish`].
    pub fn stop(self, cause: &str) -> DeviceExit {
        self.end(cause, None)
    }

    /// [`Device::stop`] for a device the VMM is done with (the run or the bench finished):
    /// a normal end is logged at info. A normal end: the device was still running when
    /// asked to stop, exited with code 0 and no seccomp violation was seen; any other end
    /// (it had already died, was killed, exited non-zero, broke its policy) is logged at
    /// warn.
    pub fn finish(self, cause: &str) -> DeviceExit {
        self.end(cause, Some(log::Level::Info))
    }

    /// [`Device::finish`] with the level of a normal end (the bench, which ends dozens of
    /// devices, uses debug).
    pub fn finish_with(self, cause: &str, normal: log::Level) -> DeviceExit {
        self.end(cause, Some(normal))
    }

    /// Ends the device; `normal` is the level of a clean end (`None`: warn whatever the end).
    fn end(mut self, cause: &str, normal: Option<log::Level>) -> DeviceExit {
        let ended_before = self.has_ended();
        // EOF on the transport tube asks a healthy device to exit; give it a moment. Shut
        // down rather than dropped: a virtio transport may still hold an `Arc` of it. A
        // device that stopped reading its mapping tube must not block us here: bounded send.
        let _ = self
            .mapping
            .set_send_timeout(Some(Duration::from_millis(100)));
        let _ = self.mapping.send(&VmmMsg::Shutdown, &[]);
        if let Err(e) = self.transport.shutdown() {
            log::warn!(
                "device pid {}: shutting the transport tube down: {e}",
                self.facts.pid
            );
        }
        let info = match self.child.wait_timeout(Duration::from_secs(2)) {
            Ok(Some(info)) => Some(info),
            _ => {
                self.child.kill(libc::SIGKILL);
                self.child.wait().ok()
            }
        };
        let mut server_violations = vec![];
        if let Some(mut server) = self.render_server.take() {
            // Its only client is gone; it has nothing to finish.
            server.kill(libc::SIGKILL);
            match server.wait() {
                Ok(i) => log::info!(
                    "render server pid {}: {}",
                    server.pid(),
                    describe(&i, &server)
                ),
                Err(e) => log::warn!("render server pid {}: {e}", server.pid()),
            }
            server_violations = server
                .seccomp_log()
                .iter()
                .map(|r| format!("render server: {r}"))
                .collect();
        }
        // The child is gone: the service thread reads what it sent to the end (its last
        // frame may still be queued) and sees EOF. Another process may still hold the
        // device's end (an unjailed device that forked): after a bounded wait, shut our end
        // down so that the service thread sees EOF (or EPIPE in a blocked reply) either way.
        let t0 = std::time::Instant::now();
        while self.service.as_ref().is_some_and(|s| !s.is_finished())
            && t0.elapsed() < Duration::from_millis(500)
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        let _ = self.mapping.shutdown();
        if let Some(s) = self.service.take() {
            if s.join().is_err() {
                log::error!(
                    "device pid {}: the mapping service panicked",
                    self.facts.pid
                );
            }
        }
        let restored = match self.hostmem.reset() {
            Ok(n) => n,
            Err(e) => {
                log::error!("restoring the window after device exit failed: {e:#}");
                0
            }
        };
        // Cheap (one read of /proc/self/maps) and device ends are rare: make sure.
        if let Err(e) = self.hostmem.audit() {
            log::error!("after the device ended the window is not what the VMM thinks: {e:#}");
        }
        let (oom_killed, max_memory) = memory_end(info.as_ref(), self.cgroup.as_ref());
        let mut exit = DeviceExit {
            pid: self.facts.pid,
            code: None,
            signal: None,
            syscall: None,
            sigsys: SigsysFinding::default(),
            restored,
            seccomp_violations: vec![],
            oom_killed,
            max_memory,
            cause: cause.to_string(),
        };
        note_oom(&mut exit, &self.facts.memory_limit);
        let mut names: Vec<String> = self
            .child
            .seccomp_log()
            .iter()
            .map(|r| r.to_string())
            .collect();
        names.extend(server_violations);
        names.sort();
        names.dedup();
        for n in &names {
            log::warn!("device pid {}: seccomp violation: {n}", exit.pid);
        }
        exit.seccomp_violations = names;
        if let Some(info) = &info {
            match info {
                ExitInfo::Exited(c) => exit.code = Some(*c),
                ExitInfo::Signaled { signal, .. } => {
                    exit.signal = Some(*signal);
                    if *signal == libc::SIGSYS {
                        exit.sigsys = self.child.sigsys_finding();
                        exit.syscall = exit.sigsys.syscall().map(|r| r.to_string());
                    }
                }
            }
        }
        let clean = !ended_before && exit.code == Some(0) && exit.seccomp_violations.is_empty();
        log::log!(
            normal.filter(|_| clean).unwrap_or(log::Level::Warn),
            "device pid {} ended ({}): {}; {} placements restored to background",
            exit.pid,
            exit.cause,
            info.map(|i| describe(&i, &self.child))
                .unwrap_or_else(|| "unknown status".into()),
            restored
        );
        exit
    }
}

/// The jail of a device process (native or vhost-user): `cfg`'s program with `args` and
/// `keep_fds`, its seccomp policy compiled and installed right before the exec (the device
/// then installs only its SIGSYS reporter), its rlimits and its memory bound. Returns the
/// memory facts and the cgroup, which must live until the device is reaped.
pub(crate) fn jail_config(
    cfg: &DeviceConfig,
    args: Vec<String>,
    keep_fds: Vec<(std::os::fd::OwnedFd, i32)>,
) -> anyhow::Result<(JailConfig, MemoryLimitFacts, Option<DeviceCgroup>)> {
    let seccomp = match &cfg.policy {
        Some(p) => Some(crate::policy::compile_device_policy(p, cfg.seccomp_log)?),
        None if cfg.jailed => bail!("a jailed device needs a seccomp policy"),
        None => None,
    };
    // The device's blobs together may hold what its memory limit allows, whoever touches
    // their pages (issue 22: the guest writing them through BAR2 charges the VMM).
    let mut args = args;
    if let Some(bytes) = cfg.memory_limit {
        args.extend(["--blob-budget".into(), bytes.to_string()]);
    }
    let mut env = vec![];
    if let Some(f) = &cfg.log_filter {
        env.push(("RUST_LOG".into(), f.into()));
    }
    // The shm backend holds one memfd per blob: allow as many fds as the VMM allows live
    // placements (plus headroom for unmapped blobs), not the default 1024.
    let mut rlimits = launch::Rlimits {
        nofile: device_nofile(),
        ..launch::Rlimits::default()
    };
    let (memory, cgroup) = memory_limit(cfg.memory_limit, &mut rlimits);
    let jail = JailConfig {
        program: cfg.program.clone(),
        args: args.into_iter().map(Into::into).collect(),
        keep_fds,
        env,
        namespaces: cfg.jailed,
        ro_binds: cfg.ro_binds.clone(),
        seccomp,
        seccomp_log: cfg.seccomp_log,
        // The filter is on before the device's first instruction (loader and runtime
        // start-up included); the device then installs only its SIGSYS reporter.
        seccomp_at_exec: true,
        sigsys_reporter: true,
        rlimits,
        cgroup: cgroup.as_ref().map(|c| c.dir().to_path_buf()),
        ..JailConfig::default()
    };
    Ok((jail, memory, cgroup))
}

/// Restricts a just-spawned child to `cpus` ([`DeviceConfig::device_cpus`]; empty: any);
/// a child that cannot be pinned is killed and reaped.
pub(crate) fn pin_or_kill(
    child: &mut JailedChild,
    cpus: &[usize],
    what: &str,
) -> anyhow::Result<()> {
    let r = crate::affinity::pin(child.pid(), cpus, what);
    if r.is_err() {
        child.kill(libc::SIGKILL);
        let _ = child.wait();
    }
    r
}

/// Checks from outside, before the device gets anything, that a jailed device really is:
/// six new namespaces, `Seccomp: 2`, `NoNewPrivs: 1`, no capabilities. Returns its status.
pub(crate) fn check_jailed(cfg: &DeviceConfig, pid: i32) -> anyhow::Result<procfs::ProcStatus> {
    let st = procfs::status_of(&pid.to_string())?;
    if cfg.jailed {
        launch::verify_jailed(pid).context("the device is not properly jailed")?;
        if st.seccomp != 2 || !st.no_new_privs || st.cap_eff != 0 {
            bail!("device pid {pid} not jailed: {st:?}");
        }
    }
    Ok(st)
}

/// Checks after `Ready` that a jailed device stacked its run-time filter (no new code,
/// `hostmem_jail::runtime`): `Seccomp_filters` must have grown past the launch policy's
/// one. Returns the count.
pub(crate) fn check_runtime_filter(cfg: &DeviceConfig, pid: i32) -> anyhow::Result<u32> {
    let st = procfs::status_of(&pid.to_string())?;
    if cfg.jailed && st.seccomp_filters < 2 {
        bail!(
            "device pid {pid} did not stack its run-time filter (Seccomp_filters {}): it \
             could still map new code",
            st.seccomp_filters
        );
    }
    Ok(st.seccomp_filters)
}

/// True if the child `pid` has exited or was killed (or was already reaped). Peeks without
/// reaping (WNOWAIT), so that whoever ends the device still collects its exit status.
pub(crate) fn process_ended(pid: i32) -> bool {
    use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
    let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
    match waitid(Id::Pid(nix::unistd::Pid::from_raw(pid)), flags) {
        Ok(WaitStatus::StillAlive) | Err(nix::errno::Errno::EINTR) => false,
        Ok(_) | Err(_) => true,
    }
}

/// Starts `rs` with `socket` at [`SERVER_SOCKET_FD`], jailed like the device when the
/// device is (its own jail, no seccomp: see [`RenderServerConfig`]).
pub(crate) fn spawn_render_server(
    cfg: &DeviceConfig,
    rs: &RenderServerConfig,
    socket: std::os::fd::OwnedFd,
) -> anyhow::Result<JailedChild> {
    let mut ro_binds = cfg.ro_binds.clone();
    ro_binds.extend(rs.ro_binds.iter().cloned());
    let jail = JailConfig {
        program: rs.program.clone(),
        args: vec!["--socket-fd".into(), SERVER_SOCKET_FD.to_string().into()],
        keep_fds: vec![(socket, SERVER_SOCKET_FD)],
        env: cfg
            .log_filter
            .as_ref()
            .map(|f| ("RUST_LOG".into(), f.into()))
            .into_iter()
            .collect(),
        namespaces: cfg.jailed,
        ro_binds,
        seccomp: match &rs.policy {
            Some(p) => Some(crate::policy::compile_device_policy(p, false)?),
            None => None,
        },
        seccomp_at_exec: true,
        // A worker the filter kills is a child of the server: report it as the server's.
        audit_descendants: true,
        ..JailConfig::default()
    };
    let mut server = launch::spawn(jail).context("spawning the render server")?;
    pin_or_kill(&mut server, &cfg.device_cpus, "render server")?;
    let filter = match &rs.policy {
        Some(p) => format!("seccomp {}", p.display()),
        None => "no seccomp".into(),
    };
    log::info!(
        "render server pid {} ({}, {filter}): {}",
        server.pid(),
        if cfg.jailed {
            "own namespaces, empty root, no capabilities"
        } else {
            "NOT jailed"
        },
        rs.program.display()
    );
    Ok(server)
}

pub(crate) fn describe(info: &ExitInfo, child: &JailedChild) -> String {
    match info {
        ExitInfo::Exited(c) => format!("exited with code {c}"),
        ExitInfo::Signaled { signal, .. } => {
            let name = nix::sys::signal::Signal::try_from(*signal)
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|_| signal.to_string());
            if *signal == libc::SIGSYS {
                // The kernel's call as the fact, the device's record only as its claim.
                format!("killed by {name} (seccomp: {})", child.sigsys_finding())
            } else {
                format!("killed by {name}")
            }
        }
    }
}
