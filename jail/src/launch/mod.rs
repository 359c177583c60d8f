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

use std::ffi::OsString;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hostmem_base::sandbox;
use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use notify::Notifier;
use report::KmsgState;

mod child;
mod facts;
mod notify;
mod report;
mod spawn;

pub use child::{
    child_install_seccomp, child_install_sigsys_reporter, kills_to_traps, logs_to_notifications,
};
pub use facts::{jail_facts, verify_jailed, JailFacts, JAIL_NAMESPACES};
pub use report::{sigsys_reports_from_bytes, syscall_name, SigsysFinding, SyscallReport};
pub use spawn::spawn;

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
