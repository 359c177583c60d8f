//! The child after `clone`: raw, async-signal-safe system calls only, from the mount
//! namespace's root operations to `execveat`; a failure goes to the error pipe.

use std::os::fd::{AsRawFd, RawFd};

use nix::errno::Errno;

use super::{Prepared, RootOp, Step};

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
pub(super) fn child_main(p: &mut Prepared<'_>) -> ! {
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
