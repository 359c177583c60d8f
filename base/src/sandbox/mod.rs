//! The unsafe half of the jail launcher (`hostmem_jail::launch` has the safe logic and the
//! configuration): one `clone(2)` into new user, pid, mount, net, ipc and uts namespaces that
//! is sound in a **multi-threaded** parent, the child's set-up up to `execveat`, and the
//! SIGSYS reporter a jailed program installs before its seccomp filter.
//!
//! After `clone` the child is a copy of one thread of a process whose other threads may
//! have held locks (the allocator's among them), so it runs only raw, async-signal-safe
//! system calls on data prepared before the clone: every path is a `CString`, `argv` and
//! `envp` are ready pointer arrays, scratch space is pre-allocated. No allocation, no
//! locking, no panics (no indexing) until `execveat` or `_exit`. A failure is written to a
//! CLOEXEC error pipe as `(step, errno, index)` and the child `_exit`s with 127, so the
//! parent learns which step failed; a successful exec closes the pipe (EOF).

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

mod child;
mod sigsys;

pub use sigsys::{install_sigsys_reporter, SigsysRecord, SIGSYS_RECORD_LEN};

use child::child_main;

/// One operation that builds the jail's root, run in order in the child (inside the new
/// mount namespace, before `pivot_root`). Every path is absolute in the host's view, i.e.
/// already under [`JailPlan::new_root`].
#[derive(Debug, Clone)]
pub enum RootOp {
    /// `mkdir(path, 0755)`; an existing directory is fine.
    Mkdir(CString),
    /// `symlink(target, path)` (recreates e.g. Debian's `/lib64 -> usr/lib64`).
    Symlink {
        /// The link's contents.
        target: CString,
        /// Where the link is created.
        path: CString,
    },
    /// Creates an empty file (the mount point of a file bind mount).
    Touch(CString),
    /// Bind-mounts `src` at `dst`, then remounts it read-only, nosuid, nodev. `src` should
    /// be `/proc/self/fd/N` of an `O_PATH` fd opened before the root changed.
    BindRo {
        /// The source.
        src: CString,
        /// The mount point.
        dst: CString,
    },
    /// Mounts a read-only (nosuid, nodev, noexec) procfs of the new pid namespace at `path`.
    Proc(CString),
}

/// A step of the jailed launch, as reported by [`SpawnError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Step {
    /// Creating the sync/error pipes.
    Pipe = 1,
    /// `clone(2)`.
    Clone,
    /// Writing `/proc/<pid>/setgroups`.
    Setgroups,
    /// Writing `/proc/<pid>/uid_map`.
    UidMap,
    /// Writing `/proc/<pid>/gid_map`.
    GidMap,
    /// Waiting for the parent's go-ahead (the parent died or failed).
    WaitParent,
    /// `prctl(PR_SET_PDEATHSIG)`, or the parent was gone when it was set.
    Pdeathsig,
    /// Unblocking every signal (`rt_sigprocmask`).
    SignalMask,
    /// Writing the child's pid into [`JailPlan::cgroup_procs`] (parent side).
    Cgroup,
    /// Sending the seccomp listener on [`JailPlan::listener_socket`].
    SendListener,
    /// `setresgid`/`setresuid` to 0 of the new user namespace.
    SetIds,
    /// `mount --make-rprivate /`.
    MakePrivate,
    /// Mounting the tmpfs that becomes the root.
    MountRoot,
    /// A [`RootOp::Mkdir`].
    Mkdir,
    /// A [`RootOp::Symlink`].
    Symlink,
    /// A [`RootOp::Touch`].
    Touch,
    /// The bind mount of a [`RootOp::BindRo`].
    Bind,
    /// The read-only remount of a [`RootOp::BindRo`].
    RemountBindRo,
    /// A [`RootOp::Proc`].
    MountProc,
    /// `chdir` into the new root.
    ChdirNewRoot,
    /// `pivot_root(".", ".")`.
    PivotRoot,
    /// `umount2(old root, MNT_DETACH)`.
    DetachOldRoot,
    /// `chdir("/")`.
    ChdirSlash,
    /// Remounting the new root read-only.
    RemountRootRo,
    /// `sethostname`.
    Hostname,
    /// A `prlimit64` (index = position in [`JailPlan::rlimits`]).
    Rlimit,
    /// `PR_CAPBSET_DROP` (index = the capability).
    CapBoundingDrop,
    /// `PR_CAP_AMBIENT_CLEAR_ALL`.
    CapAmbientClear,
    /// `capset` to empty effective/permitted/inheritable sets.
    Capset,
    /// `PR_SET_NO_NEW_PRIVS`.
    NoNewPrivs,
    /// Moving or renumbering the kept fds, or closing the rest.
    Fds,
    /// `seccomp` of [`JailPlan::exec_filter`], right before the exec.
    ExecFilter,
    /// `execveat` of the program.
    Exec,
}

