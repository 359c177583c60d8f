//! The jailed launch, minijail0-style, in one `clone(2)`.
//!
//! [`spawn`] prepares everything in the (possibly multi-threaded) caller: opens the
//! program and every bind-mount source before the root changes, builds argv/envp and the
//! list of root operations, and then `hostmem_base::sandbox::spawn_jailed` clones the child
//! into new user, pid, mount, net, ipc and uts namespaces. The parent writes the child's
//! `setgroups`/`uid_map`/`gid_map` (root inside = an unprivileged id outside: `nobody` when
//! we are root, else our own uid) and signals it through a pipe. The child (raw syscalls
//! only) makes `/` private, mounts a small tmpfs as its new root holding only the read-only
//! bind mounts (and a read-only `/proc` of its pid namespace, unless disabled), pivots into
//! it and detaches the old root, sets its hostname and rlimits, drops every capability
//! (bounding, ambient, effective/permitted/inheritable: `CapEff` is 0 after exec even as
//! uid 0 of the namespace), sets no_new_privs and PDEATHSIG, renumbers the kept fds and
//! closes everything else, and `execveat`s the program through its fd. A failure in any
//! step comes back over a CLOEXEC error pipe, so [`spawn`] returns
//! [`Error::LaunchStep`] naming it. The child is pid 1 of its pid namespace; we see its
//! real pid and reap it directly.
//!
//! Seccomp: with [`JailConfig::seccomp_at_exec`] (the device, the render server) the
//! launcher's child installs the filter as its last step before `execveat`, so the exec, the
//! dynamic loader and the runtime's start-up run filtered too. With
//! [`JailConfig::sigsys_reporter`] its kill actions become traps, it is installed with
//! `SECCOMP_FILTER_FLAG_LOG` (every trap leaves a kernel audit record naming the call, also
//! one before the program's handler exists) and the program installs the SIGSYS reporter as
//! its first act ([`child_install_sigsys_reporter`]). Otherwise the program installs the filter
//! itself ([`child_install_seccomp`], from a kept memfd named by `--seccomp-fd N`). The VMM
//! then checks `/proc/<pid>/status` and the namespaces from outside ([`verify_jailed`]).
//! [`JailConfig::cgroup`] puts the program in a (memory) cgroup before its first
//! instruction.
//!
//! **SIGSYS reporting.** With a seccomp program, the launcher also hands the child the write
//! end of a report pipe and names it in the environment ([`SIGSYS_FD_ENV`]).
//! [`child_install_seccomp`] then installs a SIGSYS handler and turns the program's kill
//! actions into `SECCOMP_RET_TRAP`: a forbidden call is not executed, the handler writes
//! the syscall number and its six arguments to the pipe with one raw `write`, and the call
//! is re-issued with SIGSYS at its default action, so the process still dies by SIGSYS.
//! That record is the program's own word, and a hostile program can write any record to the
//! pipe: [`JailedChild::sigsys_finding`] names the call from the kernel's audit record in
//! `/dev/kmsg` (the filter is installed with `SECCOMP_FILTER_FLAG_LOG`, so traps are logged
//! as kills are) and keeps the pipe's record apart as the program's claim
//! ([`SigsysFinding`]; `docs/decisions/036-kernel-record-over-device-claim.md`).
//!
//! **Log mode** (policy development: find what a policy is missing without dying on the
//! first call). The compiler turns kill actions into `SECCOMP_RET_LOG`. With the filter at
//! exec, the launcher turns those into `SECCOMP_RET_USER_NOTIF`, the child installs it with
//! `SECCOMP_FILTER_FLAG_NEW_LISTENER` and sends the listener over a socketpair before the
//! exec, and our thread serves it from the program's first call. Otherwise the launcher sets
//! [`SECCOMP_NOTIFY_ENV`] and [`child_install_seccomp`] turns those into
//! `SECCOMP_RET_USER_NOTIF`, installing the filter with a listener. A thread of ours takes a
//! copy of the listener out of the child with `pidfd_getfd` (found by its
//! `anon_inode:seccomp notify` link in `/proc/<pid>/fd`, so the child never has to send it
//! — its own `sendmsg` could be a notified call and would wait forever), records each
//! notified call with its arguments and answers `CONTINUE`, so the call runs as if allowed.
//! A call made before the thread holds the listener simply waits for it. The price is a
//! round trip per violating call, and the listener fd stays open in the child: log mode is
//! for development, not production. Programs that do not use [`child_install_seccomp`]
//! keep `SECCOMP_RET_LOG`, which the kernel logs by name only (read from `/dev/kmsg`).

use std::ffi::{CString, OsString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, IntoRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hostmem_base::sandbox::{self, JailPlan, RootOp, SigsysRecord, SpawnError, Step};
use hostmem_base::seccomp::{ListenerEvent, NotifyListener, SeccompError, SockFilter};
use hostmem_base::shm::SharedMemory;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The environment variable that tells [`child_install_seccomp`] which fd is the SIGSYS
/// report pipe.
pub const SIGSYS_FD_ENV: &str = "HOSTMEM_SIGSYS_FD";

/// The environment variable that tells [`child_install_seccomp`] to turn log actions into
/// user notifications (log mode, see the module doc).
pub const SECCOMP_NOTIFY_ENV: &str = "HOSTMEM_SECCOMP_NOTIFY";

/// `SECCOMP_RET_TRAP`.
const RET_TRAP: u32 = 0x0003_0000;
/// `SECCOMP_RET_KILL_PROCESS`.
const RET_KILL_PROCESS: u32 = 0x8000_0000;
/// `SECCOMP_RET_KILL_THREAD`.
const RET_KILL_THREAD: u32 = 0;
/// `SECCOMP_RET_LOG`.
const RET_LOG: u32 = 0x7ffc_0000;
/// `SECCOMP_RET_USER_NOTIF`.
const RET_USER_NOTIF: u32 = 0x7fc0_0000;
/// Distinct (syscall, arguments) records log mode keeps per program.
const MAX_NOTIFIED: usize = 4096;
/// How long log mode waits for the program to install its filter.
const LISTENER_WAIT: Duration = Duration::from_secs(10);

/// Resource limits for the jailed program.
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
    /// RLIMIT_DATA (private writable mappings and the heap), if limited.
    pub data: Option<u64>,
}

impl Default for Rlimits {
    fn default() -> Self {
        Rlimits {
            nofile: 1024,
            core: 0,
            fsize: u64::MAX,
            address_space: None,
            data: None,
        }
    }
}

