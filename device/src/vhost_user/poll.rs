//! The one-thread poll loop ([`serve_connection`]): the frontend's socket, the backend
//! channel and the kick eventfds, and [`serve_listener`].

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, MsgFlags, SockType};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{BackendReqHandler, Error as VuError};

use crate::backend::Backend;
use crate::process::IdlePoll;
use crate::{Error, Result};

use super::{
    channel::FLAG_NEED_REPLY, channel::FLAG_REPLY, channel::FLAG_VERSION_1,
    channel::MAX_BACKEND_REQ_FD_BODY, BackendChannel, Options, VuGpu, MSG_HEADER_SIZE,
    SET_BACKEND_REQ_FD,
};

/// Locks the shared state; a poisoned lock (a panic elsewhere) still yields the state.
fn lock(vu: &Mutex<VuGpu>) -> MutexGuard<'_, VuGpu> {
    vu.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How a connection ended.
#[derive(Debug)]
pub enum ConnectionEnd {
    /// The frontend closed its socket.
    Disconnected,
    /// The frontend broke the protocol (the connection was closed).
    ProtocolError(String),
    /// The frontend left a `SHMEM_MAP`/`SHMEM_UNMAP` (named here) unacked past the ack
    /// timeout: taken for broken, the connection was closed.
    AckTimeout(String),
}