impl Step {
    const ALL: [Step; 33] = [
        Step::Pipe,
        Step::Clone,
        Step::Setgroups,
        Step::UidMap,
        Step::GidMap,
        Step::WaitParent,
        Step::Pdeathsig,
        Step::SignalMask,
        Step::Cgroup,
        Step::SendListener,
        Step::SetIds,
        Step::MakePrivate,
        Step::MountRoot,
        Step::Mkdir,
        Step::Symlink,
        Step::Touch,
        Step::Bind,
        Step::RemountBindRo,
        Step::MountProc,
        Step::ChdirNewRoot,
        Step::PivotRoot,
        Step::DetachOldRoot,
        Step::ChdirSlash,
        Step::RemountRootRo,
        Step::Hostname,
        Step::Rlimit,
        Step::CapBoundingDrop,
        Step::CapAmbientClear,
        Step::Capset,
        Step::NoNewPrivs,
        Step::Fds,
        Step::ExecFilter,
        Step::Exec,
    ];

    fn from_u32(v: u32) -> Option<Step> {
        Step::ALL.iter().copied().find(|s| *s as u32 == v)
    }

    /// A short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            Step::Pipe => "pipe",
            Step::Clone => "clone",
            Step::Setgroups => "setgroups",
            Step::UidMap => "uid_map",
            Step::GidMap => "gid_map",
            Step::WaitParent => "wait for parent",
            Step::Pdeathsig => "pdeathsig",
            Step::SignalMask => "unblock signals",
            Step::Cgroup => "join the cgroup",
            Step::SendListener => "send the seccomp listener",
            Step::SetIds => "setresuid/setresgid",
            Step::MakePrivate => "make / private",
            Step::MountRoot => "mount tmpfs root",
            Step::Mkdir => "mkdir",
            Step::Symlink => "symlink",
            Step::Touch => "create mount point",
            Step::Bind => "bind mount",
            Step::RemountBindRo => "remount bind read-only",
            Step::MountProc => "mount /proc",
            Step::ChdirNewRoot => "chdir new root",
            Step::PivotRoot => "pivot_root",
            Step::DetachOldRoot => "detach old root",
            Step::ChdirSlash => "chdir /",
            Step::RemountRootRo => "remount / read-only",
            Step::Hostname => "sethostname",
            Step::Rlimit => "setrlimit",
            Step::CapBoundingDrop => "PR_CAPBSET_DROP",
            Step::CapAmbientClear => "PR_CAP_AMBIENT_CLEAR_ALL",
            Step::Capset => "capset",
            Step::NoNewPrivs => "no_new_privs",
            Step::Fds => "renumber fds",
            Step::ExecFilter => "seccomp filter before exec",
            Step::Exec => "execveat",
        }
    }
}

/// A failed launch step: which, its errno, and an index (the [`RootOp`], rlimit or
/// capability it concerned), if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("jail step '{}' failed: {errno}", step.name())]
pub struct SpawnError {
    /// The step.
    pub step: Step,
    /// Its errno.
    pub errno: Errno,
    /// The index of the op/rlimit/capability, if the step has one.
    pub index: Option<usize>,
}