/// How to jail and start a program.
#[derive(Debug)]
pub struct JailConfig {
    /// The program to jail (opened before the root changes, executed through its fd; must
    /// be an ELF executable, not a `#!` script).
    pub program: PathBuf,
    /// Its arguments (without `argv[0]`).
    pub args: Vec<OsString>,
    /// Fds to keep, with their number in the program. Everything else is closed. Fds 0 and
    /// 1 default to `/dev/null`, 2 to [`JailConfig::stderr`] (or our stderr).
    pub keep_fds: Vec<(OwnedFd, RawFd)>,
    /// The environment (cleared but for these; [`SIGSYS_FD_ENV`] is added with seccomp).
    pub env: Vec<(OsString, OsString)>,
    /// New namespaces, empty root, no capabilities. `false`: plain fork+exec with fd/env
    /// hygiene, rlimits and no_new_privs (for comparisons).
    pub namespaces: bool,
    /// Read-only bind mounts (same path inside), e.g. the dynamic loader's libraries.
    /// Symlinks on the way are recreated (Debian's `/lib64 -> usr/lib64`).
    pub ro_binds: Vec<PathBuf>,
    /// Mount a read-only `/proc` of the new pid namespace (the device counts its own VMAs).
    pub mount_proc: bool,
    /// Resource limits.
    pub rlimits: Rlimits,
    /// A compiled seccomp program (bytes of `hostmem_base::seccomp::program_to_bytes`),
    /// handed to the program as a kept memfd with `--seccomp-fd N` appended to its args.
    pub seccomp: Option<Vec<u8>>,
    /// The program was compiled in log mode (informational).
    pub seccomp_log: bool,
    /// Install [`JailConfig::seccomp`] in the launcher's child right before the exec
    /// (`JailPlan::exec_filter`), for a program that cannot install our filter itself (a
    /// foreign program such as virglrenderer's render server). The filter must then also
    /// allow the exec and the dynamic loader. No SIGSYS report and no log mode: a violation
    /// kills the program.
    pub seccomp_at_exec: bool,
    /// With [`JailConfig::seccomp_at_exec`]: the program installs the SIGSYS reporter
    /// itself as its first act ([`child_install_sigsys_reporter`]). Kill actions then become
    /// traps, a report pipe is handed over ([`SIGSYS_FD_ENV`]), and the filter is installed
    /// with `SECCOMP_FILTER_FLAG_LOG`, so a trap before the handler exists (in the loader or
    /// the runtime's start-up) still leaves the kernel's audit record that names the call.
    pub sigsys_reporter: bool,
    /// A cgroup directory (v1 `memory` controller, made by the caller) the program joins
    /// before it runs its first instruction: its memory limit.
    pub cgroup: Option<PathBuf>,
    /// Count the kernel's seccomp audit records of the processes the program forks (same
    /// executable, e.g. a server's workers) as its own ([`JailedChild::seccomp_log`]).
    pub audit_descendants: bool,
    /// The program's stderr (fd 2) unless `keep_fds` has one; `None` = ours.
    pub stderr: Option<OwnedFd>,
    /// The uid and gid outside that uid/gid 0 inside maps to; `None` = 65534 (`nobody`)
    /// when we are root, else our own ids.
    pub outside_ids: Option<(u32, u32)>,
}

impl Default for JailConfig {
    fn default() -> Self {
        JailConfig {
            program: PathBuf::new(),
            args: vec![],
            keep_fds: vec![],
            env: vec![],
            namespaces: false,
            ro_binds: vec![],
            mount_proc: true,
            rlimits: Rlimits::default(),
            seccomp: None,
            seccomp_log: false,
            seccomp_at_exec: false,
            sigsys_reporter: false,
            cgroup: None,
            audit_descendants: false,
            stderr: None,
            outside_ids: None,
        }
    }
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

/// A syscall seccomp stopped or logged, as one source tells it: the kernel (its audit
/// record, its seccomp notification) or the program itself (its SIGSYS handler's record,
/// which is only a claim: see [`SigsysFinding`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyscallReport {
    /// Syscall number.
    pub nr: u32,
    /// Its name.
    pub name: String,
    /// The six arguments, when the SIGSYS handler or the log-mode listener reported the
    /// call (the audit record has none).
    pub args: Option<[u64; 6]>,
    /// The seccomp action: 0x00030000 trap (handler record), 0x7fc00000 user notification
    /// (log-mode listener), 0x80000000 kill or 0x7ffc0000 log (audit records).
    pub code: u32,
    /// The audit arch (0xc000003e: x86-64), when the source names it.
    pub arch: Option<u32>,
    /// The address after the syscall instruction (the audit record's `ip=`, the handler's
    /// `si_call_addr`), when the source names it.
    pub ip: Option<u64>,
}

impl std::fmt::Display for SyscallReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (nr {})", self.name, self.nr)?;
        if let Some(a) = &self.args {
            write!(
                f,
                " args {:#x}, {:#x}, {:#x}, {:#x}, {:#x}, {:#x}",
                a[0], a[1], a[2], a[3], a[4], a[5]
            )?;
        }
        Ok(())
    }
}

/// The name of syscall `nr` as a SIGSYS record or a seccomp notification reports it: by
/// name for x86-64 (`AUDIT_ARCH_X86_64`), else the number and the arch.
fn report_name(nr: i32, arch: u32) -> String {
    if arch == 0xc000_003e {
        syscall_name(nr as u32)
    } else {
        format!("syscall_{nr} (arch {arch:#x})")
    }
}

/// The name of x86-64 syscall `nr`.
pub fn syscall_name(nr: u32) -> String {
    syscalls::Sysno::new(nr as usize)
        .map_or_else(|| format!("syscall_{nr}"), |s| s.name().to_string())
}

/// Turns SIGSYS handler records (raw bytes from the report pipe) into reports, in order.
pub fn sigsys_reports_from_bytes(bytes: &[u8]) -> Vec<SyscallReport> {
    bytes
        .chunks_exact(sandbox::SIGSYS_RECORD_LEN)
        .filter_map(SigsysRecord::parse)
        .map(|r| SyscallReport {
            nr: r.nr as u32,
            name: report_name(r.nr, r.arch),
            args: Some(r.args),
            code: RET_TRAP,
            arch: Some(r.arch),
            ip: Some(r.ip),
        })
        .collect()
}

/// What is known of the call seccomp stopped a program for (it died by SIGSYS): the
/// kernel's audit record is the fact; the record the program wrote to its SIGSYS report
/// pipe is only its claim. A hostile program writes what it likes to that pipe (a forged
/// `ptrace` while the real call was `fcntl`), or nothing; the kernel's record of the trap
/// or kill it cannot touch. Where the kernel's record cannot be read the call is unknown,
/// and the claim stays a claim (see `docs/decisions/036-kernel-record-over-device-claim.md`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SigsysFinding {
    /// The kernel's audit record (`type=1326` in `/dev/kmsg`) of the last call seccomp
    /// trapped or killed for this program: number, arch, ip and action, no arguments.
    pub kernel_record: Option<SyscallReport>,
    /// Why there is no kernel record, when there is none.
    pub kernel_record_unavailable: Option<String>,
    /// The last record the program wrote to its SIGSYS report pipe: number, arguments and
    /// ip as the program tells them. Never the fact.
    pub device_claim: Option<SyscallReport>,
}

impl SigsysFinding {
    /// The call seccomp stopped the program for, by the kernel's word (`None`: unknown).
    pub fn syscall(&self) -> Option<&SyscallReport> {
        self.kernel_record.as_ref()
    }

    /// Whether the program's claim names the kernel's call (number, and arch and ip where
    /// both name them); `None` unless both exist.
    pub fn claim_agrees(&self) -> Option<bool> {
        let (k, c) = (self.kernel_record.as_ref()?, self.device_claim.as_ref()?);
        let same = |a: Option<u64>, b: Option<u64>| a.zip(b).is_none_or(|(a, b)| a == b);
        Some(k.nr == c.nr && same(k.arch.map(u64::from), c.arch.map(u64::from)) && same(k.ip, c.ip))
    }
}

