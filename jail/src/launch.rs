//! The jailed launch, minijail0-style, in two stages.
//!
//! The VMM is multi-threaded, so it never forks without exec: [`spawn`] starts the **stage**
//! program (e.g. `hostmem jail-stage`) with plain fork+exec and sends it the config and the
//! fds over a socket on its stdin. The stage is single-threaded and may therefore do real
//! work after fork: it unshares user, mount, pid, net, ipc and uts namespaces, maps uid/gid 0
//! to ours, forks the device as pid 1 of the new pid namespace, and waits for it. The device
//! side of the fork mounts a fresh tmpfs as its root with only the declared read-only bind
//! mounts and a read-only `/proc`, pivots into it, sets rlimits, drops every capability
//! (bounding, ambient, effective/permitted/inheritable), sets no_new_privs, keeps only the
//! listed fds (renumbered), clears the environment but for an allow-list and execs the
//! program through an fd opened before the root changed. The stage reports the device's host
//! pid (or the failed step and errno) back, then ends the way the device ends (same code or
//! same signal), so the VMM sees e.g. SIGSYS directly.
//!
//! Seccomp is installed by the device itself as its first act ([`child_install_seccomp`]),
//! from a program the launcher compiled and handed over as a kept memfd; the VMM then checks
//! `/proc/<pid>/status` from outside ([`verify_jailed`]) before it trusts the device with
//! anything.

use std::ffi::{CString, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hostmem_base::sandbox::{self, ExecSpec, Forked};
use hostmem_base::shm::SharedMemory;
use nix::errno::Errno;
use nix::sys::socket::{
    sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Resource limits for the device.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Rlimits {
    /// RLIMIT_NOFILE.
    pub nofile: u64,
    /// RLIMIT_CORE (0: no core dumps).
    pub core: u64,
    /// RLIMIT_FSIZE (`u64::MAX`: unlimited; memfd blobs count as files).
    pub fsize: u64,
    /// RLIMIT_AS, if limited.
    pub address_space: Option<u64>,
}

impl Default for Rlimits {
    fn default() -> Self {
        Rlimits {
            nofile: 1024,
            core: 0,
            fsize: u64::MAX,
            address_space: None,
        }
    }
}

/// How to jail and start a program.
#[derive(Debug, Default)]
pub struct JailConfig {
    /// The stage program (e.g. the `hostmem` binary) and the arguments that select its
    /// stage mode (e.g. `["jail-stage"]`); `None` = find it ([`default_stage`]).
    pub stage: Option<(PathBuf, Vec<String>)>,
    /// The program to jail.
    pub program: PathBuf,
    /// Its arguments (without argv[0]).
    pub args: Vec<OsString>,
    /// Fds to keep, with their number in the program. Everything else is closed.
    pub keep_fds: Vec<(OwnedFd, RawFd)>,
    /// The environment (cleared but for these).
    pub env: Vec<(OsString, OsString)>,
    /// New namespaces, empty root, no capabilities. `false`: only fd/env hygiene (for
    /// comparisons).
    pub namespaces: bool,
    /// Read-only bind mounts (same path inside), e.g. the dynamic loader's libraries.
    pub ro_binds: Vec<PathBuf>,
    /// Resource limits.
    pub rlimits: Rlimits,
    /// A compiled seccomp program (bytes of `hostmem_base::seccomp::program_to_bytes`),
    /// handed to the program as a kept memfd with `--seccomp-fd N` appended to its args.
    pub seccomp: Option<Vec<u8>>,
    /// The program was compiled in log mode (informational).
    pub seccomp_log: bool,
}

/// The stage's instructions, sent as JSON with the fds (program first, then `keep_fds`).
#[derive(Debug, Serialize, Deserialize)]
struct StageConfig {
    program: PathBuf,
    args: Vec<Vec<u8>>,
    env: Vec<(Vec<u8>, Vec<u8>)>,
    targets: Vec<RawFd>,
    namespaces: bool,
    ro_binds: Vec<PathBuf>,
    rlimits: Rlimits,
    uid: u32,
    gid: u32,
}

/// What the stage reports back.
#[derive(Debug, Serialize, Deserialize)]
enum StageReport {
    Started { pid: i32 },
    Failed { step: String, errno: i32 },
}

/// How a jailed program ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ExitInfo {
    /// Exit code.
    Exited(i32),
    /// Killed by a signal.
    Signaled {
        /// The signal.
        signal: i32,
        /// A core was dumped.
        core: bool,
    },
}

/// A syscall the kernel's seccomp audit reported for the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyscallReport {
    /// Syscall number.
    pub nr: u32,
    /// Its name.
    pub name: String,
    /// The seccomp action code from the audit record (0x80000000 kill, 0x7ffc0000 log).
    pub code: u32,
}

