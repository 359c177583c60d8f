//! The unsafe primitives of the jail launcher (`hostmem_jail::launch` has the safe logic):
//! forking a **single-threaded** process, dropping every capability, the final
//! fd-renumbering exec, and dying with another process's exit status.

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::unistd::Pid;

/// Result of [`fork_single_threaded`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// In the parent; the child's pid (as seen from the parent's pid namespace).
    Parent(Pid),
    /// In the child.
    Child,
}

/// Sandbox primitive failures.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The process has more than one thread, so a fork would copy locks held elsewhere.
    #[error("refusing to fork: process has {0} threads")]
    Threaded(usize),
    /// `fork` failed.
    #[error("fork: {0}")]
    Fork(Errno),
    /// A capability call failed.
    #[error("{op}: {errno}")]
    Caps {
        /// Which call.
        op: &'static str,
        /// The errno.
        errno: Errno,
    },
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count())
}

/// Forks, but only if this process has exactly one thread: then the child is an exact copy
/// with no lock held by a thread that does not exist in it, and may run ordinary code.
pub fn fork_single_threaded() -> Result<Forked, SandboxError> {
    let n = thread_count();
    if n != 1 {
        return Err(SandboxError::Threaded(n));
    }
    // SAFETY: the process is single-threaded (checked just above, and nothing between the
    // check and the fork starts a thread), so the child inherits a consistent heap and no
    // lock can be held by a missing thread.
    match unsafe { nix::unistd::fork() }.map_err(SandboxError::Fork)? {
        nix::unistd::ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        nix::unistd::ForkResult::Child => Ok(Forked::Child),
    }
}

/// Drops every capability: the bounding set (so an exec as uid 0 gains nothing), the
/// ambient set, and the effective, permitted and inheritable sets.
pub fn drop_all_capabilities() -> Result<(), SandboxError> {
    let last = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse::<libc::c_ulong>().ok())
        .unwrap_or(40);
    for cap in 0..=last {
        // SAFETY: prctl(PR_CAPBSET_DROP, cap) takes plain integers and touches no memory.
        let r = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if r != 0 && Errno::last() != Errno::EINVAL {
            return Err(SandboxError::Caps {
                op: "PR_CAPBSET_DROP",
                errno: Errno::last(),
            });
        }
    }
    // SAFETY: plain integer arguments, no memory is touched.
    let r = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if r != 0 {
        return Err(SandboxError::Caps {
            op: "PR_CAP_AMBIENT_CLEAR_ALL",
            errno: Errno::last(),
        });
    }
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let mut hdr = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capset reads a version-3 header and two data structs, which is exactly what
    // `hdr` and `data` are (#[repr(C)], live for the call).
    let r = unsafe { libc::syscall(libc::SYS_capset, &mut hdr as *mut Header, data.as_ptr()) };
    if r != 0 {
        return Err(SandboxError::Caps {
            op: "capset",
            errno: Errno::last(),
        });
    }
    Ok(())
}

/// What [`exec_jailed`] execs.
#[derive(Debug)]
pub struct ExecSpec {
    /// The program, opened before the root changed.
    pub program: OwnedFd,
    /// argv (argv[0] first).
    pub args: Vec<CString>,
    /// The whole environment.
    pub env: Vec<CString>,
    /// Fds to keep, with their number in the new program.
    pub keep: Vec<(OwnedFd, RawFd)>,
    /// Where to write the errno (4 bytes) if something fails; closed on exec (CLOEXEC).
    pub error_pipe: Option<OwnedFd>,
}

/// Renumbers the kept fds, closes every other fd, and execs the program. Never returns: on
/// failure it writes the errno to the error pipe and exits with status 127. Taking every
/// fd by value and never returning is what makes closing all other fds sound: no code of
/// this process runs after them.
pub fn exec_jailed(spec: ExecSpec) -> ! {
    let ExecSpec {
        program,
        args,
        env,
        keep,
        error_pipe,
    } = spec;
    let fail = |errno: Errno, pipe: &Option<OwnedFd>| -> ! {
        if let Some(p) = pipe {
            let _ = nix::unistd::write(p, &(errno as i32).to_le_bytes());
        }
        // SAFETY: _exit ends the process immediately without running destructors, which is
        // what we want in a half-exec'd child.
        unsafe { libc::_exit(127) }
    };
    // Move every fd we still need above the target range first, so dup2 into targets can
    // never clobber a source.
    let max_target = keep.iter().map(|(_, t)| *t).max().unwrap_or(2);
    let high = (max_target + 1).max(100);
    let mut moved = Vec::with_capacity(keep.len());
    for (fd, target) in &keep {
        match nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(high)) {
            Ok(n) => moved.push((n, *target)),
            Err(e) => fail(e, &error_pipe),
        }
    }
    let prog = match nix::fcntl::fcntl(
        program.as_raw_fd(),
        nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(high),
    ) {
        Ok(n) => n,
        Err(e) => fail(e, &error_pipe),
    };
    let pipe_fd = match &error_pipe {
        Some(p) => {
            match nix::fcntl::fcntl(p.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(high)) {
                Ok(n) => Some(n),
                Err(e) => fail(e, &error_pipe),
            }
        }
        None => None,
    };
    for (n, target) in &moved {
        // SAFETY: dup2 onto `target` closes whatever was there; no Rust object will use
        // that fd again because this function never returns.
        if unsafe { libc::dup2(*n, *target) } < 0 {
            fail(Errno::last(), &error_pipe);
        }
    }
    // Close everything except the targets, the program and the error pipe.
    let mut keep_nums: Vec<RawFd> = moved.iter().map(|(_, t)| *t).collect();
    keep_nums.push(prog);
    keep_nums.extend(pipe_fd);
    keep_nums.sort_unstable();
    let mut next = 0;
    for k in keep_nums.iter().copied().chain([i32::MAX]) {
        if next < k {
            // SAFETY: closes fds next..=k-1; none of them is used again (this function never
            // returns and the process is about to exec).
            unsafe { libc::syscall(libc::SYS_close_range, next as u32, (k - 1) as u32, 0u32) };
        }
        next = k.saturating_add(1);
    }
    let argv: Vec<*const libc::c_char> = args
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let envp: Vec<*const libc::c_char> = env
        .iter()
        .map(|a| a.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let empty = c"";
    // SAFETY: argv/envp are NULL-terminated arrays of pointers to live NUL-terminated
    // strings (`args`/`env` outlive the call); `prog` is an open fd of the program.
    unsafe {
        libc::syscall(
            libc::SYS_execveat,
            prog,
            empty.as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    };
    let errno = Errno::last();
    if let Some(p) = pipe_fd {
        let bytes = (errno as i32).to_le_bytes();
        // SAFETY: `p` is our dup of the error pipe; `bytes` is a live 4-byte buffer.
        unsafe { libc::write(p, bytes.as_ptr().cast(), 4) };
    }
    // SAFETY: see `fail`.
    unsafe { libc::_exit(127) }
}

/// Ends this process the way another one ended: the same exit code, or the same signal
/// (default action restored first, so e.g. SIGSYS really kills). Used by the jail's first
/// stage to pass the device's fate on to the VMM.
pub fn exit_like(code: Option<i32>, signal: Option<i32>) -> ! {
    if let Some(sig) = signal {
        // SAFETY: resetting a signal's disposition to SIG_DFL and unblocking it touches no
        // Rust state; the process dies right after.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(sig);
        }
    }
    // SAFETY: immediate exit, no destructors needed.
    unsafe { libc::_exit(code.unwrap_or(128 + signal.unwrap_or(0))) }
}
