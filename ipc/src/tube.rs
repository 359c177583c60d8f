//! The `Tube`: SOCK_SEQPACKET + serde_json + SCM_RIGHTS.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hostmem_base::fd::{recv_with_fds, try_recv_with_fds};
use nix::errno::Errno;
use nix::sys::socket::{
    getsockopt, sendmsg, setsockopt, socketpair, sockopt, AddressFamily, ControlMessage, MsgFlags,
    SockFlag, SockType,
};
use nix::sys::time::TimeVal;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest message a tube sends or accepts, in bytes.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most fds one message may carry: a batch of placements carries one per Map
/// (`protocol::MAX_BATCH`). SCM_RIGHTS allows 253; the receiver has room for twice this
/// many (`hostmem_base::fd::RECV_FD_SLOTS`), so a sender of a few more is told apart from
/// a flood.
pub const MAX_FDS: usize = 32;

/// Result alias for hostmem-ipc.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong on a tube.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `socketpair` failed.
    #[error("socketpair failed: {0}")]
    SocketPair(Errno),
    /// An inherited fd is not a SOCK_SEQPACKET socket.
    #[error("fd {fd} is not a SOCK_SEQPACKET socket")]
    NotSeqpacket {
        /// The fd.
        fd: RawFd,
    },
    /// Setting a socket option (timeouts) failed.
    #[error("setsockopt {what} failed: {errno}")]
    SockOpt {
        /// Which option.
        what: &'static str,
        /// The errno.
        errno: Errno,
    },
    /// `shutdown(2)` failed.
    #[error("shutdown failed: {0}")]
    Shutdown(Errno),
    /// `sendmsg` failed.
    #[error("send failed: {0}")]
    Send(Errno),
    /// `recvmsg` failed.
    #[error("receive failed: {0}")]
    Recv(Errno),
    /// The peer closed its end.
    #[error("peer hung up")]
    Hangup,
    /// A send or receive timed out.
    #[error("timed out")]
    Timeout,
    /// A message to send is larger than [`MAX_MESSAGE`].
    #[error("message of {len} bytes exceeds the limit of {max}")]
    Oversized {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A received message was cut short (MSG_TRUNC): it was larger than [`MAX_MESSAGE`].
    #[error("received message truncated (larger than {MAX_MESSAGE} bytes)")]
    Truncated,
    /// Received fds were cut short (MSG_CTRUNC): far more fds than [`MAX_FDS`] were sent,
    /// or we are at our fd limit (EMFILE). The fds that did arrive are closed; the message
    /// itself arrived whole, so the receiver can still answer it (with an error).
    #[error("received control data truncated (far more fds than {MAX_FDS}, or our fd limit)")]
    ControlTruncated {
        /// The message, whose fds are lost.
        message: Vec<u8>,
    },
    /// Too many fds to send.
    #[error("{got} fds exceed the limit of {max}")]
    TooManyFds {
        /// How many.
        got: usize,
        /// The limit.
        max: usize,
    },
    /// A message arrived with a different number of fds than its type carries.
    #[error("message carries {got} fds, {expected} expected")]
    UnexpectedFds {
        /// Received.
        got: usize,
        /// Expected for this message.
        expected: usize,
    },
    /// The message is not valid JSON for the expected type.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The peer speaks another protocol version or role.
    #[error("handshake refused: {0}")]
    Handshake(String),
}

/// How long the request/reply paths (device events and their replies, guest commands and
/// their responses) poll before they sleep: a little more than a round trip on a busy host.
pub const REPLY_SPIN: Duration = Duration::from_micros(200);

/// A typed message that knows how many fds travel with it.
pub trait Message: Serialize + DeserializeOwned {
    /// Number of fds this message carries.
    fn fd_count(&self) -> usize;
}

/// One end of a SOCK_SEQPACKET connection.
#[derive(Debug)]
pub struct Tube {
    sock: OwnedFd,
    /// How long a receive polls before it sleeps, in ns ([`Tube::set_recv_spin`]).
    spin_ns: AtomicU64,
    /// The receive buffer ([`MAX_MESSAGE`] bytes), kept: a fresh zeroed 64 KiB per message
    /// cost a memset on every receive of both ends.
    rbuf: Mutex<Vec<u8>>,
}