impl std::fmt::Display for SyscallReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (nr {})", self.name, self.nr)
    }
}

/// The name of x86-64 syscall `nr`.
pub fn syscall_name(nr: u32) -> String {
    syscalls::Sysno::new(nr as usize)
        .map_or_else(|| format!("syscall_{nr}"), |s| s.name().to_string())
}

/// A running jailed program.
#[derive(Debug)]
pub struct JailedChild {
    stage: std::process::Child,
    pid: i32,
}

impl JailedChild {
    /// The program's pid in our pid namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal` to the program.
    pub fn kill(&self, signal: i32) {
        if let Ok(sig) = nix::sys::signal::Signal::try_from(signal) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), sig);
        }
    }

    fn info(s: std::process::ExitStatus) -> ExitInfo {
        match (s.code(), s.signal()) {
            (Some(c), _) => ExitInfo::Exited(c),
            (None, Some(signal)) => ExitInfo::Signaled {
                signal,
                core: s.core_dumped(),
            },
            (None, None) => ExitInfo::Exited(-1),
        }
    }

    /// The exit, if the program has ended.
    pub fn try_wait(&mut self) -> Result<Option<ExitInfo>, Error> {
        Ok(self
            .stage
            .try_wait()
            .map_err(|e| Error::Launch(format!("waitpid: {e}")))?
            .map(Self::info))
    }

    /// Waits for the program to end.
    pub fn wait(&mut self) -> Result<ExitInfo, Error> {
        Ok(Self::info(
            self.stage
                .wait()
                .map_err(|e| Error::Launch(format!("waitpid: {e}")))?,
        ))
    }

    /// Waits up to `t`.
    pub fn wait_timeout(&mut self, t: Duration) -> Result<Option<ExitInfo>, Error> {
        let t0 = Instant::now();
        loop {
            if let Some(x) = self.try_wait()? {
                return Ok(Some(x));
            }
            if t0.elapsed() >= t {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The syscall seccomp killed the program for, from the kernel's audit record.
    pub fn sigsys_report(&self) -> Option<SyscallReport> {
        // The audit line may lag the exit a little.
        for _ in 0..20 {
            if let Some(r) = seccomp_reports(self.pid)
                .into_iter()
                .rev()
                .find(|r| r.code == 0x8000_0000)
            {
                return Some(r);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        None
    }

    /// Every seccomp audit record of the program (log mode: each violation once per call
    /// site and rate limit of the kernel).
    pub fn seccomp_log(&self) -> Vec<SyscallReport> {
        seccomp_reports(self.pid)
    }
}

/// Seccomp audit records (`type=1326`) of `pid` in the kernel log.
pub fn seccomp_reports(pid: i32) -> Vec<SyscallReport> {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return vec![];
    };
    let needle = format!(" pid={pid} ");
    let mut out = Vec::new();
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let line = String::from_utf8_lossy(&buf[..n]);
                if !line.contains("type=1326") || !line.contains(&needle) {
                    continue;
                }
                let field = |k: &str| {
                    line.split_whitespace()
                        .find_map(|w| w.strip_prefix(k))
                        .map(str::to_string)
                };
                let nr = field("syscall=").and_then(|v| v.parse().ok());
                let code = field("code=")
                    .and_then(|v| u32::from_str_radix(v.trim_start_matches("0x"), 16).ok());
                if let (Some(nr), Some(code)) = (nr, code) {
                    out.push(SyscallReport {
                        nr,
                        name: syscall_name(nr),
                        code,
                    });
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue, // overwritten records
            Err(_) => break,                                             // EAGAIN: end
        }
    }
    out
}

/// The default stage: `hostmem jail-stage` next to the running executable (or the running
/// executable itself when it is `hostmem`).
pub fn default_stage() -> Result<(PathBuf, Vec<String>), Error> {
    let exe = std::env::current_exe().map_err(|e| Error::Launch(format!("current_exe: {e}")))?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    if exe.file_name().is_some_and(|n| n == "hostmem") {
        return Ok((exe, vec!["jail-stage".into()]));
    }
    for _ in 0..2 {
        let Some(d) = dir else { break };
        if d.join("hostmem").is_file() {
            return Ok((d.join("hostmem"), vec!["jail-stage".into()]));
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    Err(Error::Launch(
        "no jail stage: the hostmem binary was not found".into(),
    ))
}

/// Starts `cfg.program` jailed. Returns once the program has been exec'd (or with the step
/// that failed).
pub fn spawn(cfg: JailConfig) -> Result<JailedChild, Error> {
    let launch = |what: &str, e: &dyn std::fmt::Display| Error::Launch(format!("{what}: {e}"));
    let (stage_prog, stage_args) = match cfg.stage {
        Some(s) => s,
        None => default_stage()?,
    };
    let program = std::fs::File::open(&cfg.program)
        .map_err(|e| launch(&format!("opening {}", cfg.program.display()), &e))?;
    let mut keep = cfg.keep_fds;
    // Standard fds: a program's runtime (Rust's, glibc's) expects 0-2 open and would try
    // to open /dev/null itself, which the empty root does not have. 0 and 1 are /dev/null
    // opened here; 2 is our stderr (the device's log).
    for (target, path) in [(0, Some("/dev/null")), (1, Some("/dev/null")), (2, None)] {
        if keep.iter().any(|(_, t)| *t == target) {
            continue;
        }
        let fd: OwnedFd = match path {
            Some(p) => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .map_err(|e| launch(p, &e))?
                .into(),
            None => std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| launch("dup stderr", &e))?,
        };
        keep.push((fd, target));
    }
    let mut args = cfg.args;
    if let Some(prog) = &cfg.seccomp {
        let shm = SharedMemory::new("hostmem-seccomp", prog.len() as u64)
            .map_err(|e| launch("seccomp memfd", &e))?;
        let mut f = std::fs::File::from(shm.into_fd());
        f.write_all(prog).map_err(|e| launch("seccomp memfd", &e))?;
        // The device reads from the shared file offset: rewind.
        std::io::Seek::rewind(&mut f).map_err(|e| launch("seccomp memfd", &e))?;
        let n = keep.iter().map(|(_, t)| *t).max().unwrap_or(2) + 1;
        args.push("--seccomp-fd".into());
        args.push(n.to_string().into());
        keep.push((f.into(), n));
    }
    let mut argv = vec![cfg.program.as_os_str().as_bytes().to_vec()];
    argv.extend(args.iter().map(|a| a.as_bytes().to_vec()));
    let sc = StageConfig {
        program: cfg.program.clone(),
        args: argv,
        env: cfg
            .env
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
            .collect(),
        targets: keep.iter().map(|(_, t)| *t).collect(),
        namespaces: cfg.namespaces,
        ro_binds: cfg.ro_binds,
        rlimits: cfg.rlimits,
        uid: nix::unistd::getuid().as_raw(),
        gid: nix::unistd::getgid().as_raw(),
    };
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| launch("socketpair", &e))?;
    let mut stage = Command::new(&stage_prog)
        .args(&stage_args)
        .env_clear()
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| {
            launch(
                &format!("starting the jail stage {}", stage_prog.display()),
                &e,
            )
        })?;
    let json = serde_json::to_vec(&sc).map_err(|e| launch("config", &e))?;
    let mut fds: Vec<RawFd> = vec![program.as_raw_fd()];
    fds.extend(keep.iter().map(|(f, _)| f.as_raw_fd()));
    let sent = sendmsg::<()>(
        ours.as_raw_fd(),
        &[std::io::IoSlice::new(&json)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    );
    drop(keep);
    drop(program);
    let fail = |stage: &mut std::process::Child, e: Error| {
        let _ = stage.kill();
        let _ = stage.wait();
        e
    };
    if let Err(e) = sent {
        return Err(fail(
            &mut stage,
            launch("sending the config to the stage", &e),
        ));
    }
    let mut buf = vec![0u8; 4096];
    let n = match hostmem_base::fd::recv_with_fds(ours.as_fd(), &mut buf) {
        Ok(r) if r.len > 0 => r.len,
        Ok(_) => {
            return Err(fail(
                &mut stage,
                Error::Launch("the jail stage died before starting the program".into()),
            ))
        }
        Err(e) => return Err(fail(&mut stage, launch("reading the stage's report", &e))),
    };
    match serde_json::from_slice::<StageReport>(&buf[..n]) {
        Ok(StageReport::Started { pid }) => Ok(JailedChild { stage, pid }),
        Ok(StageReport::Failed { step, errno }) => Err(fail(
            &mut stage,
            Error::Launch(format!(
                "jail step '{step}' failed: {}",
                Errno::from_raw(errno)
            )),
        )),
        Err(e) => Err(fail(&mut stage, launch("stage report", &e))),
    }
}

/// A failed step in the stage or the child: its name and errno.
struct StepError(&'static str, Errno);

fn step<T>(name: &'static str, r: nix::Result<T>) -> Result<T, StepError> {
    r.map_err(|e| StepError(name, e))
}

fn io_step<T>(name: &'static str, r: std::io::Result<T>) -> Result<T, StepError> {
    r.map_err(|e| StepError(name, Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))
}

/// The stage's main (`hostmem jail-stage`): stdin is the socket from [`spawn`]. Returns
/// only on failure before the fork; afterwards it exits the way the program exits.
pub fn stage_main() -> i32 {
    let sock = match hostmem_base::fd::take_inherited(0) {
        Ok(s) => s,
        Err(_) => return 126,
    };
    let mut buf = vec![0u8; 64 * 1024];
    let Ok(msg) = hostmem_base::fd::recv_with_fds(sock.as_fd(), &mut buf) else {
        return 126;
    };
    let report = |r: &StageReport| {
        if let Ok(b) = serde_json::to_vec(r) {
            let _ = nix::sys::socket::send(sock.as_raw_fd(), &b, MsgFlags::MSG_NOSIGNAL);
        }
    };
    let Ok(cfg) = serde_json::from_slice::<StageConfig>(&buf[..msg.len]) else {
        report(&StageReport::Failed {
            step: "config".into(),
            errno: libc::EINVAL,
        });
        return 126;
    };
    let mut fds = msg.fds.into_iter();
    let (Some(program), true) = (fds.next(), cfg.targets.len() == fds.len()) else {
        report(&StageReport::Failed {
            step: "config fds".into(),
            errno: libc::EINVAL,
        });
        return 126;
    };
    let keep: Vec<(OwnedFd, RawFd)> = fds.zip(cfg.targets.iter().copied()).collect();
    match stage_run(&cfg, program, keep, &sock) {
        Ok(info) => match info {
            ExitInfo::Exited(c) => sandbox::exit_like(Some(c), None),
            ExitInfo::Signaled { signal, .. } => sandbox::exit_like(None, Some(signal)),
        },
        Err(StepError(s, e)) => {
            report(&StageReport::Failed {
                step: s.into(),
                errno: e as i32,
            });
            126
        }
    }
}

fn stage_run(
    cfg: &StageConfig,
    program: OwnedFd,
    keep: Vec<(OwnedFd, RawFd)>,
    sock: &OwnedFd,
) -> Result<ExitInfo, StepError> {
    use nix::sched::CloneFlags;
    step(
        "pdeathsig",
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL),
    )?;
    if cfg.namespaces {
        let flags = CloneFlags::CLONE_NEWUSER
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWNET
            | CloneFlags::CLONE_NEWIPC
            | CloneFlags::CLONE_NEWUTS;
        step("unshare", nix::sched::unshare(flags))?;
        io_step("setgroups", std::fs::write("/proc/self/setgroups", "deny"))?;
        io_step(
            "uid_map",
            std::fs::write("/proc/self/uid_map", format!("0 {} 1", cfg.uid)),
        )?;
        io_step(
            "gid_map",
            std::fs::write("/proc/self/gid_map", format!("0 {} 1", cfg.gid)),
        )?;
    }
    let (err_r, err_w) = step("pipe", nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC))?;
    let forked = sandbox::fork_single_threaded().map_err(|e| match e {
        sandbox::SandboxError::Fork(errno) => StepError("fork", errno),
        _ => StepError("fork (threads)", Errno::EBUSY),
    })?;
    match forked {
        Forked::Child => {
            drop(err_r);
            let err = match child_setup(cfg) {
                Ok(()) => {
                    let args = cfg
                        .args
                        .iter()
                        .filter_map(|a| CString::new(a.clone()).ok())
                        .collect();
                    let env = cfg
                        .env
                        .iter()
                        .filter_map(|(k, v)| {
                            CString::new([k.as_slice(), b"=", v.as_slice()].concat()).ok()
                        })
                        .collect();
                    sandbox::exec_jailed(ExecSpec {
                        program,
                        args,
                        env,
                        keep,
                        error_pipe: Some(err_w),
                    })
                }
                Err(e) => e,
            };
            let mut msg = (err.1 as i32).to_le_bytes().to_vec();
            msg.extend_from_slice(err.0.as_bytes());
            let _ = nix::unistd::write(&err_w, &msg);
            sandbox::exit_like(Some(127), None)
        }
        Forked::Parent(child) => {
            drop(err_w);
            drop(keep);
            drop(program);
            let mut f = std::fs::File::from(err_r);
            let mut buf = Vec::new();
            let _ = f.read_to_end(&mut buf);
            if buf.len() >= 4 {
                let errno = i32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]);
                let what = String::from_utf8_lossy(&buf[4..]).into_owned();
                let what = if what.is_empty() {
                    "exec".to_string()
                } else {
                    what
                };
                let r = StageReport::Failed { step: what, errno };
                let _ = nix::sys::socket::send(
                    sock.as_raw_fd(),
                    &serde_json::to_vec(&r).unwrap_or_default(),
                    MsgFlags::MSG_NOSIGNAL,
                );
                let _ = nix::sys::wait::waitpid(child, None);
                return Ok(ExitInfo::Exited(127));
            }
            let r = StageReport::Started {
                pid: child.as_raw(),
            };
            let _ = nix::sys::socket::send(
                sock.as_raw_fd(),
                &serde_json::to_vec(&r).unwrap_or_default(),
                MsgFlags::MSG_NOSIGNAL,
            );
            loop {
                match nix::sys::wait::waitpid(child, None) {
                    Ok(nix::sys::wait::WaitStatus::Exited(_, c)) => return Ok(ExitInfo::Exited(c)),
                    Ok(nix::sys::wait::WaitStatus::Signaled(_, s, core)) => {
                        return Ok(ExitInfo::Signaled {
                            signal: s as i32,
                            core,
                        })
                    }
                    Ok(_) | Err(Errno::EINTR) => continue,
                    Err(e) => return Err(StepError("waitpid", e)),
                }
            }
        }
    }
}

