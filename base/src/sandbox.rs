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
use std::sync::atomic::{AtomicI32, Ordering};

use nix::errno::Errno;

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

/// Writes `(step, errno, index)` to the error pipe and exits with 127. Async-signal-safe.
fn child_fail(err_w: RawFd, step: Step, index: Option<usize>) -> ! {
    let errno = Errno::last_raw() as u32;
    let index = index.map_or(u32::MAX, |i| i as u32);
    let mut msg = [0u8; 12];
    let parts = [step as u32, errno, index];
    for (chunk, v) in msg.chunks_exact_mut(4).zip(parts) {
        chunk.copy_from_slice(&v.to_ne_bytes());
    }
    // SAFETY: `msg` is a live 12-byte buffer; write(2) and _exit(2) are async-signal-safe and
    // end this child without running any Rust code of the parent's threads.
    unsafe {
        libc::write(err_w, msg.as_ptr().cast(), msg.len());
        libc::_exit(127)
    }
}

/// The child after clone: raw syscalls only (see the module docs). Never returns.
fn child_main(p: &mut Prepared<'_>) -> ! {
    let plan = p.plan;
    let err_w = p.err_w;
    macro_rules! check {
        ($r:expr, $step:expr) => {
            check!($r, $step, None)
        };
        ($r:expr, $step:expr, $idx:expr) => {
            if ($r as i64) < 0 {
                child_fail(err_w, $step, $idx);
            }
        };
    }
    // Every unsafe block below ("see above") holds for the same reason: each call is a raw
    // syscall wrapper taking integers and pointers to NUL-terminated strings or structs
    // that live in `p`/`plan` (prepared before the clone) or on this stack; none allocates,
    // locks or touches state another thread of the parent could have left inconsistent.
    // SAFETY: see above.
    unsafe {
        libc::close(p.sync_w);
        // No signal blocked in the program: the parent may block some (the supervisors
        // read SIGINT/SIGTERM from a signalfd) and a mask survives the exec.
        let none = 0u64; // the kernel's sigset_t: 64 bits on x86_64
        check!(
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_SETMASK,
                &none as *const u64,
                std::ptr::null_mut::<u64>(),
                8usize
            ),
            Step::SignalMask
        );
        check!(
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0
            ),
            Step::Pdeathsig
        );
        // Wait until the parent has written our uid/gid maps (EOF: it died or gave up).
        let mut b = 0u8;
        loop {
            let n = libc::read(p.sync_r, (&mut b as *mut u8).cast(), 1);
            if n == 1 {
                break;
            }
            if n < 0 && Errno::last_raw() == libc::EINTR {
                continue;
            }
            if n == 0 {
                Errno::set_raw(libc::EPIPE);
            }
            child_fail(err_w, Step::WaitParent, None);
        }
        libc::close(p.sync_r);
    }
    if plan.namespaces {
        let null = std::ptr::null::<libc::c_char>();
        // SAFETY: see above.
        unsafe {
            // Become uid/gid 0 of the namespace (the ids we had are unmapped in it). Raw
            // syscalls: glibc's wrappers would signal the parent's other threads, which do
            // not exist here.
            check!(
                libc::syscall(libc::SYS_setresgid, 0u32, 0u32, 0u32),
                Step::SetIds
            );
            check!(
                libc::syscall(libc::SYS_setresuid, 0u32, 0u32, 0u32),
                Step::SetIds
            );
            check!(
                libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null()
                ),
                Step::MakePrivate
            );
            check!(
                libc::mount(
                    c"tmpfs".as_ptr(),
                    plan.new_root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV,
                    plan.root_options.as_ptr().cast()
                ),
                Step::MountRoot
            );
        }
        for (i, op) in plan.root_ops.iter().enumerate() {
            let idx = Some(i);
            // SAFETY: see above.
            unsafe {
                match op {
                    RootOp::Mkdir(path) => {
                        if libc::mkdir(path.as_ptr(), 0o755) < 0
                            && Errno::last_raw() != libc::EEXIST
                        {
                            child_fail(err_w, Step::Mkdir, idx);
                        }
                    }
                    RootOp::Symlink { target, path } => check!(
                        libc::symlink(target.as_ptr(), path.as_ptr()),
                        Step::Symlink,
                        idx
                    ),
                    RootOp::Touch(path) => {
                        let fd = libc::open(
                            path.as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o644,
                        );
                        check!(fd, Step::Touch, idx);
                        libc::close(fd);
                    }
                    RootOp::BindRo { src, dst } => {
                        check!(
                            libc::mount(
                                src.as_ptr(),
                                dst.as_ptr(),
                                null,
                                libc::MS_BIND | libc::MS_REC,
                                std::ptr::null()
                            ),
                            Step::Bind,
                            idx
                        );
                        check!(
                            libc::mount(
                                null,
                                dst.as_ptr(),
                                null,
                                libc::MS_REMOUNT
                                    | libc::MS_BIND
                                    | libc::MS_RDONLY
                                    | libc::MS_NOSUID
                                    | libc::MS_NODEV,
                                std::ptr::null()
                            ),
                            Step::RemountBindRo,
                            idx
                        );
                    }
                    RootOp::Proc(path) => check!(
                        libc::mount(
                            c"proc".as_ptr(),
                            path.as_ptr(),
                            c"proc".as_ptr(),
                            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | libc::MS_RDONLY,
                            std::ptr::null()
                        ),
                        Step::MountProc,
                        idx
                    ),
                }
            }
        }
        // SAFETY: see above.
        unsafe {
            check!(libc::chdir(plan.new_root.as_ptr()), Step::ChdirNewRoot);
            check!(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()),
                Step::PivotRoot
            );
            check!(
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
                Step::DetachOldRoot
            );
            check!(libc::chdir(c"/".as_ptr()), Step::ChdirSlash);
            check!(
                libc::mount(
                    null,
                    c"/".as_ptr(),
                    null,
                    libc::MS_REMOUNT
                        | libc::MS_BIND
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV,
                    std::ptr::null()
                ),
                Step::RemountRootRo
            );
            check!(
                libc::sethostname(plan.hostname.as_ptr(), plan.hostname.as_bytes().len()),
                Step::Hostname
            );
        }
    }
    for (i, (res, lim)) in plan.rlimits.iter().enumerate() {
        let rl = libc::rlimit64 {
            rlim_cur: *lim,
            rlim_max: *lim,
        };
        // SAFETY: see above; `rl` lives on this stack for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                0,
                *res as libc::c_int,
                &rl as *const libc::rlimit64,
                std::ptr::null::<libc::rlimit64>(),
            )
        };
        check!(r, Step::Rlimit, Some(i));
    }
    if plan.namespaces {
        for cap in 0..=plan.cap_last_cap {
            // SAFETY: see above.
            let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
            if r < 0 && Errno::last_raw() != libc::EINVAL {
                child_fail(err_w, Step::CapBoundingDrop, Some(cap as usize));
            }
        }
        // SAFETY: see above.
        unsafe {
            check!(
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                    0,
                    0,
                    0
                ),
                Step::CapAmbientClear
            );
        }
        let hdr = CapHeader {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        };
        let data = [CapData::default(); 2];
        // SAFETY: capset reads a version-3 header and two data structs, exactly what `hdr`
        // and `data` are (#[repr(C)], on this stack for the call).
        let r = unsafe { libc::syscall(libc::SYS_capset, &hdr as *const CapHeader, data.as_ptr()) };
        check!(r, Step::Capset);
    }
    // SAFETY: see above.
    unsafe {
        check!(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0),
            Step::NoNewPrivs
        );
    }
    // Fds: move the error pipe, the program and every kept fd above all target numbers,
    // renumber the kept ones, close the gaps below and mark everything above CLOEXEC.
    // SAFETY: see above. Closing fds here is sound: this process only execs or _exits.
    unsafe {
        let err_hi = libc::fcntl(err_w, libc::F_DUPFD_CLOEXEC, p.high);
        check!(err_hi, Step::Fds);
        let err_w = err_hi;
        let prog = libc::fcntl(plan.program.as_raw_fd(), libc::F_DUPFD_CLOEXEC, p.high);
        check!(prog, Step::Fds);
        let listener_socket = if p.listener_socket >= 0 {
            let s = libc::fcntl(p.listener_socket, libc::F_DUPFD_CLOEXEC, p.high);
            check!(s, Step::Fds);
            s
        } else {
            -1
        };
        for (slot, (fd, _)) in p.moved.iter_mut().zip(&plan.keep) {
            *slot = libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, p.high);
            check!(*slot, Step::Fds);
        }
        for (moved, (_, target)) in p.moved.iter().zip(&plan.keep) {
            check!(libc::dup2(*moved, *target), Step::Fds);
        }
        let mut next: u32 = 0;
        for t in p.targets.iter().copied() {
            if (next as i32) < t {
                check!(
                    libc::syscall(libc::SYS_close_range, next, (t - 1) as u32, 0u32),
                    Step::Fds
                );
            }
            next = t as u32 + 1;
        }
        // Everything from here up is ours (CLOEXEC already) or a leftover: close on exec.
        check!(
            libc::syscall(
                libc::SYS_close_range,
                next,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC
            ),
            Step::Fds
        );
        // Again, last: the credential changes above cleared the first one (the kernel
        // resets pdeath_signal on every change of creds it considers one). The parent is
        // alive iff it still holds the error pipe's read end (it does until the exec):
        // checked after the prctl, so a parent that died in between is not missed.
        check!(
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0
            ),
            Step::Pdeathsig
        );
        let mut pfd = libc::pollfd {
            fd: err_w,
            events: libc::POLLOUT,
            revents: 0,
        };
        if libc::poll(&mut pfd, 1, 0) < 0 || pfd.revents & libc::POLLERR != 0 {
            Errno::set_raw(libc::EPIPE);
            child_fail(err_w, Step::Pdeathsig, None);
        }
        if let Some(fprog) = &p.exec_filter {
            // The filter points into plan.exec_filter (SockFilter is #[repr(C)] like
            // sock_filter), alive until the exec; no_new_privs is set above.
            let listener = libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                plan.exec_filter_flags as libc::c_ulong,
                fprog as *const libc::sock_fprog,
            );
            check!(listener, Step::ExecFilter);
            if plan.exec_filter_flags & libc::SECCOMP_FILTER_FLAG_NEW_LISTENER as u32 != 0 {
                // The listener (CLOEXEC: gone from here at the exec) goes to the parent.
                // Everything lives on this stack or in `p`; the filter allows sendmsg.
                let mut byte = 0u8;
                let mut iov = libc::iovec {
                    iov_base: (&mut byte as *mut u8).cast(),
                    iov_len: 1,
                };
                let mut msg: libc::msghdr = std::mem::zeroed();
                msg.msg_iov = &mut iov;
                msg.msg_iovlen = 1;
                msg.msg_control = p.cmsg.as_mut_ptr().cast();
                msg.msg_controllen = libc::CMSG_SPACE(4) as usize;
                let c = libc::CMSG_FIRSTHDR(&msg);
                if c.is_null() {
                    Errno::set_raw(libc::EINVAL);
                    child_fail(err_w, Step::SendListener, None);
                }
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), listener as i32);
                check!(
                    libc::syscall(
                        libc::SYS_sendmsg,
                        listener_socket,
                        &msg as *const libc::msghdr,
                        0
                    ),
                    Step::SendListener
                );
            }
        }
        libc::syscall(
            libc::SYS_execveat,
            prog,
            c"".as_ptr(),
            p.argv.as_ptr(),
            p.envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        );
        child_fail(err_w, Step::Exec, None)
    }
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Sends `signal` to `pid` (no-op on an invalid signal or a reaped pid).
pub fn kill(pid: i32, signal: i32) {
    if let Ok(sig) = nix::sys::signal::Signal::try_from(signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

// ---------------------------------------------------------------------------------------
// SIGSYS reporting (SECCOMP_RET_TRAP).

/// Size of one record the SIGSYS handler writes (see [`SigsysRecord::parse`]).
pub const SIGSYS_RECORD_LEN: usize = 72;
const SIGSYS_MAGIC: u32 = 0x5359_5331; // "SYS1"

/// What the SIGSYS handler saw: a syscall seccomp trapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigsysRecord {
    /// Syscall number (`si_syscall`).
    pub nr: i32,
    /// Audit arch (`si_arch`, 0xc000003e for x86-64).
    pub arch: u32,
    /// The six argument registers (rdi, rsi, rdx, r10, r8, r9).
    pub args: [u64; 6],
    /// The address after the syscall instruction.
    pub ip: u64,
}

impl SigsysRecord {
    /// Parses one [`SIGSYS_RECORD_LEN`]-byte record; `None` if it is not one.
    pub fn parse(b: &[u8]) -> Option<SigsysRecord> {
        if b.len() < SIGSYS_RECORD_LEN {
            return None;
        }
        let u32_at = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_ne_bytes(w)
        };
        if u32_at(0) != SIGSYS_MAGIC {
            return None;
        }
        let mut args = [0u64; 6];
        for (i, a) in args.iter_mut().enumerate() {
            *a = u64_at(16 + 8 * i);
        }
        Some(SigsysRecord {
            nr: u32_at(4) as i32,
            arch: u32_at(8),
            args,
            ip: u64_at(64),
        })
    }

    /// The record's bytes as the handler writes them ([`SigsysRecord::parse`] reads them
    /// back). Anything that holds the report fd can write these: a record is the program's
    /// claim, never proof of which call seccomp stopped.
    pub fn to_bytes(&self) -> [u8; SIGSYS_RECORD_LEN] {
        let mut rec = [0u8; SIGSYS_RECORD_LEN];
        rec[0..4].copy_from_slice(&SIGSYS_MAGIC.to_ne_bytes());
        rec[4..8].copy_from_slice(&self.nr.to_ne_bytes());
        rec[8..12].copy_from_slice(&self.arch.to_ne_bytes());
        for (i, a) in self.args.iter().enumerate() {
            rec[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_ne_bytes());
        }
        rec[64..72].copy_from_slice(&self.ip.to_ne_bytes());
        rec
    }
}