/// Everything the child needs, prepared before the clone.
#[derive(Debug)]
pub struct JailPlan {
    /// New user, pid, mount, net, ipc and uts namespaces with an empty root and no
    /// capabilities. `false`: plain fork+exec with fd/env hygiene, rlimits, no_new_privs.
    pub namespaces: bool,
    /// Uid and gid outside that root (uid 0) inside the user namespace maps to.
    pub outside_ids: (u32, u32),
    /// An existing host directory over which the new root's tmpfs is mounted (inside the
    /// child's private mount namespace only), e.g. `/tmp`.
    pub new_root: CString,
    /// tmpfs mount options, e.g. `size=1m,mode=0755`.
    pub root_options: CString,
    /// The ops that populate the new root.
    pub root_ops: Vec<RootOp>,
    /// The hostname in the new uts namespace.
    pub hostname: CString,
    /// `(resource, limit)`: soft and hard limit (`u64::MAX` = unlimited).
    pub rlimits: Vec<(u32, u64)>,
    /// The highest capability number (`/proc/sys/kernel/cap_last_cap`).
    pub cap_last_cap: u32,
    /// The program, opened before the root changes (executed with `execveat`).
    pub program: OwnedFd,
    /// argv (`argv[0]` first).
    pub argv: Vec<CString>,
    /// The whole environment (`KEY=value`).
    pub envp: Vec<CString>,
    /// Fds to keep, with their number in the program. Everything else is closed.
    pub keep: Vec<(OwnedFd, RawFd)>,
    /// A seccomp filter the child installs itself as its last step before `execveat`, for
    /// a program that cannot install one (as minijail does): it must allow `execveat`, the
    /// dynamic loader's calls, and `write` + `exit_group` (a failed exec is reported on the
    /// error pipe). no_new_privs is set before it.
    pub exec_filter: Option<Vec<crate::seccomp::SockFilter>>,
    /// `seccomp(2)` flags for [`JailPlan::exec_filter`]: e.g. `SECCOMP_FILTER_FLAG_LOG` (the
    /// kernel then audits trap actions too, so a trap before the program's SIGSYS handler
    /// exists is still named in `/dev/kmsg`) or `SECCOMP_FILTER_FLAG_NEW_LISTENER` (log
    /// mode: the listener goes to [`JailPlan::listener_socket`]).
    pub exec_filter_flags: u32,
    /// With `SECCOMP_FILTER_FLAG_NEW_LISTENER`: a connected unix socket on which the child
    /// sends the new listener fd (SCM_RIGHTS, one byte of data) right after installing the
    /// filter and before the exec, so the parent serves its notifications from the start.
    pub listener_socket: Option<OwnedFd>,
    /// A cgroup's `cgroup.procs`, opened for writing: the parent writes the child's pid into
    /// it before letting the child go, so everything the child ever allocates is charged
    /// there (the device's memory limit).
    pub cgroup_procs: Option<File>,
}

/// Data for the child, all allocated before the clone.
struct Prepared<'a> {
    plan: &'a JailPlan,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// Pre-allocated room for the moved kept fds.
    moved: Vec<RawFd>,
    /// The targets, sorted.
    targets: Vec<RawFd>,
    high: RawFd,
    sync_r: RawFd,
    sync_w: RawFd,
    err_w: RawFd,
    /// [`JailPlan::listener_socket`]'s fd, or -1.
    listener_socket: RawFd,
    /// Room for one SCM_RIGHTS control message (u64s: aligned for `cmsghdr`).
    cmsg: [u64; 4],
    /// [`JailPlan::exec_filter`] as the kernel takes it (points into the plan).
    exec_filter: Option<libc::sock_fprog>,
}

fn pipe_cloexec() -> Result<(OwnedFd, OwnedFd), SpawnError> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|errno| SpawnError {
        step: Step::Pipe,
        errno,
        index: None,
    })
}