/// In the forked child (pid 1 of the new pid namespace): root, rlimits, capabilities,
/// no_new_privs.
fn child_setup(cfg: &StageConfig) -> Result<(), StepError> {
    use nix::mount::{mount, umount2, MntFlags, MsFlags};
    use nix::sys::resource::{setrlimit, Resource};
    step(
        "pdeathsig",
        nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL),
    )?;
    if cfg.namespaces {
        let none: Option<&str> = None;
        step(
            "make / private",
            mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none),
        )?;
        let root = Path::new("/tmp");
        step(
            "mount tmpfs root",
            mount(
                Some("tmpfs"),
                root,
                Some("tmpfs"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
                Some("size=1m,mode=0755"),
            ),
        )?;
        for p in &cfg.ro_binds {
            bind_ro(root, p)?;
        }
        io_step("mkdir /proc", std::fs::create_dir_all(root.join("proc")))?;
        step(
            "mount /proc",
            mount(
                Some("proc"),
                &root.join("proc"),
                Some("proc"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
                none,
            ),
        )?;
        step("chdir new root", nix::unistd::chdir(root))?;
        step("pivot_root", nix::unistd::pivot_root(".", "."))?;
        step("detach old root", umount2(".", MntFlags::MNT_DETACH))?;
        step("chdir /", nix::unistd::chdir("/"))?;
        step(
            "remount / read-only",
            mount(
                none,
                "/",
                none,
                MsFlags::MS_REMOUNT
                    | MsFlags::MS_BIND
                    | MsFlags::MS_RDONLY
                    | MsFlags::MS_NOSUID
                    | MsFlags::MS_NODEV,
                none,
            ),
        )?;
        step("sethostname", nix::unistd::sethostname("hostmem-device"))?;
    }
    let r = &cfg.rlimits;
    step(
        "RLIMIT_NOFILE",
        setrlimit(Resource::RLIMIT_NOFILE, r.nofile, r.nofile),
    )?;
    step(
        "RLIMIT_CORE",
        setrlimit(Resource::RLIMIT_CORE, r.core, r.core),
    )?;
    step(
        "RLIMIT_FSIZE",
        setrlimit(Resource::RLIMIT_FSIZE, r.fsize, r.fsize),
    )?;
    if let Some(a) = r.address_space {
        step("RLIMIT_AS", setrlimit(Resource::RLIMIT_AS, a, a))?;
    }
    if cfg.namespaces {
        sandbox::drop_all_capabilities().map_err(|e| match e {
            sandbox::SandboxError::Caps { op, errno } => StepError(op, errno),
            _ => StepError("capabilities", Errno::EPERM),
        })?;
    }
    hostmem_base::seccomp::set_no_new_privs().map_err(|e| match e {
        hostmem_base::seccomp::SeccompError::NoNewPrivs(errno) => StepError("no_new_privs", errno),
        _ => StepError("no_new_privs", Errno::EPERM),
    })?;
    Ok(())
}