impl Tube {
    /// A connected pair of tubes (CLOEXEC).
    pub fn pair() -> Result<(Tube, Tube)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(Error::SocketPair)?;
        Ok((Tube::new(a), Tube::new(b)))
    }

    /// Adopts an inherited fd after checking it is a SOCK_SEQPACKET socket.
    pub fn from_fd(fd: OwnedFd) -> Result<Tube> {
        match getsockopt(&fd, sockopt::SockType) {
            Ok(SockType::SeqPacket) => Ok(Tube::new(fd)),
            _ => Err(Error::NotSeqpacket { fd: fd.as_raw_fd() }),
        }
    }

    fn new(sock: OwnedFd) -> Tube {
        Tube {
            sock,
            spin_ns: AtomicU64::new(0),
            rbuf: Mutex::new(Vec::new()),
        }
    }

    /// Lets each receive poll the socket for up to `t` (yielding the CPU between polls)
    /// before it sleeps in `recvmsg`. For the request/reply paths whose peer answers within
    /// microseconds, where waking an idle vCPU costs more (decision 044). Zero
    /// (the default) sleeps at once.
    pub fn set_recv_spin(&self, t: Duration) {
        let ns = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
        self.spin_ns.store(ns, Ordering::Relaxed);
    }

    /// Shuts the connection down in both directions (`shutdown(2)`, `SHUT_RDWR`): the peer
    /// reads EOF ([`Error::Hangup`]) and its sends fail, and our own blocked or later
    /// receives return [`Error::Hangup`], even while other holders of this socket (an
    /// `Arc<Tube>` elsewhere, a dup in a forked child) keep it open. Dropping a tube closes
    /// the connection only when the last holder lets go; this ends it now.
    pub fn shutdown(&self) -> Result<()> {
        match nix::sys::socket::shutdown(self.sock.as_raw_fd(), nix::sys::socket::Shutdown::Both) {
            // Already disconnected (the peer is gone): nothing left to shut down.
            Ok(()) | Err(Errno::ENOTCONN) => Ok(()),
            Err(e) => Err(Error::Shutdown(e)),
        }
    }

    /// Gives up the socket.
    pub fn into_fd(self) -> OwnedFd {
        self.sock
    }

    /// Sets (or clears, with `None`) the receive timeout.
    pub fn set_recv_timeout(&self, t: Option<Duration>) -> Result<()> {
        let tv = to_timeval(t);
        setsockopt(&self.sock, sockopt::ReceiveTimeout, &tv).map_err(|errno| Error::SockOpt {
            what: "SO_RCVTIMEO",
            errno,
        })
    }

    /// Sets (or clears, with `None`) the send timeout.
    pub fn set_send_timeout(&self, t: Option<Duration>) -> Result<()> {
        let tv = to_timeval(t);
        setsockopt(&self.sock, sockopt::SendTimeout, &tv).map_err(|errno| Error::SockOpt {
            what: "SO_SNDTIMEO",
            errno,
        })
    }

    /// Sends raw bytes with fds attached.
    pub fn send_bytes(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
        self.send_bytes_flags(bytes, fds, MsgFlags::MSG_NOSIGNAL)
    }

    /// Sends a typed message without blocking (`MSG_DONTWAIT`): `Ok(false)` when the
    /// socket's buffer is full (nothing was sent), `Ok(true)` when it went out.
    pub fn try_send<T: Message>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<bool> {
        if fds.len() != msg.fd_count() {
            return Err(Error::UnexpectedFds {
                got: fds.len(),
                expected: msg.fd_count(),
            });
        }
        let bytes = serde_json::to_vec(msg)?;
        match self.send_bytes_flags(&bytes, fds, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT) {
            Ok(()) => Ok(true),
            Err(Error::Timeout) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn send_bytes_flags(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
        flags: MsgFlags,
    ) -> Result<()> {
        if bytes.len() > MAX_MESSAGE {
            return Err(Error::Oversized {
                len: bytes.len(),
                max: MAX_MESSAGE,
            });
        }
        if fds.len() > MAX_FDS {
            return Err(Error::TooManyFds {
                got: fds.len(),
                max: MAX_FDS,
            });
        }
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
        let iov = [IoSlice::new(bytes)];
        loop {
            match sendmsg::<()>(self.sock.as_raw_fd(), &iov, cmsgs, flags, None) {
                Ok(_) => return Ok(()),
                Err(Errno::EINTR) => continue,
                Err(Errno::EPIPE) | Err(Errno::ECONNRESET) => return Err(Error::Hangup),
                Err(Errno::EAGAIN) => return Err(Error::Timeout),
                Err(e) => return Err(Error::Send(e)),
            }
        }
    }

    /// Receives one raw message and the fds that came with it (CLOEXEC, owned). A message
    /// that was truncated, or whose fds were, is an error and its fds are closed.
    pub fn recv_bytes(&self) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        self.with_buf(|buf| self.recv_into(buf))
    }

    /// Runs `f` on the kept receive buffer, or on a fresh one while another receive (of
    /// another thread) holds it: a receiver never waits for another's buffer.
    fn with_buf<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        match self.rbuf.try_lock() {
            Ok(mut b) => {
                if b.len() < MAX_MESSAGE {
                    b.resize(MAX_MESSAGE, 0);
                }
                f(&mut b)
            }
            Err(_) => f(&mut vec![0u8; MAX_MESSAGE]),
        }
    }

    fn recv_into(&self, buf: &mut [u8]) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        let spin = Duration::from_nanos(self.spin_ns.load(Ordering::Relaxed));
        let mut polled = None;
        if !spin.is_zero() {
            let t0 = std::time::Instant::now();
            loop {
                match try_recv_with_fds(self.sock.as_fd(), buf) {
                    Err(Errno::EAGAIN) if t0.elapsed() < spin => std::thread::yield_now(),
                    Err(Errno::EAGAIN) => break,
                    r => {
                        polled = Some(r);
                        break;
                    }
                }
            }
        }
        let got = polled.unwrap_or_else(|| recv_with_fds(self.sock.as_fd(), buf));
        Self::received(self.after_reset(got, buf), buf)
    }

    /// A peer that closed with messages of ours unread leaves ECONNRESET on our socket,
    /// which the kernel reports (once) ahead of what the peer sent before it closed: read
    /// those first (the error is cleared now); EOF comes after them.
    fn after_reset(
        &self,
        got: std::result::Result<hostmem_base::fd::Received, Errno>,
        buf: &mut [u8],
    ) -> std::result::Result<hostmem_base::fd::Received, Errno> {
        match got {
            Err(Errno::ECONNRESET) => match try_recv_with_fds(self.sock.as_fd(), buf) {
                Err(Errno::EAGAIN) => Err(Errno::ECONNRESET),
                again => again,
            },
            got => got,
        }
    }

    /// [`Tube::recv_bytes`] without waiting: `Ok(None)` when no message is queued.
    pub fn try_recv_bytes(&self) -> Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        self.with_buf(|buf| {
            match self.after_reset(try_recv_with_fds(self.sock.as_fd(), buf), buf) {
                Err(Errno::EAGAIN) => Ok(None),
                got => Self::received(got, buf).map(Some),
            }
        })
    }

    /// Checks what one `recvmsg` brought.
    fn received(
        got: std::result::Result<hostmem_base::fd::Received, Errno>,
        buf: &[u8],
    ) -> Result<(Vec<u8>, Vec<OwnedFd>)> {
        let got = match got {
            Ok(r) => r,
            Err(Errno::EAGAIN) => return Err(Error::Timeout),
            Err(Errno::ECONNRESET) => return Err(Error::Hangup),
            Err(e) => return Err(Error::Recv(e)),
        };
        // Dropping `got` on any error below closes the fds that came with the message.
        if got.truncated {
            return Err(Error::Truncated);
        }
        let message = || buf.get(..got.len).unwrap_or(buf).to_vec();
        if got.control_truncated {
            return Err(Error::ControlTruncated { message: message() });
        }
        if got.fds.len() > MAX_FDS {
            return Err(Error::TooManyFds {
                got: got.fds.len(),
                max: MAX_FDS,
            });
        }
        if got.len == 0 && got.fds.is_empty() {
            return Err(Error::Hangup);
        }
        Ok((message(), got.fds))
    }

    /// Sends a typed message as JSON; the fds must match `msg.fd_count()`.
    pub fn send<T: Message>(&self, msg: &T, fds: &[BorrowedFd<'_>]) -> Result<()> {
        if fds.len() != msg.fd_count() {
            return Err(Error::UnexpectedFds {
                got: fds.len(),
                expected: msg.fd_count(),
            });
        }
        let bytes = serde_json::to_vec(msg)?;
        self.send_bytes(&bytes, fds)
    }

    /// Receives a typed message; its fd count is checked against what the message says it
    /// carries, and on any error every received fd is closed.
    pub fn recv<T: Message>(&self) -> Result<(T, Vec<OwnedFd>)> {
        let (bytes, fds) = self.recv_bytes()?;
        let msg: T = serde_json::from_slice(&bytes)?;
        if fds.len() != msg.fd_count() {
            return Err(Error::UnexpectedFds {
                got: fds.len(),
                expected: msg.fd_count(),
            });
        }
        Ok((msg, fds))
    }
}

impl AsFd for Tube {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

fn to_timeval(t: Option<Duration>) -> TimeVal {
    let t = t.unwrap_or_default();
    TimeVal::new(t.as_secs() as _, t.subsec_micros() as _)
}