impl std::fmt::Display for SigsysFinding {
    /// The kernel's call as the fact, the program's record only as its claim, e.g.
    /// `fcntl (nr 72) at ip 0x7f…, per the kernel's audit record; its own claim disagrees:
    /// ptrace (nr 101) args …`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kernel_record {
            Some(k) => {
                write!(f, "{k}")?;
                if let Some(ip) = k.ip {
                    write!(f, " at ip {ip:#x}")?;
                }
                write!(f, ", per the kernel's audit record")?;
                match (&self.device_claim, self.claim_agrees()) {
                    (Some(c), Some(true)) => write!(f, "; its own claim agrees: {c}"),
                    (Some(c), _) => write!(f, "; its own claim disagrees: {c}"),
                    (None, _) => Ok(()),
                }
            }
            None => {
                write!(f, "syscall unknown: no kernel record (")?;
                write!(
                    f,
                    "{}",
                    self.kernel_record_unavailable
                        .as_deref()
                        .unwrap_or("not read")
                )?;
                write!(f, ")")?;
                match &self.device_claim {
                    Some(c) => write!(f, "; its own claim, unverified: {c}"),
                    None => write!(f, "; and no claim of its own"),
                }
            }
        }
    }
}

/// A running jailed program. Dropping it kills (SIGKILL) and reaps the program if it is
/// still running.
#[derive(Debug)]
pub struct JailedChild {
    pid: i32,
    status: Option<ExitInfo>,
    report: Option<OwnedFd>,
    records: Mutex<Vec<u8>>,
    notifier: Option<Notifier>,
    /// `/dev/kmsg`, opened at the end of the log before the spawn: only audit records
    /// written after it are read, so an older process that had the same pid is never
    /// blamed. The records read so far are kept (reading consumes them). `Err`: why it
    /// could not be opened.
    kmsg: Mutex<Result<KmsgState, String>>,
    /// The [`SigsysFinding`], once made for the reaped program (it cannot change then).
    finding: Mutex<Option<SigsysFinding>>,
    /// ` exe="<program>" `: audit records of forked processes running the same program
    /// count too ([`JailConfig::audit_descendants`]).
    exe_needle: Option<String>,
}

/// The log-mode listener thread of one program (see the module doc).
#[derive(Debug)]
struct Notifier {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<SyscallReport>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Notifier {
    /// Serves `pid`'s listener: `listener` if the launcher already holds it (a filter
    /// installed before the exec), else the one the program installs, taken from it.
    fn start(pid: i32, listener: Option<NotifyListener>) -> Result<Notifier, Error> {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), seen.clone());
        let thread = std::thread::Builder::new()
            .name(format!("seccomp-log-{pid}"))
            .spawn(move || serve_notifications(pid, listener, &s, &v))
            .map_err(|e| step_err("log-mode listener thread", errno_of(&e)))?;
        Ok(Notifier {
            stop,
            seen,
            thread: Some(thread),
        })
    }

    fn reports(&self) -> Vec<SyscallReport> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Stops the thread once the program is gone (no more notifications can come).
    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The fd number of the seccomp listener in `pid`'s fd table, if it has one.
fn find_listener_fd(pid: i32) -> Option<i32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.as_os_str().as_bytes() == b"anon_inode:seccomp notify")
        })
        .and_then(|e| e.file_name().to_str()?.parse().ok())
}