/// Bind-mounts host path `p` read-only at the same path under `root`, recreating any
/// symlinks on the way (Debian's `/lib64 -> usr/lib64`).
fn bind_ro(root: &Path, p: &Path) -> Result<(), StepError> {
    use nix::mount::{mount, MsFlags};
    let mut prefix = PathBuf::from("/");
    for comp in p.components().skip(1) {
        prefix.push(comp);
        let meta = io_step("lstat bind path", std::fs::symlink_metadata(&prefix))?;
        let inside = root.join(prefix.strip_prefix("/").unwrap_or(&prefix));
        if meta.file_type().is_symlink() {
            let target = io_step("readlink", std::fs::read_link(&prefix))?;
            if std::fs::symlink_metadata(&inside).is_err() {
                if let Some(parent) = inside.parent() {
                    io_step("mkdir", std::fs::create_dir_all(parent))?;
                }
                io_step("symlink", std::os::unix::fs::symlink(&target, &inside))?;
            }
            let resolved = if target.is_absolute() {
                target
            } else {
                prefix.parent().unwrap_or(Path::new("/")).join(target)
            };
            let rest: PathBuf = p.components().skip(prefix.components().count()).collect();
            return bind_ro(root, &resolved.join(rest));
        }
    }
    let inside = root.join(p.strip_prefix("/").unwrap_or(p));
    let meta = io_step("stat bind source", std::fs::metadata(p))?;
    if meta.is_dir() {
        io_step("mkdir mount point", std::fs::create_dir_all(&inside))?;
    } else {
        if let Some(parent) = inside.parent() {
            io_step("mkdir", std::fs::create_dir_all(parent))?;
        }
        io_step(
            "create mount point",
            std::fs::File::create(&inside).map(drop),
        )?;
    }
    let none: Option<&str> = None;
    step(
        "bind mount",
        mount(
            Some(p),
            &inside,
            none,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            none,
        ),
    )?;
    step(
        "remount bind read-only",
        mount(
            none,
            &inside,
            none,
            MsFlags::MS_REMOUNT
                | MsFlags::MS_BIND
                | MsFlags::MS_RDONLY
                | MsFlags::MS_NOSUID
                | MsFlags::MS_NODEV,
            none,
        ),
    )?;
    Ok(())
}