static REPORT_FD: AtomicI32 = AtomicI32::new(-1);

/// The layout of the SIGSYS member of `siginfo_t` (after signo, errno, code and padding).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

extern "C" fn sigsys_handler(
    _sig: libc::c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t (whose SIGSYS union member has the
    // `SigsysInfo` layout on x86-64) and a valid ucontext_t for an SA_SIGINFO handler. Only
    // async-signal-safe work follows: reading them, a raw write(2) of a stack buffer, and
    // moving the saved instruction pointer.
    unsafe {
        let si = &*(info as *const SigsysInfo);
        let uc = &mut *(ctx as *mut libc::ucontext_t);
        let g = &mut uc.uc_mcontext.gregs;
        let mut rec = [0u8; SIGSYS_RECORD_LEN];
        rec[0..4].copy_from_slice(&SIGSYS_MAGIC.to_ne_bytes());
        rec[4..8].copy_from_slice(&si.syscall.to_ne_bytes());
        rec[8..12].copy_from_slice(&si.arch.to_ne_bytes());
        let regs = [
            libc::REG_RDI,
            libc::REG_RSI,
            libc::REG_RDX,
            libc::REG_R10,
            libc::REG_R8,
            libc::REG_R9,
        ];
        for (i, r) in regs.iter().enumerate() {
            let v = g[*r as usize] as u64;
            rec[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_ne_bytes());
        }
        rec[64..72].copy_from_slice(&(si.call_addr as u64).to_ne_bytes());
        let fd = REPORT_FD.load(Ordering::Relaxed);
        if fd >= 0 {
            libc::write(fd, rec.as_ptr().cast(), rec.len());
        }
        // SA_RESETHAND made SIGSYS's action SIG_DFL on entry. Step back over the 2-byte
        // syscall instruction (syscall, int 0x80 and sysenter are all 2 bytes; the kernel
        // rolled the registers back to the call's), so on return the same call traps
        // again and the kernel's forced SIGSYS kills the process: the exit status says
        // SIGSYS even for a pid-namespace init, which ignores raise().
        g[libc::REG_RIP as usize] -= 2;
    }
}

/// Installs the SIGSYS reporter: on a `SECCOMP_RET_TRAP` the handler writes one
/// [`SigsysRecord`] (raw bytes) to `report_fd` and then lets the process die by SIGSYS.
/// Call before installing a filter whose kill actions were turned into traps. The fd is
/// used from the signal handler and must stay open for the process's life.
pub fn install_sigsys_reporter(report_fd: RawFd) -> Result<(), Errno> {
    REPORT_FD.store(report_fd, Ordering::Relaxed);
    // SAFETY: a zeroed sigaction is valid; we set a handler with the SA_SIGINFO signature
    // and an empty mask, and pass pointers to live locals.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = sigsys_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESETHAND;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(Errno::last());
        }
        // SIGSYS must not be blocked (the kernel would force SIG_DFL and skip the report).
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sigsys_record_reads_back_as_written() {
        let r = SigsysRecord {
            nr: libc::SYS_ptrace as i32,
            arch: 0xc000_003e,
            args: [1, 2, 3, 4, 5, u64::MAX],
            ip: 0x4141_4141,
        };
        assert_eq!(SigsysRecord::parse(&r.to_bytes()), Some(r));
        let mut bad = r.to_bytes();
        bad[0] ^= 1;
        assert_eq!(SigsysRecord::parse(&bad), None, "wrong magic");
    }
}