/// Sends all of `bytes` with `sendmsg` (the device's seccomp policy has no `sendto`, which
/// `UnixStream`'s `write` uses), `fd` attached to the first byte.
pub(super) fn send_all(
    sock: BorrowedFd<'_>,
    bytes: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let raw: Vec<i32> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&raw)];
    let cmsgs: &[ControlMessage<'_>] = if raw.is_empty() { &[] } else { &cmsg };
    let mut sent = 0usize;
    while sent < bytes.len() {
        let iov = [IoSlice::new(bytes.get(sent..).unwrap_or_default())];
        let c = if sent == 0 { cmsgs } else { &[] };
        match sendmsg::<()>(sock.as_raw_fd(), &iov, c, MsgFlags::MSG_NOSIGNAL, None) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => sent += n,
            Err(Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Fills `buf` with `recvmsg` (no `recvfrom` in the policy), returning the fds that came.
fn recv_exact(sock: &UnixStream, buf: &mut [u8]) -> std::result::Result<Vec<OwnedFd>, String> {
    let mut fds = Vec::new();
    let mut got = 0usize;
    while got < buf.len() {
        let part = buf.get_mut(got..).unwrap_or_default();
        let r = hostmem_base::fd::recv_with_fds(sock.as_fd(), part)
            .map_err(|e| format!("recvmsg: {e}"))?;
        if r.len == 0 {
            return Err("the frontend closed the socket mid-message".into());
        }
        got += r.len;
        fds.extend(r.fds);
    }
    Ok(fds)
}

/// The request code of the next message on the frontend's socket, without taking it
/// (`MSG_PEEK`); `None` when fewer than 4 bytes are there.
fn peek_request(sock: &UnixStream) -> Option<u32> {
    let mut b = [0u8; 4];
    let mut iov = [IoSliceMut::new(&mut b)];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    match recvmsg::<()>(sock.as_raw_fd(), &mut iov, None, flags) {
        Ok(m) if m.bytes == 4 => Some(u32::from_le_bytes(b)),
        _ => None,
    }
}

/// Takes a `SET_BACKEND_REQ_FD` off the frontend's socket (the poll loop saw its request
/// code with [`peek_request`]): the header with its one fd (an `AF_UNIX` stream socket),
/// the body (none expected), the ack when the frontend asked for one. The channel then
/// belongs to the placer ([`BackendChannel`]). An error breaks the connection.
fn take_backend_channel(sock: &UnixStream, vu: &Mutex<VuGpu>) -> std::result::Result<(), String> {
    let mut hdr = [0u8; MSG_HEADER_SIZE];
    let mut fds = recv_exact(sock, &mut hdr).map_err(|e| format!("SET_BACKEND_REQ_FD: {e}"))?;
    let word = |at: usize| u32::from_le_bytes([hdr[at], hdr[at + 1], hdr[at + 2], hdr[at + 3]]);
    let (flags, size) = (word(4), word(8) as usize);
    if size > MAX_BACKEND_REQ_FD_BODY {
        return Err(format!("SET_BACKEND_REQ_FD with a body of {size} bytes"));
    }
    let mut body = vec![0u8; size];
    fds.extend(recv_exact(sock, &mut body).map_err(|e| format!("SET_BACKEND_REQ_FD: {e}"))?);
    let fd = match (fds.pop(), fds.is_empty()) {
        (Some(fd), true) => fd,
        _ => return Err(format!("SET_BACKEND_REQ_FD with {} fds", fds.len() + 1)),
    };
    match getsockopt(&fd, sockopt::SockType) {
        Ok(SockType::Stream) => {}
        other => {
            return Err(format!(
                "SET_BACKEND_REQ_FD: not a stream socket ({other:?})"
            ))
        }
    }
    {
        let mut g = lock(vu);
        if !g.proto(VhostUserProtocolFeatures::BACKEND_REQ) {
            return Err("SET_BACKEND_REQ_FD without BACKEND_REQ negotiated".into());
        }
        let need_reply = g.proto(VhostUserProtocolFeatures::REPLY_ACK);
        let channel = BackendChannel::new(UnixStream::from(fd), need_reply);
        g.dev.gpu_mut().placer_mut().set_channel(channel);
        log::info!("vhost-user: backend channel set (acks: {need_reply})");
    }
    if flags & FLAG_NEED_REPLY != 0 {
        let mut reply = Vec::with_capacity(MSG_HEADER_SIZE + 8);
        reply.extend_from_slice(&SET_BACKEND_REQ_FD.to_le_bytes());
        reply.extend_from_slice(&(FLAG_VERSION_1 | FLAG_REPLY).to_le_bytes());
        reply.extend_from_slice(&8u32.to_le_bytes());
        reply.extend_from_slice(&0u64.to_le_bytes());
        send_all(sock.as_fd(), &reply, None)
            .map_err(|e| format!("SET_BACKEND_REQ_FD: ack: {e}"))?;
    }
    Ok(())
}

/// Serves one frontend connection until it ends: the poll loop over the socket, the
/// backend channel and the started queues' kick eventfds. The frontend's requests are
/// served whenever they come, also while `SHMEM_MAP`/`SHMEM_UNMAP` acks are outstanding
/// (QEMU asks `ADD_MEM_REG`/`REM_MEM_REG` before it acks); a readable backend channel
/// settles the commands whose acks arrived. The oldest outstanding request bounds the
/// poll's timeout: once its ack is later than the placer's ack timeout the frontend is
/// taken for broken and the connection ends ([`ConnectionEnd::AckTimeout`]). The caller
/// resets the state afterwards (the requests in flight fail as on a disconnect).
///
/// After its last work (a request, an ack, a kick, a fence) the loop keeps polling without
/// sleeping for `poll`'s window ([`IdlePoll`], as the native device's loop does), acks
/// outstanding or not: acks and the guest's next command come sooner than a wake-up from
/// sleep (decision 039). Past the window it sleeps as before (up to the oldest ack's
/// deadline), so a slow frontend (QEMU's ack waits for its `ADD_MEM_REG` round trip) costs
/// at most one window of polling per burst.
pub fn serve_connection(
    stream: UnixStream,
    vu: &Arc<Mutex<VuGpu>>,
    mut poll_window: IdlePoll,
) -> Result<ConnectionEnd> {
    let mut handler = BackendReqHandler::from_stream(stream, vu.clone());
    // The handler keeps its socket to itself; a duplicate (same open file description)
    // is what the loop polls.
    let sock = handler
        .try_clone_connection()
        .map_err(|e| Error::Protocol(format!("dup of the vhost-user socket: {e}")))?;
    let mut last_work: Option<Instant> = None;
    loop {
        let spinning = last_work.is_some_and(|t| t.elapsed() < poll_window.window());
        let (socket_ready, channel_ready, kicked, busy) = {
            let g = lock(vu);
            let busy = g.dev.busy();
            let kicks = g.kick_fds();
            let channel = g.dev.gpu().placer().channel_fd();
            let mut fds = vec![PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
            fds.extend(channel.map(|fd| PollFd::new(fd, PollFlags::POLLIN)));
            let first_kick = fds.len();
            fds.extend(
                kicks
                    .iter()
                    .map(|(_, fd)| PollFd::new(*fd, PollFlags::POLLIN)),
            );
            // Parked fences wake the loop (poll_fences below); without an fd they are
            // polled every millisecond.
            let fences = g.dev.gpu().fence_fds();
            let fence_timer = g.dev.gpu().parked() > 0 && fences.is_empty();
            fds.extend(fences.iter().map(|fd| PollFd::new(*fd, PollFlags::POLLIN)));
            let sink_waits = g.dev.gpu().display().sink_pending();
            let timeout = if busy || spinning {
                PollTimeout::ZERO
            } else if fence_timer || sink_waits {
                PollTimeout::from(1u8)
            } else {
                match g.dev.gpu().placer().ack_deadline() {
                    // Rounded up to whole milliseconds (no spinning just before the
                    // deadline); a wait beyond u16 ms is cut short and recomputed.
                    Some(d) => {
                        let left = d.saturating_duration_since(Instant::now());
                        let ms = left.as_micros().div_ceil(1000);
                        PollTimeout::from(u16::try_from(ms).unwrap_or(u16::MAX))
                    }
                    None => PollTimeout::NONE,
                }
            };
            let sleeps = timeout != PollTimeout::ZERO;
            if sleeps {
                poll_window.sleeping(Instant::now());
            }
            let polled = poll(&mut fds, timeout);
            if sleeps {
                poll_window.woke(Instant::now());
            }
            let ready_fds = match polled {
                Ok(0) if spinning && !busy && !fence_timer && !sink_waits => {
                    // Nothing yet: poll again (the CPU to whoever else wants it first).
                    // Parked fences without an fd and a waiting frame go on below.
                    std::thread::yield_now();
                    continue;
                }
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(Error::Poll(e)),
            };
            if ready_fds > 0 || busy {
                // Something came (or the device works): poll a window again before
                // sleeping. A timed wake-up with nothing ready (a fence timer, a
                // deadline) is no work.
                last_work = Some(Instant::now());
            }
            let ready = |f: &PollFd<'_>| f.revents().is_some_and(|r| !r.is_empty());
            let s = fds.first().is_some_and(ready);
            let c = channel.is_some() && fds.get(1).is_some_and(ready);
            let k: Vec<u16> = kicks
                .iter()
                .zip(fds.iter().skip(first_kick))
                .filter(|(_, f)| ready(f))
                .map(|((i, _), _)| *i)
                .collect();
            (s, c, k, busy)
        };
        if socket_ready {
            let r = if peek_request(&sock) == Some(SET_BACKEND_REQ_FD) {
                take_backend_channel(&sock, vu)
                    .map_err(|e| VuError::ReqHandlerError(std::io::Error::other(e)))
            } else {
                handler.handle_request()
            };
            match r {
                Ok(()) => {}
                Err(VuError::Disconnected) | Err(VuError::PartialMessage) => {
                    return Ok(ConnectionEnd::Disconnected)
                }
                Err(VuError::SocketBroken(e)) if e.raw_os_error() == Some(libc_econnreset()) => {
                    return Ok(ConnectionEnd::Disconnected)
                }
                Err(e) => {
                    log::warn!("vhost-user: frontend broke the protocol: {e}: closing");
                    return Ok(ConnectionEnd::ProtocolError(e.to_string()));
                }
            }
        }
        let mut g = lock(vu);
        if channel_ready {
            g.dev.gpu_mut().placer_mut().receive();
        }
        // Settle every command whose ack arrived (this also starts the commands that
        // waited behind them, which may send more requests).
        while g.dev.in_flight() > 0 && g.dev.gpu().placer().ready() > 0 {
            g.dev.finish_one();
        }
        if let Some(what) = g.dev.gpu().placer().overdue(Instant::now()) {
            let limit = g.dev.gpu().placer().ack_timeout();
            log::warn!(
                "vhost-user: no ack for {what} within {limit:?}: the frontend is broken, closing the connection"
            );
            return Ok(ConnectionEnd::AckTimeout(what));
        }
        g.dev.poll_fences();
        if g.dev.gpu().display().sink_pending() {
            g.dev.gpu_mut().display_mut().retry_sink();
        }
        if busy {
            g.dev.process_busy();
        }
        for index in kicked {
            g.dev.kick(index);
        }
    }
}

/// `ECONNRESET`, as `vhost` reports a peer that went away mid-message.
fn libc_econnreset() -> i32 {
    Errno::ECONNRESET as i32
}

/// Accepts frontends on `listener` one after the other, each with a fresh backend; after a
/// disconnect the device has reset (every blob and mapping dropped). Returns after
/// `opts.max_connections` connections, or never.
pub fn serve_listener(listener: &UnixListener, opts: &Options) -> Result<()> {
    serve_listener_with(listener, opts, None)
}

/// [`serve_listener`], the first frontend served by `first` (a backend made before, e.g.
/// on a render server's socket) instead of a fresh one.
pub fn serve_listener_with(
    listener: &UnixListener,
    opts: &Options,
    mut first: Option<Box<dyn Backend>>,
) -> Result<()> {
    let mut served = 0usize;
    loop {
        if opts.max_connections.is_some_and(|m| served >= m) {
            return Ok(());
        }
        let (stream, _) = listener
            .accept()
            .map_err(|e| Error::Protocol(format!("accept on the vhost-user socket: {e}")))?;
        served += 1;
        let backend = match first.take() {
            Some(b) => b,
            None => crate::process::make_backend_with(opts.backend, opts.test_ops, None)?,
        };
        log::info!(
            "vhost-user: frontend {served} connected (backend {}, region {:#x} bytes)",
            backend.name(),
            opts.shmem_size
        );
        let vu = Arc::new(Mutex::new(VuGpu::new(backend, opts.shmem_size)));
        lock(&vu)
            .device_mut()
            .gpu_mut()
            .placer_mut()
            .set_ack_timeout(opts.ack_timeout);
        lock(&vu)
            .device_mut()
            .gpu_mut()
            .set_blob_budget(opts.blob_budget);
        lock(&vu)
            .device_mut()
            .gpu_mut()
            .set_display(opts.display.clone());
        if let Some(tube) = &opts.frames {
            lock(&vu)
                .device_mut()
                .gpu_mut()
                .set_frame_sink(Box::new(crate::display::TubeSink::new(tube.clone())));
        }
        let end = serve_connection(stream, &vu, IdlePoll::new(opts.idle_poll_max))?;
        let mut g = lock(&vu);
        let st = g.dev.gpu().placer().stats();
        g.reset(true);
        log::info!(
            "vhost-user: frontend {served} gone ({end:?}): device reset; SHMEM_MAP acked {}, \
             SHMEM_UNMAP acked {}, refused {}, stale acks skipped {}",
            st.maps,
            st.unmaps,
            st.refused,
            st.stale_replies
        );
    }
}