/// What [`verify_jailed`] checked.
#[derive(Debug, Clone, Serialize)]
pub struct JailFacts {
    /// `Seccomp:` (2 = filter).
    pub seccomp: u32,
    /// `NoNewPrivs:`.
    pub no_new_privs: bool,
    /// `CapEff:`.
    pub cap_eff: u64,
    /// Namespaces that differ from ours.
    pub new_namespaces: Vec<String>,
}

/// Checks from outside that `pid` is jailed: seccomp filter on, no_new_privs, no effective
/// capabilities, and its own user, pid, mount, net, ipc and uts namespaces.
pub fn verify_jailed(pid: i32) -> Result<JailFacts, Error> {
    let st = hostmem_base::procfs::status_of(&pid.to_string())
        .map_err(|e| Error::Launch(e.to_string()))?;
    let mut new_ns = Vec::new();
    for ns in ["user", "pid", "mnt", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"));
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"));
        match (theirs, ours) {
            (Ok(t), Ok(o)) if t != o => new_ns.push(ns.to_string()),
            _ => {}
        }
    }
    let facts = JailFacts {
        seccomp: st.seccomp,
        no_new_privs: st.no_new_privs,
        cap_eff: st.cap_eff,
        new_namespaces: new_ns,
    };
    if facts.seccomp != 2
        || !facts.no_new_privs
        || facts.cap_eff != 0
        || facts.new_namespaces.len() != 6
    {
        return Err(Error::NotJailed(format!("pid {pid}: {facts:?}")));
    }
    Ok(facts)
}

/// The jailed program's first act: read the BPF program from `fd`, set no_new_privs and
/// install it. Nothing the program reads afterwards can run outside the filter.
pub fn child_install_seccomp(fd: RawFd) -> Result<(), Error> {
    let owned = hostmem_base::fd::take_inherited(fd).map_err(|e| Error::Seccomp(e.to_string()))?;
    let mut f = std::fs::File::from(owned);
    std::io::Seek::rewind(&mut f).map_err(|e| Error::Seccomp(format!("rewinding: {e}")))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)
        .map_err(|e| Error::Seccomp(format!("reading the program: {e}")))?;
    drop(f);
    let prog = hostmem_base::seccomp::program_from_bytes(&bytes)
        .map_err(|e| Error::Seccomp(e.to_string()))?;
    hostmem_base::seccomp::set_no_new_privs().map_err(|e| Error::Seccomp(e.to_string()))?;
    hostmem_base::seccomp::install_filter(&prog, false).map_err(|e| Error::Seccomp(e.to_string()))
}