/// Clones the jailed child, lets it set itself up and exec `plan.program`, and returns its
/// pid (in our pid namespace) once the exec has happened, or the step that failed (the
/// child is reaped then). Sound in a multi-threaded process (see the module docs). The
/// child gets `PR_SET_PDEATHSIG(SIGKILL)`: it dies when the *thread* that called this ends.
pub fn spawn_jailed(plan: &JailPlan) -> Result<i32, SpawnError> {
    let (sync_r, sync_w) = pipe_cloexec()?;
    let (err_r, err_w) = pipe_cloexec()?;
    let mut targets: Vec<RawFd> = plan.keep.iter().map(|(_, t)| *t).collect();
    targets.sort_unstable();
    let high = targets.last().copied().unwrap_or(2).max(2) + 1;
    let argv = plan
        .argv
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let envp = plan
        .envp
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let mut prep = Prepared {
        plan,
        argv,
        envp,
        moved: vec![-1; plan.keep.len()],
        targets,
        high,
        sync_r: sync_r.as_raw_fd(),
        sync_w: sync_w.as_raw_fd(),
        err_w: err_w.as_raw_fd(),
        listener_socket: plan.listener_socket.as_ref().map_or(-1, |s| s.as_raw_fd()),
        cmsg: [0; 4],
        exec_filter: match &plan.exec_filter {
            Some(f) if f.is_empty() || f.len() > crate::seccomp::BPF_MAXINSNS => {
                return Err(SpawnError {
                    step: Step::ExecFilter,
                    errno: Errno::EINVAL,
                    index: None,
                })
            }
            Some(f) => Some(libc::sock_fprog {
                len: f.len() as u16,
                filter: f.as_ptr() as *mut libc::sock_filter,
            }),
            None => None,
        },
    };
    let flags = if plan.namespaces {
        libc::CLONE_NEWUSER
            | libc::CLONE_NEWPID
            | libc::CLONE_NEWNS
            | libc::CLONE_NEWNET
            | libc::CLONE_NEWIPC
            | libc::CLONE_NEWUTS
    } else {
        0
    };
    // SAFETY: a fork-like clone (no new stack: the child continues on a copy-on-write copy
    // of this stack, no CLONE_VM). The child only runs `child_main`, which uses raw
    // async-signal-safe syscalls on memory prepared above and never returns, so no lock
    // held by another thread of ours and no allocator state is touched in the child.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid == 0 {
        child_main(&mut prep);
    }
    if pid < 0 {
        return Err(SpawnError {
            step: Step::Clone,
            errno: Errno::last(),
            index: None,
        });
    }
    let pid = pid as i32;
    drop(prep);
    drop(sync_r);
    drop(err_w);
    let reap = |e: SpawnError| {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
        e
    };
    if let Some(mut procs) = plan.cgroup_procs.as_ref() {
        // Before the go: the child has not run a single instruction of its own yet.
        if let Err(e) = std::io::Write::write_all(&mut procs, pid.to_string().as_bytes()) {
            return Err(reap(SpawnError {
                step: Step::Cgroup,
                errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                index: None,
            }));
        }
    }
    if plan.namespaces {
        let (uid, gid) = plan.outside_ids;
        for (step, file, text) in [
            (Step::Setgroups, "setgroups", "deny".to_string()),
            (Step::UidMap, "uid_map", format!("0 {uid} 1")),
            (Step::GidMap, "gid_map", format!("0 {gid} 1")),
        ] {
            if let Err(e) = std::fs::write(format!("/proc/{pid}/{file}"), text) {
                return Err(reap(SpawnError {
                    step,
                    errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
                    index: None,
                }));
            }
        }
    }
    // Go: the child may now act as root of its user namespace.
    if let Err(errno) = nix::unistd::write(&sync_w, &[1u8]) {
        return Err(reap(SpawnError {
            step: Step::WaitParent,
            errno,
            index: None,
        }));
    }
    drop(sync_w);
    // EOF without data = the exec happened (the CLOEXEC pipe closed).
    let mut buf = [0u8; 12];
    let mut got = 0;
    let mut f = File::from(err_r);
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    if got == 0 {
        return Ok(pid);
    }
    let word = |i: usize| u32::from_ne_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let step = Step::from_u32(word(0)).unwrap_or(Step::Exec);
    let index = word(8);
    Err(reap(SpawnError {
        step,
        errno: Errno::from_raw(word(4) as i32),
        index: (index != u32::MAX).then_some(index as usize),
    }))
}

/// Sends `signal` to `pid` (no-op on an invalid signal or a reaped pid).
pub fn kill(pid: i32, signal: i32) {
    if let Ok(sig) = nix::sys::signal::Signal::try_from(signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}
