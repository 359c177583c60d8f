//! Fd helpers: receiving fds over a unix socket as owned, CLOEXEC fds.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;

/// What one `recvmsg` brought.
#[derive(Debug)]
pub struct Received {
    /// Bytes of payload.
    pub len: usize,
    /// The payload was cut short (MSG_TRUNC).
    pub truncated: bool,
    /// The control data (fds) was cut short (MSG_CTRUNC).
    pub control_truncated: bool,
    /// The fds that arrived, owned and CLOEXEC.
    pub fds: Vec<OwnedFd>,
}

/// Room for this many fds in one receive.
pub const RECV_FD_SLOTS: usize = 64;

/// `recvmsg` with `MSG_CMSG_CLOEXEC`, room for [`RECV_FD_SLOTS`] fds, retried on EINTR.
/// Every fd the kernel installed is returned as an `OwnedFd`, so dropping the result closes
/// them: a caller that refuses a message cannot leak its fds. This holds for truncated
/// control data too (MSG_CTRUNC: the kernel installs the fds that fit and drops the rest),
/// which is why the control messages are walked here by hand rather than by a helper that
/// gives up on truncation.
pub fn recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Received, Errno> {
    recv_with_fds_flags(sock, buf, 0)
}

/// [`recv_with_fds`] that does not wait (`MSG_DONTWAIT`): `Err(EAGAIN)` when nothing is
/// queued.
pub fn try_recv_with_fds(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<Received, Errno> {
    recv_with_fds_flags(sock, buf, libc::MSG_DONTWAIT)
}

fn recv_with_fds_flags(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    flags: libc::c_int,
) -> Result<Received, Errno> {
    const CMSG_BYTES: usize = 512;
    // u64 elements keep the control buffer aligned for cmsghdr.
    let mut control = [0u64; CMSG_BYTES / 8];
    let space = std::mem::size_of_val(&control);
    // SAFETY: CMSG_SPACE is a pure size computation.
    let needed = unsafe { libc::CMSG_SPACE((RECV_FD_SLOTS * std::mem::size_of::<RawFd>()) as u32) };
    debug_assert!(needed as usize <= space);
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: msghdr is a plain C struct for which all-zero is a valid value.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_iov = &mut iov;
        hdr.msg_iovlen = 1;
        hdr.msg_control = control.as_mut_ptr().cast();
        hdr.msg_controllen = needed as usize;
        let flags = libc::MSG_CMSG_CLOEXEC | flags;
        // SAFETY: `hdr` points at `iov` (our `buf`) and `control`, both live and writable for
        // the lengths given; the kernel writes at most those many bytes.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut hdr, flags) };
        if n < 0 {
            match Errno::last() {
                Errno::EINTR => continue,
                e => return Err(e),
            }
        }
        let mut fds = Vec::new();
        // SAFETY: `hdr` was filled by a successful recvmsg; CMSG_FIRSTHDR/NXTHDR only walk
        // inside msg_control..msg_control+msg_controllen, which lies inside `control`.
        let mut c = unsafe { libc::CMSG_FIRSTHDR(&hdr) };
        while !c.is_null() {
            // SAFETY: `c` is non-null and was produced by CMSG_FIRSTHDR/NXTHDR, so it points
            // at a complete cmsghdr inside `control`.
            let (level, kind, len) = unsafe { ((*c).cmsg_level, (*c).cmsg_type, (*c).cmsg_len) };
            if level == libc::SOL_SOCKET && kind == libc::SCM_RIGHTS {
                // SAFETY: CMSG_LEN(0) is a pure size computation.
                let head = unsafe { libc::CMSG_LEN(0) } as usize;
                let count = len.saturating_sub(head) / std::mem::size_of::<RawFd>();
                // SAFETY: CMSG_DATA points at the payload of this cmsghdr, which holds
                // `count` fds (the kernel sets cmsg_len to cover exactly those it installed).
                let data = unsafe { libc::CMSG_DATA(c) }.cast::<RawFd>();
                for i in 0..count {
                    // SAFETY: i < count, inside the payload; read_unaligned because the
                    // payload has no alignment guarantee for i32 in general.
                    let fd = unsafe { data.add(i).read_unaligned() };
                    // SAFETY: the kernel installed `fd` in our table as part of this very
                    // recvmsg (SCM_RIGHTS); nothing else knows its number yet, so this
                    // OwnedFd is its only owner.
                    fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
                }
            }
            // SAFETY: as for CMSG_FIRSTHDR above; `c` is a valid header inside `control`.
            c = unsafe { libc::CMSG_NXTHDR(&hdr, c) };
        }
        return Ok(Received {
            len: n as usize,
            truncated: hdr.msg_flags & libc::MSG_TRUNC != 0,
            control_truncated: hdr.msg_flags & libc::MSG_CTRUNC != 0,
            fds,
        });
    }
}

/// Fd numbers already claimed with [`take_inherited`].
static TAKEN: std::sync::Mutex<Vec<RawFd>> = std::sync::Mutex::new(Vec::new());

/// Claims an fd that this process inherited from its parent under a known number (e.g.
/// the tube at fd 3 that the launcher kept). The fd must be open; it is marked CLOEXEC.
/// Each number can be claimed once per process, so two owners can never close it twice.
pub fn take_inherited(fd: RawFd) -> crate::Result<OwnedFd> {
    let mut taken = TAKEN.lock().unwrap_or_else(|p| p.into_inner());
    if fd < 0 || taken.contains(&fd) {
        return Err(crate::Error::Fd {
            op: "take inherited fd",
            errno: Errno::EBADF,
        });
    }
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|errno| crate::Error::Fd {
        op: "F_SETFD on inherited fd",
        errno,
    })?;
    taken.push(fd);
    // SAFETY: the fd is open (F_SETFD succeeded), it was inherited from the parent for this
    // purpose and has not been claimed before in this process (checked above under the
    // lock), so this OwnedFd is its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Duplicates a descriptor known only by its number (e.g. one a library lends out as
/// `&dyn AsRawFd`, like the blob fd of a vhost-user `SHMEM_MAP`) into a new, CLOEXEC
/// `OwnedFd` of our own; the original stays with its owner.
pub fn dup_raw(fd: RawFd) -> Result<OwnedFd, Errno> {
    let new = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(0))?;
    // SAFETY: F_DUPFD_CLOEXEC succeeded and returned a descriptor number that was free a
    // moment ago and that nothing else in this process knows of, so this OwnedFd is its
    // only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}