fn serve_notifications(
    pid: i32,
    given: Option<NotifyListener>,
    stop: &AtomicBool,
    seen: &Mutex<Vec<SyscallReport>>,
) {
    let t0 = Instant::now();
    let listener = if let Some(l) = given {
        l
    } else {
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            if let Some(fd) = find_listener_fd(pid) {
                match NotifyListener::take_from(pid, fd) {
                    Ok(l) => break l,
                    Err(e) => {
                        log::error!("seccomp log mode: pid {pid}: {e}; its calls outside the policy will wait until it is killed");
                        return;
                    }
                }
            }
            if t0.elapsed() > LISTENER_WAIT {
                log::warn!("seccomp log mode: pid {pid} installed no listener within {LISTENER_WAIT:?}; nothing to report");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    log::debug!("seccomp log mode: serving pid {pid}'s listener");
    let mut dropped = 0u64;
    loop {
        match listener.wait(100) {
            Ok(ListenerEvent::Ready) => {}
            Ok(ListenerEvent::Timeout) => {
                // The program may be stopped for good while still holding the filter
                // (a zombie never hangs up); the owner tells us.
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                continue;
            }
            Ok(ListenerEvent::Hangup) => break,
            Err(e) => {
                log::error!("seccomp log mode: pid {pid}: {e}");
                break;
            }
        }
        let n = match listener.recv() {
            Ok(n) => n,
            // The caller was interrupted or died between the poll and the receive.
            Err(SeccompError::Notify {
                errno: Errno::ENOENT,
                ..
            }) => continue,
            Err(e) => {
                log::error!("seccomp log mode: pid {pid}: {e}");
                break;
            }
        };
        let report = SyscallReport {
            nr: n.nr as u32,
            name: report_name(n.nr, n.arch),
            args: Some(n.args),
            code: RET_USER_NOTIF,
            arch: Some(n.arch),
            ip: None,
        };
        {
            let mut v = seen.lock().unwrap_or_else(|e| e.into_inner());
            if !v.contains(&report) {
                if v.len() < MAX_NOTIFIED {
                    if !v.iter().any(|r| r.nr == report.nr) {
                        log::warn!("seccomp log mode: pid {pid} (thread {}) called {report}: not allowed by the policy, let through", n.pid);
                    }
                    v.push(report);
                } else {
                    dropped += 1;
                }
            }
        }
        if let Err(e) = listener.continue_call(n.id) {
            log::error!("seccomp log mode: pid {pid}: answering call {}: {e}", n.id);
            break;
        }
    }
    if dropped > 0 {
        log::warn!("seccomp log mode: pid {pid}: {dropped} more distinct calls not recorded (limit {MAX_NOTIFIED})");
    }
}

fn errno_of(e: &std::io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

fn step_err(step: impl Into<String>, errno: Errno) -> Error {
    Error::LaunchStep {
        step: step.into(),
        errno,
    }
}

impl JailedChild {
    /// The program's pid in our pid namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Sends `signal` to the program. Note: it is pid 1 of its pid namespace, so only
    /// SIGKILL/SIGSTOP and signals it handles have an effect.
    pub fn kill(&self, signal: i32) {
        if self.status.is_none() {
            sandbox::kill(self.pid, signal);
        }
    }

    fn reaped(&mut self, ws: WaitStatus) -> Option<ExitInfo> {
        let info = match ws {
            WaitStatus::Exited(_, c) => ExitInfo::Exited(c),
            WaitStatus::Signaled(_, s, core) => ExitInfo::Signaled {
                signal: s as i32,
                core,
            },
            _ => return None,
        };
        self.status = Some(info);
        if let Some(n) = &mut self.notifier {
            n.finish();
        }
        Some(info)
    }

    /// The exit, if the program has ended (reaps it).
    pub fn try_wait(&mut self) -> Result<Option<ExitInfo>, Error> {
        if let Some(s) = self.status {
            return Ok(Some(s));
        }
        loop {
            match waitpid(Pid::from_raw(self.pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(ws) => return Ok(self.reaped(ws)),
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(step_err("waitpid", e)),
            }
        }
    }

    /// Waits for the program to end.
    pub fn wait(&mut self) -> Result<ExitInfo, Error> {
        if let Some(s) = self.status {
            return Ok(s);
        }
        loop {
            match waitpid(Pid::from_raw(self.pid), None) {
                Ok(ws) => {
                    if let Some(i) = self.reaped(ws) {
                        return Ok(i);
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(step_err("waitpid", e)),
            }
        }
    }

    /// Waits up to `t`.
    pub fn wait_timeout(&mut self, t: Duration) -> Result<Option<ExitInfo>, Error> {
        let t0 = Instant::now();
        let mut nap = Duration::from_micros(200);
        loop {
            if let Some(x) = self.try_wait()? {
                return Ok(Some(x));
            }
            if t0.elapsed() >= t {
                return Ok(None);
            }
            std::thread::sleep(nap);
            nap = (nap * 2).min(Duration::from_millis(10));
        }
    }

    fn drain_reports(&self) -> Vec<SyscallReport> {
        let mut rec = self.records.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(fd) = &self.report {
            let mut buf = [0u8; 4096];
            while let Ok(n) = nix::unistd::read(fd.as_raw_fd(), &mut buf) {
                if n == 0 {
                    break;
                }
                rec.extend_from_slice(&buf[..n]);
            }
        }
        sigsys_reports_from_bytes(&rec)
    }

    /// What is known of the call seccomp stopped the program for (call it once the program
    /// died by SIGSYS): the kernel's audit record of its last trapped or killed call (in
    /// `/dev/kmsg`; a trap is logged because the filter is installed with
    /// `SECCOMP_FILTER_FLAG_LOG`) as the fact, and the last record the program wrote to its
    /// SIGSYS report pipe as its claim only. Logs a warning when the two disagree. Made
    /// once for a reaped program (later calls return the same finding).
    pub fn sigsys_finding(&self) -> SigsysFinding {
        let mut cached = self.finding.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cached.as_ref() {
            return f.clone();
        }
        let claim = self.drain_reports().pop();
        // The kernel's last trap or kill (not an errno answer: filtered out when read).
        let last = |v: Vec<SyscallReport>| {
            v.into_iter().rev().find(|r| {
                matches!(
                    r.code & 0xffff_0000,
                    RET_TRAP | RET_KILL_PROCESS | RET_KILL_THREAD
                )
            })
        };
        // The audit line may lag the exit a little (the kernel's audit thread prints it;
        // more on a loaded machine). A record that contradicts the claim may yet be
        // followed by the fatal call's: wait the whole time for those.
        let mut kernel = None;
        let t0 = Instant::now();
        loop {
            kernel = last(self.kernel_reports()).or(kernel);
            let settled = match (&kernel, &claim) {
                (Some(k), Some(c)) => k.nr == c.nr,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if settled || t0.elapsed() >= KERNEL_RECORD_WAIT {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let unavailable = kernel.is_none().then(|| self.why_no_kernel_record());
        let finding = SigsysFinding {
            kernel_record: kernel,
            kernel_record_unavailable: unavailable,
            device_claim: claim,
        };
        if finding.claim_agrees() == Some(false) {
            if let (Some(k), Some(c)) = (&finding.kernel_record, &finding.device_claim) {
                log::warn!(
                    "jailed pid {}: the device's claim (its SIGSYS record: {c}) disagrees with \
                     the kernel's audit record ({k}): the kernel's is reported, the claim is \
                     not believed",
                    self.pid
                );
            }
        }
        if self.status.is_some() {
            *cached = Some(finding.clone());
        }
        finding
    }

    /// Why the kernel's record of the program's seccomp stop is not there.
    fn why_no_kernel_record(&self) -> String {
        let k = self.kmsg.lock().unwrap_or_else(|p| p.into_inner());
        let state = match k.as_ref() {
            Err(why) => return format!("/dev/kmsg could not be read: {why}"),
            Ok(s) => s,
        };
        // Traps when the launcher set up the SIGSYS reporter, else kills.
        let action = if self.report.is_some() {
            "trap"
        } else {
            "kill_process"
        };
        let logged = std::fs::read_to_string("/proc/sys/kernel/seccomp/actions_logged");
        if let Ok(l) = &logged {
            if !l.split_whitespace().any(|a| a == action) {
                return format!(
                    "the kernel does not log seccomp's {action} action here \
                     (/proc/sys/kernel/seccomp/actions_logged: {})",
                    l.trim()
                );
            }
        }
        let mut why = format!(
            "no seccomp audit record (type=1326) of pid {} in /dev/kmsg within {} ms",
            self.pid,
            KERNEL_RECORD_WAIT.as_millis()
        );
        if state.suppressed {
            why.push_str(
                ": the kernel suppressed audit records meanwhile (its printk rate limit), \
                 this one may be among them",
            );
        } else {
            why.push_str(
                " (an audit daemon, if one runs, takes the records instead; or the SIGSYS \
                 did not come from seccomp)",
            );
        }
        why
    }

    /// Every violation the kernel reported for the program: the log-mode listener's records
    /// (each distinct call with its arguments), then the kernel's seccomp audit records (a
    /// trap, a kill, `SECCOMP_RET_LOG` of programs without the listener, as far as the
    /// kernel's rate limit and audit backlog let them through). Not the program's own
    /// SIGSYS records: those are claims ([`JailedChild::sigsys_finding`]).
    pub fn seccomp_log(&self) -> Vec<SyscallReport> {
        let mut v = Vec::new();
        if let Some(n) = &self.notifier {
            v.extend(n.reports());
        }
        v.extend(self.kernel_reports());
        v
    }

    /// The kernel's seccomp audit records of this program so far (since the spawn).
    fn kernel_reports(&self) -> Vec<SyscallReport> {
        let mut k = self.kmsg.lock().unwrap_or_else(|p| p.into_inner());
        match k.as_mut() {
            Ok(s) => {
                let (new, suppressed) =
                    seccomp_reports_from(&mut s.file, self.pid, self.exe_needle.as_deref());
                s.seen.extend(new);
                s.suppressed |= suppressed;
                s.seen.clone()
            }
            Err(_) => vec![],
        }
    }
}

/// How long [`JailedChild::sigsys_finding`] waits for the kernel's audit record.
const KERNEL_RECORD_WAIT: Duration = Duration::from_millis(500);

/// `/dev/kmsg` read from the spawn on, and what it said so far about one program.
#[derive(Debug)]
struct KmsgState {
    file: std::fs::File,
    /// The program's seccomp audit records read so far.
    seen: Vec<SyscallReport>,
    /// The kernel said it suppressed (rate limit) or lost audit records meanwhile.
    suppressed: bool,
}

impl Drop for JailedChild {
    fn drop(&mut self) {
        if self.status.is_none() {
            sandbox::kill(self.pid, libc::SIGKILL);
            let _ = self.wait();
        }
        if let Some(n) = &mut self.notifier {
            n.finish();
        }
    }
}

/// `/dev/kmsg` positioned at the end of the log (`Err`: why it cannot be read).
fn kmsg_at_end() -> Result<KmsgState, String> {
    use std::io::Seek;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .map_err(|e| format!("opening it: {e}"))?;
    f.seek(std::io::SeekFrom::End(0))
        .map_err(|e| format!("seeking to its end: {e}"))?;
    Ok(KmsgState {
        file: f,
        seen: vec![],
        suppressed: false,
    })
}

/// The kernel's seccomp audit record (`type=1326`) in one `/dev/kmsg` record, if it is one
/// of `pid` (or, with `exe`, of any process whose record names that executable). Only
/// records the kernel wrote count: a record written to `/dev/kmsg` from user space carries
/// a user facility (the kernel forces `LOG_USER` on those), the kernel's own facility 0.
fn seccomp_record(line: &str, pid: i32, exe: Option<&str>) -> Option<SyscallReport> {
    let (prefix, text) = line.split_once(';')?;
    let prio: u32 = prefix.split(',').next()?.parse().ok()?;
    if prio >> 3 != 0 || !text.starts_with("audit: type=1326 ") {
        return None;
    }
    let field = |k: &str| text.split_whitespace().find_map(|w| w.strip_prefix(k));
    let ours =
        field("pid=") == Some(pid.to_string().as_str()) || exe.is_some_and(|e| text.contains(e));
    if !ours {
        return None;
    }
    let hex = |v: &str| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok();
    let nr: u32 = field("syscall=")?.parse().ok()?;
    let code = u32::try_from(hex(field("code=")?)?).ok()?;
    let arch = field("arch=")
        .and_then(hex)
        .and_then(|a| u32::try_from(a).ok());
    Some(SyscallReport {
        nr,
        name: match arch {
            Some(a) => report_name(nr as i32, a),
            None => syscall_name(nr),
        },
        args: None,
        code,
        arch,
        ip: field("ip=").and_then(hex),
    })
}

/// Seccomp audit records of `pid` (see [`seccomp_record`]) in the kernel log, from `f`'s
/// position on (reading consumes them), and whether the kernel said meanwhile that it
/// suppressed or lost audit records.
fn seccomp_reports_from(
    f: &mut std::fs::File,
    pid: i32,
    exe: Option<&str>,
) -> (Vec<SyscallReport>, bool) {
    let mut out = Vec::new();
    let mut suppressed = false;
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let line = String::from_utf8_lossy(&buf[..n]);
                suppressed |= line.contains("kauditd_printk_skb") && line.contains("suppressed")
                    || line.contains("audit: audit_lost=");
                let Some(r) = seccomp_record(&line, pid, exe) else {
                    continue;
                };
                // An errno answer is the policy's decision, not a violation; the kernel
                // audits those too for a filter installed with SECCOMP_FILTER_FLAG_LOG.
                if r.code & 0xffff_0000 == 0x0005_0000 {
                    continue;
                }
                out.push(r);
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue, // overwritten records
            Err(_) => break,                                             // EAGAIN: end
        }
    }
    (out, suppressed)
}

fn cstring(b: &[u8], what: &str) -> Result<CString, Error> {
    CString::new(b).map_err(|_| step_err(format!("{what}: NUL byte"), Errno::EINVAL))
}

fn cpath(p: &Path) -> Result<CString, Error> {
    cstring(p.as_os_str().as_bytes(), &p.display().to_string())
}

/// Host directories the new root's tmpfs may be mounted over (in the child's private mount
/// namespace only): the first that exists, is not a symlink and holds no bind source.
const ROOT_CANDIDATES: [&str; 8] = [
    "/tmp", "/mnt", "/media", "/srv", "/opt", "/var/tmp", "/run", "/home",
];

fn pick_new_root(sources: &[PathBuf]) -> Result<PathBuf, Error> {
    ROOT_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|c| {
            std::fs::symlink_metadata(c).is_ok_and(|m| m.is_dir())
                && !sources.iter().any(|s| s.starts_with(c))
        })
        .ok_or_else(|| step_err("no directory to mount the new root on", Errno::ENOENT))
}

/// Plans the root: ops that recreate bind paths (read-only) inside `root`, with the
/// symlinks on their way.
struct RootPlan {
    ops: Vec<RootOp>,
    /// What each op concerns (the path inside the jail), for error messages.
    names: Vec<String>,
    /// The host paths bound (symlinks resolved).
    sources: Vec<PathBuf>,
    made: std::collections::HashSet<PathBuf>,
}

impl RootPlan {
    fn push(&mut self, op: RootOp, name: &Path) {
        self.ops.push(op);
        self.names.push(name.display().to_string());
    }

    fn mkdirs(&mut self, root: &Path, inside: &Path) -> Result<(), Error> {
        let mut prefix = PathBuf::from("/");
        for c in inside.components().skip(1) {
            prefix.push(c);
            if self.made.insert(prefix.clone()) {
                let host = root.join(prefix.strip_prefix("/").unwrap_or(&prefix));
                self.push(RootOp::Mkdir(cpath(&host)?), &prefix);
            }
        }
        Ok(())
    }

    fn bind_ro(&mut self, root: &Path, p: &Path, depth: usize) -> Result<(), Error> {
        if !p.is_absolute() || depth > 16 {
            return Err(step_err(
                format!("bind path {}", p.display()),
                Errno::EINVAL,
            ));
        }
        let mut prefix = PathBuf::from("/");
        let comps: Vec<_> = p.components().skip(1).collect();
        for (i, comp) in comps.iter().enumerate() {
            prefix.push(comp);
            let meta = std::fs::symlink_metadata(&prefix).map_err(|e| {
                step_err(
                    format!("lstat bind path {}", prefix.display()),
                    errno_of(&e),
                )
            })?;
            if !meta.file_type().is_symlink() {
                continue;
            }
            let target = std::fs::read_link(&prefix)
                .map_err(|e| step_err(format!("readlink {}", prefix.display()), errno_of(&e)))?;
            if let Some(parent) = prefix.parent() {
                self.mkdirs(root, parent)?;
            }
            if self.made.insert(prefix.clone()) {
                let host = root.join(prefix.strip_prefix("/").unwrap_or(&prefix));
                self.push(
                    RootOp::Symlink {
                        target: cpath(&target)?,
                        path: cpath(&host)?,
                    },
                    &prefix,
                );
            }
            let resolved = if target.is_absolute() {
                target
            } else {
                prefix.parent().unwrap_or(Path::new("/")).join(target)
            };
            let rest: PathBuf = comps[i + 1..].iter().collect();
            let next = normalize(&resolved.join(rest));
            return self.bind_ro(root, &next, depth + 1);
        }
        let is_dir = std::fs::metadata(p)
            .map_err(|e| step_err(format!("stat bind source {}", p.display()), errno_of(&e)))?
            .is_dir();
        let host = root.join(p.strip_prefix("/").unwrap_or(p));
        if is_dir {
            self.mkdirs(root, p)?;
        } else {
            if let Some(parent) = p.parent() {
                self.mkdirs(root, parent)?;
            }
            self.push(RootOp::Touch(cpath(&host)?), p);
        }
        self.push(
            RootOp::BindRo {
                src: cpath(p)?,
                dst: cpath(&host)?,
            },
            p,
        );
        self.sources.push(p.to_path_buf());
        Ok(())
    }
}

/// Removes `.` and resolves `..` lexically (symlink targets like `../usr/lib`).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

fn describe_step(e: &SpawnError, names: &[String], rlimit_names: &[&str]) -> String {
    let base = e.step.name();
    match (e.step, e.index) {
        (
            Step::Mkdir
            | Step::Symlink
            | Step::Touch
            | Step::Bind
            | Step::RemountBindRo
            | Step::MountProc,
            Some(i),
        ) => format!("{base} {}", names.get(i).map(String::as_str).unwrap_or("?")),
        (Step::Rlimit, Some(i)) => {
            format!("{base} {}", rlimit_names.get(i).copied().unwrap_or("?"))
        }
        (Step::CapBoundingDrop, Some(i)) => format!("{base} cap {i}"),
        _ => base.to_string(),
    }
}

/// Starts `cfg.program` jailed. Returns once the program has been exec'd, or with
/// [`Error::LaunchStep`] naming the step that failed.
pub fn spawn(cfg: JailConfig) -> Result<JailedChild, Error> {
    let program = std::fs::File::open(&cfg.program).map_err(|e| {
        step_err(
            format!("open program {}", cfg.program.display()),
            errno_of(&e),
        )
    })?;
    let mut keep = cfg.keep_fds;
    // Standard fds: a program's runtime (Rust's, glibc's) expects 0-2 open and would try to
    // open /dev/null itself, which the empty root does not have (and a pid-namespace init
    // ignores the resulting SIGABRT). 0 and 1 are /dev/null, 2 the given stderr or ours.
    let mut stderr = cfg.stderr;
    for target in 0..3 {
        if keep.iter().any(|(_, t)| *t == target) {
            continue;
        }
        let fd: OwnedFd = match (target, stderr.take()) {
            (2, Some(fd)) => fd,
            (2, None) => std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| step_err("dup stderr", errno_of(&e)))?,
            _ => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(|e| step_err("open /dev/null", errno_of(&e)))?
                .into(),
        };
        keep.push((fd, target));
    }
    let mut args = cfg.args;
    let mut env = cfg.env;
    let mut report = None;
    let mut exec_filter = None;
    let mut exec_filter_flags = 0u32;
    let mut listener_socket = None;
    let mut listener_ours = None;
    let report_pipe = |keep: &mut Vec<(OwnedFd, RawFd)>,
                       env: &mut Vec<(OsString, OsString)>|
     -> Result<OwnedFd, Error> {
        let n = keep.iter().map(|(_, t)| *t).max().unwrap_or(2) + 1;
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
            .map_err(|e| step_err("report pipe", e))?;
        keep.push((w, n));
        env.push((SIGSYS_FD_ENV.into(), n.to_string().into()));
        Ok(r)
    };
    if let (Some(prog), true) = (&cfg.seccomp, cfg.seccomp_at_exec) {
        let mut filter = hostmem_base::seccomp::program_from_bytes(prog)
            .map_err(|e| step_err(format!("seccomp program: {e}"), Errno::EINVAL))?;
        if cfg.seccomp_log {
            // Log mode: the child installs the filter with a listener and sends it to us
            // before the exec; our thread serves it from the program's first call on.
            logs_to_notifications(&mut filter);
            exec_filter_flags |= libc::SECCOMP_FILTER_FLAG_NEW_LISTENER as u32;
            let (ours, theirs) = nix::sys::socket::socketpair(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::SeqPacket,
                None,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            )
            .map_err(|e| step_err("listener socketpair", e))?;
            listener_socket = Some(theirs);
            listener_ours = Some(ours);
        } else if cfg.sigsys_reporter {
            kills_to_traps(&mut filter);
            exec_filter_flags |= libc::SECCOMP_FILTER_FLAG_LOG as u32;
            report = Some(report_pipe(&mut keep, &mut env)?);
        }
        exec_filter = Some(filter);
    } else if let Some(prog) = &cfg.seccomp {
        let shm = SharedMemory::new("hostmem-seccomp", prog.len() as u64)
            .map_err(|e| step_err(format!("seccomp memfd: {e}"), Errno::EIO))?;
        let mut f = std::fs::File::from(shm.into_fd());
        f.write_all(prog)
            .and_then(|_| std::io::Seek::rewind(&mut f))
            .map_err(|e| step_err("write seccomp memfd", errno_of(&e)))?;
        let n = keep.iter().map(|(_, t)| *t).max().unwrap_or(2) + 1;
        args.push("--seccomp-fd".into());
        args.push(n.to_string().into());
        keep.push((f.into(), n));
        report = Some(report_pipe(&mut keep, &mut env)?);
        if cfg.seccomp_log {
            env.push((SECCOMP_NOTIFY_ENV.into(), "1".into()));
        }
    }
    let cgroup_procs = match &cfg.cgroup {
        Some(dir) => Some(
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
                .map_err(|e| {
                    step_err(format!("open {}/cgroup.procs", dir.display()), errno_of(&e))
                })?,
        ),
        None => None,
    };
    let mut argv = vec![cpath(&cfg.program)?];
    for a in &args {
        argv.push(cstring(a.as_bytes(), "argument")?);
    }
    let envp = env
        .iter()
        .map(|(k, v)| cstring(&[k.as_bytes(), b"=", v.as_bytes()].concat(), "environment"))
        .collect::<Result<Vec<_>, _>>()?;
    let plan_root = |root: &Path| -> Result<RootPlan, Error> {
        let mut rp = RootPlan {
            ops: vec![],
            names: vec![],
            sources: vec![],
            made: Default::default(),
        };
        if cfg.namespaces {
            for p in &cfg.ro_binds {
                rp.bind_ro(root, p, 0)?;
            }
            if cfg.mount_proc {
                rp.mkdirs(root, Path::new("/proc"))?;
                rp.push(RootOp::Proc(cpath(&root.join("proc"))?), Path::new("/proc"));
            }
        }
        Ok(rp)
    };
    // Plan once to learn the bind sources, then again under a root that hides none.
    let root = pick_new_root(&plan_root(Path::new("/"))?.sources)?;
    let rp = plan_root(&root)?;
    let r = cfg.rlimits;
    let mut rlimits = vec![
        (libc::RLIMIT_NOFILE, r.nofile),
        (libc::RLIMIT_CORE, r.core),
        (libc::RLIMIT_FSIZE, r.fsize),
    ];
    let mut rlimit_names = vec!["RLIMIT_NOFILE", "RLIMIT_CORE", "RLIMIT_FSIZE"];
    if let Some(a) = r.address_space {
        rlimits.push((libc::RLIMIT_AS, a));
        rlimit_names.push("RLIMIT_AS");
    }
    if let Some(d) = r.data {
        rlimits.push((libc::RLIMIT_DATA, d));
        rlimit_names.push("RLIMIT_DATA");
    }
    let euid = nix::unistd::geteuid().as_raw();
    let outside_ids = cfg.outside_ids.unwrap_or(if euid == 0 {
        (65534, 65534)
    } else {
        (euid, nix::unistd::getegid().as_raw())
    });
    let cap_last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(63);
    let plan = JailPlan {
        namespaces: cfg.namespaces,
        outside_ids,
        new_root: cpath(&root)?,
        root_options: c"size=1m,mode=0755,nr_inodes=4096".to_owned(),
        root_ops: rp.ops,
        hostname: c"hostmem-jail".to_owned(),
        rlimits,
        cap_last_cap,
        program: program.into(),
        argv,
        envp,
        keep,
        exec_filter,
        exec_filter_flags,
        listener_socket,
        cgroup_procs,
    };
    let kmsg = kmsg_at_end();
    let exe_needle = cfg.audit_descendants.then(|| {
        let exe = std::fs::canonicalize(&cfg.program).unwrap_or_else(|_| cfg.program.clone());
        format!(" exe=\"{}\" ", exe.display())
    });
    let t0 = Instant::now();
    let pid = sandbox::spawn_jailed(&plan).map_err(|e| Error::LaunchStep {
        step: describe_step(&e, &rp.names, &rlimit_names),
        errno: e.errno,
    })?;
    log::debug!(
        "jailed {} as pid {pid} in {:?}",
        cfg.program.display(),
        t0.elapsed()
    );
    drop(plan); // our copies of the kept fds and the program
    let mut child = JailedChild {
        pid,
        status: None,
        report,
        records: Mutex::new(vec![]),
        notifier: None,
        kmsg: Mutex::new(kmsg),
        finding: Mutex::new(None),
        exe_needle,
    };
    if cfg.seccomp_log && cfg.seccomp.is_some() {
        // On failure `child` is dropped: killed and reaped.
        let listener = match listener_ours {
            Some(sock) => {
                // Sent before the exec, which spawn_jailed has seen happen: it is queued.
                let got = hostmem_base::fd::try_recv_with_fds(sock.as_fd(), &mut [0u8; 1])
                    .map_err(|e| step_err("receiving the seccomp listener", e))?;
                let fd = got.fds.into_iter().next().ok_or_else(|| {
                    step_err("receiving the seccomp listener: no fd", Errno::EBADMSG)
                })?;
                Some(NotifyListener::new(fd))
            }
            None => None,
        };
        child.notifier = Some(Notifier::start(pid, listener)?);
    }
    Ok(child)
}

/// What [`verify_jailed`] checked.
#[derive(Debug, Clone, Serialize)]
pub struct JailFacts {
    /// `Seccomp:` (2 = filter).
    pub seccomp: u32,
    /// `Seccomp_filters:`: 1 at start-up (the launch policy), 2 once the device stacked
    /// its run-time filter ([`crate::runtime`]).
    pub seccomp_filters: u32,
    /// `NoNewPrivs:`.
    pub no_new_privs: bool,
    /// `CapEff:`.
    pub cap_eff: u64,
    /// `CapPrm:`.
    pub cap_prm: u64,
    /// `CapBnd:`.
    pub cap_bnd: u64,
    /// `CapAmb:`.
    pub cap_amb: u64,
    /// Namespaces that differ from ours.
    pub new_namespaces: Vec<String>,
}

/// The namespaces a jailed program must not share with us.
pub const JAIL_NAMESPACES: [&str; 6] = ["user", "pid", "mnt", "net", "ipc", "uts"];

/// Reads the jail facts of `pid` from `/proc` without judging them.
pub fn jail_facts(pid: i32) -> Result<JailFacts, Error> {
    let st = hostmem_base::procfs::status_of(&pid.to_string())
        .map_err(|e| Error::NotJailed(e.to_string()))?;
    let mut new_ns = Vec::new();
    for ns in JAIL_NAMESPACES {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"));
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"));
        match (theirs, ours) {
            (Ok(t), Ok(o)) if t != o => new_ns.push(ns.to_string()),
            (Err(e), _) | (_, Err(e)) => {
                return Err(Error::NotJailed(format!("pid {pid}: ns/{ns}: {e}")))
            }
            _ => {}
        }
    }
    Ok(JailFacts {
        seccomp: st.seccomp,
        seccomp_filters: st.seccomp_filters,
        no_new_privs: st.no_new_privs,
        cap_eff: st.cap_eff,
        cap_prm: st.cap_prm,
        cap_bnd: st.cap_bnd,
        cap_amb: st.cap_amb,
        new_namespaces: new_ns,
    })
}

/// Checks from outside that `pid` is jailed: seccomp filter on (`Seccomp: 2`),
/// no_new_privs, no capabilities (effective, permitted, ambient, bounding), and its own
/// user, pid, mount, net, ipc and uts namespaces.
pub fn verify_jailed(pid: i32) -> Result<JailFacts, Error> {
    let facts = jail_facts(pid)?;
    if facts.seccomp != 2
        || !facts.no_new_privs
        || facts.cap_eff != 0
        || facts.cap_prm != 0
        || facts.cap_amb != 0
        || facts.cap_bnd != 0
        || facts.new_namespaces.len() != JAIL_NAMESPACES.len()
    {
        return Err(Error::NotJailed(format!("pid {pid}: {facts:?}")));
    }
    Ok(facts)
}

/// Turns every `SECCOMP_RET_LOG` of `prog` into `SECCOMP_RET_USER_NOTIF` (log mode with
/// arguments, see the module doc). Returns how many were changed.
pub fn logs_to_notifications(prog: &mut [SockFilter]) -> usize {
    const BPF_RET_K: u16 = 0x06;
    let mut n = 0;
    for i in prog.iter_mut() {
        if i.code == BPF_RET_K && i.k & 0xffff_0000 == RET_LOG {
            i.k = RET_USER_NOTIF;
            n += 1;
        }
    }
    n
}

/// Turns every kill action (`SECCOMP_RET_KILL_PROCESS`, `_KILL_THREAD`) of `prog` into
/// `SECCOMP_RET_TRAP`, for the SIGSYS reporter. Returns how many were changed.
pub fn kills_to_traps(prog: &mut [SockFilter]) -> usize {
    const BPF_RET_K: u16 = 0x06;
    let mut n = 0;
    for i in prog.iter_mut() {
        let action = i.k & 0xffff_0000;
        if i.code == BPF_RET_K && (action == 0x8000_0000 || action == 0) {
            i.k = RET_TRAP;
            n += 1;
        }
    }
    n
}

/// The first act of a program whose filter the launcher installed before the exec
/// ([`JailConfig::seccomp_at_exec`] with [`JailConfig::sigsys_reporter`]): if the launcher
/// named a SIGSYS report fd ([`SIGSYS_FD_ENV`]), install the SIGSYS handler that reports a
/// trapped call (number and arguments) on it before the process dies by SIGSYS. Needs
/// `rt_sigaction(SIGSYS)` and `rt_sigprocmask` in the policy. Without the variable (no
/// filter, or log mode) it does nothing.
pub fn child_install_sigsys_reporter() -> Result<(), Error> {
    let Some(rfd) = std::env::var(SIGSYS_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
    else {
        return Ok(());
    };
    let owned = hostmem_base::fd::take_inherited(rfd)
        .map_err(|e| Error::Seccomp(format!("report fd {rfd}: {e}")))?;
    // The handler writes to it for the rest of the process's life.
    let rfd = owned.into_raw_fd();
    sandbox::install_sigsys_reporter(rfd)
        .map_err(|e| Error::Seccomp(format!("SIGSYS handler: {e}")))
}

/// The jailed program's first act: read the BPF program from `fd`, close it, set
/// no_new_privs and install the filter. If the launcher named a SIGSYS report fd
/// ([`SIGSYS_FD_ENV`]), a SIGSYS handler is installed first and kill actions become traps,
/// so a forbidden call is reported (number and arguments) before the process dies by
/// SIGSYS. In log mode ([`SECCOMP_NOTIFY_ENV`]) log actions become user notifications and
/// the filter gets a listener, which the launcher's thread takes (see the module doc).
/// Nothing the program reads afterwards can run outside the filter.
pub fn child_install_seccomp(fd: RawFd) -> Result<(), Error> {
    let owned = hostmem_base::fd::take_inherited(fd).map_err(|e| Error::Seccomp(e.to_string()))?;
    let mut f = std::fs::File::from(owned);
    std::io::Seek::rewind(&mut f).map_err(|e| Error::Seccomp(format!("rewinding: {e}")))?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)
        .map_err(|e| Error::Seccomp(format!("reading the program: {e}")))?;
    drop(f);
    let mut prog = hostmem_base::seccomp::program_from_bytes(&bytes)
        .map_err(|e| Error::Seccomp(e.to_string()))?;
    let report_fd = std::env::var(SIGSYS_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok());
    if let Some(rfd) = report_fd {
        let owned = hostmem_base::fd::take_inherited(rfd)
            .map_err(|e| Error::Seccomp(format!("report fd {rfd}: {e}")))?;
        // The handler writes to it for the rest of the process's life.
        let rfd = owned.into_raw_fd();
        sandbox::install_sigsys_reporter(rfd)
            .map_err(|e| Error::Seccomp(format!("SIGSYS handler: {e}")))?;
        let n = kills_to_traps(&mut prog);
        log::debug!("seccomp: {n} kill actions report through fd {rfd}");
    }
    hostmem_base::seccomp::set_no_new_privs().map_err(|e| Error::Seccomp(e.to_string()))?;
    if std::env::var_os(SECCOMP_NOTIFY_ENV).is_some() {
        let n = logs_to_notifications(&mut prog);
        let listener = hostmem_base::seccomp::install_filter_with_listener(&prog)
            .map_err(|e| Error::Seccomp(e.to_string()))?;
        // Stays open for the process's life: the launcher takes its copy with pidfd_getfd.
        let lfd = listener.into_raw_fd();
        log::debug!("seccomp log mode: {n} log actions notify through listener fd {lfd}");
        return Ok(());
    }
    if report_fd.is_some() {
        // Logged, so that the kernel's audit record names a trapped call: the handler's
        // record is only the program's claim.
        return hostmem_base::seccomp::install_filter_logged(&prog, false)
            .map_err(|e| Error::Seccomp(e.to_string()));
    }
    hostmem_base::seccomp::install_filter(&prog, false).map_err(|e| Error::Seccomp(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRAP: &str = "5,339,154644855,-;audit: type=1326 audit(1796685535.009:1): \
        auid=4294967295 uid=0 gid=0 ses=4294967295 pid=4254 comm=\"p\" exe=\"/tmp/p\" sig=0 \
        arch=c000003e syscall=72 compat=0 ip=0x7f7a8e313829 code=0x30000";

    #[test]
    fn the_kernels_seccomp_record_is_read_with_its_arch_and_ip() {
        let r = seccomp_record(TRAP, 4254, None).expect("a record of pid 4254");
        assert_eq!(r.name, "fcntl");
        assert_eq!((r.nr, r.code), (72, RET_TRAP));
        assert_eq!(r.arch, Some(0xc000_003e));
        assert_eq!(r.ip, Some(0x7f7a_8e31_3829));
        assert_eq!(r.args, None, "the audit record has no arguments");
        assert_eq!(seccomp_record(TRAP, 425, None), None, "another pid");
        assert_eq!(seccomp_record(TRAP, 42545, None), None, "another pid");
    }

    #[test]
    fn a_record_written_to_kmsg_from_user_space_is_not_the_kernels() {
        // /dev/kmsg gives whatever user space writes the LOG_USER facility (prefix >= 8).
        let forged = TRAP.replacen("5,", "13,", 1);
        assert_eq!(seccomp_record(&forged, 4254, None), None);
        let other = TRAP.replace("type=1326", "type=1300");
        assert_eq!(
            seccomp_record(&other, 4254, None),
            None,
            "not a seccomp record"
        );
    }

    fn report(nr: u32, ip: u64, args: Option<[u64; 6]>) -> SyscallReport {
        SyscallReport {
            nr,
            name: syscall_name(nr),
            args,
            code: RET_TRAP,
            arch: Some(0xc000_003e),
            ip: Some(ip),
        }
    }

    #[test]
    fn the_finding_names_the_kernels_call_and_the_device_record_only_as_a_claim() {
        let kernel = report(72, 0x1000, None);
        let forged = report(101, 0x2000, Some([1, 2, 3, 4, 5, 6]));
        let f = SigsysFinding {
            kernel_record: Some(kernel.clone()),
            kernel_record_unavailable: None,
            device_claim: Some(forged.clone()),
        };
        assert_eq!(f.claim_agrees(), Some(false));
        assert_eq!(f.syscall().map(|r| r.name.as_str()), Some("fcntl"));
        let s = f.to_string();
        assert!(
            s.starts_with("fcntl (nr 72) at ip 0x1000, per the kernel"),
            "{s}"
        );
        assert!(
            s.contains("its own claim disagrees: ptrace (nr 101)"),
            "{s}"
        );

        let honest = SigsysFinding {
            device_claim: Some(report(72, 0x1000, Some([3, 1033, 8, 0, 0, 0]))),
            ..f.clone()
        };
        assert_eq!(honest.claim_agrees(), Some(true));
        assert!(honest
            .to_string()
            .contains("its own claim agrees: fcntl (nr 72) args 0x3"));
        // The same number from another call site is not the same call.
        let elsewhere = SigsysFinding {
            device_claim: Some(report(72, 0x3000, None)),
            ..f.clone()
        };
        assert_eq!(elsewhere.claim_agrees(), Some(false));

        let unknown = SigsysFinding {
            kernel_record: None,
            kernel_record_unavailable: Some("/dev/kmsg could not be read".into()),
            device_claim: Some(forged),
        };
        assert_eq!(
            unknown.syscall(),
            None,
            "a claim is never promoted to the fact"
        );
        assert_eq!(unknown.claim_agrees(), None);
        let s = unknown.to_string();
        assert!(
            s.starts_with("syscall unknown: no kernel record (/dev/kmsg"),
            "{s}"
        );
        assert!(
            s.contains("its own claim, unverified: ptrace (nr 101)"),
            "{s}"
        );
        let json = serde_json::to_value(&unknown).unwrap();
        assert_eq!(json["kernel_record"], serde_json::Value::Null);
        assert_eq!(json["device_claim"]["name"], "ptrace");
    }
}
