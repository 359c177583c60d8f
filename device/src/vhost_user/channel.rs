//! The backend channel ([`BackendChannel`]: `SHMEM_MAP`/`SHMEM_UNMAP` and their acks) and
//! [`ShmemPlacer`], the asynchronous [`Placer`] on it.

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use hostmem_base::mmap::Prot;
use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};

use crate::gpu::{MapRequest, PlaceError, Placer};

use super::{poll::send_all, ShmemStats, SHMEM_ID, VHOST_USER_WARNINGS};

/// `VHOST_USER_BACKEND_SHMEM_MAP` (backend → frontend request 9).
pub const BACKEND_SHMEM_MAP: u32 = 9;
/// `VHOST_USER_BACKEND_SHMEM_UNMAP` (backend → frontend request 10).
pub const BACKEND_SHMEM_UNMAP: u32 = 10;
/// `VHOST_USER_SET_BACKEND_REQ_FD` (frontend → backend request 21).
pub const SET_BACKEND_REQ_FD: u32 = 21;
/// Bytes of a vhost-user message header: `request: u32`, `flags: u32`, `size: u32`.
pub const MSG_HEADER_SIZE: usize = 12;
/// Bytes of `VhostUserMMap`, the body of `SHMEM_MAP`/`SHMEM_UNMAP`.
pub const MMAP_BODY_SIZE: usize = 40;
/// Header flags: protocol version 1 (bits 0-1).
pub(super) const FLAG_VERSION_1: u32 = 0x1;
/// Header flags: the version bits.
const FLAG_VERSION_MASK: u32 = 0x3;
/// Header flags: this message is a reply.
pub(super) const FLAG_REPLY: u32 = 0x4;
/// Header flags: the sender wants a reply (`REPLY_ACK`).
pub(super) const FLAG_NEED_REPLY: u32 = 0x8;
/// Largest body of a `SET_BACKEND_REQ_FD` the device reads (the message has none).
pub(super) const MAX_BACKEND_REQ_FD_BODY: usize = 256;
/// How long a placement waits for the frontend's ack by default: a synchronous one
/// ([`Placer::map`]) inside the call, an asynchronous one in the poll loop
/// ([`serve_connection`] closes the connection when the oldest ack is this late).
///
/// [`serve_connection`]: super::poll::serve_connection
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// The backend channel (the socket `SET_BACKEND_REQ_FD` brought), driven by the device
/// itself rather than by `vhost`'s `Backend`, whose requests block until their ack: the
/// frontend may have to ask the device something first (QEMU 11.1 adds a memory region
/// per `SHMEM_MAP`, `ADD_MEM_REG`, and waits for that reply before it acks the map; a
/// device blocked on the ack would never read it). Here a request is only sent, and its
/// ack is read when the poll loop sees the channel readable.
///
/// Wire layout (vhost-user spec, "Back-end message types"), little-endian:
///
/// * header, 12 bytes: `request: u32` (9 `SHMEM_MAP`, 10 `SHMEM_UNMAP`), `flags: u32`
///   (version 1 in bits 0-1; bit 3 `NEED_REPLY` when `REPLY_ACK` was negotiated),
///   `size: u32` (40);
/// * body `VhostUserMMap`, 40 bytes: `shmid: u8`, 7 bytes padding, `fd_offset: u64`,
///   `shm_offset: u64`, `len: u64`, `flags: u64` (bit 0 `WRITABLE`); `SHMEM_MAP` carries
///   the blob's fd as `SCM_RIGHTS`;
/// * the ack: a header with the same `request`, flags version 1 | `REPLY` (bit 2),
///   `size` 8, and a `u64` body, 0 for success.
#[derive(Debug)]
pub struct BackendChannel {
    sock: UnixStream,
    need_reply: bool,
    /// Received bytes of a reply not complete yet.
    partial: Vec<u8>,
}

impl BackendChannel {
    /// A channel over `sock`; `need_reply` when `REPLY_ACK` was negotiated (every request
    /// then waits for its ack).
    pub fn new(sock: UnixStream, need_reply: bool) -> Self {
        BackendChannel {
            sock,
            need_reply,
            partial: Vec::new(),
        }
    }

    /// The socket, to poll.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Sends one `SHMEM_MAP`/`SHMEM_UNMAP` (see the layout above).
    fn send(
        &self,
        request: u32,
        m: &VhostUserMMap,
        fd: Option<BorrowedFd<'_>>,
    ) -> std::io::Result<()> {
        let flags = if self.need_reply {
            FLAG_VERSION_1 | FLAG_NEED_REPLY
        } else {
            FLAG_VERSION_1
        };
        let (shmid, fd_offset, shm_offset, len, mflags) =
            (m.shmid, m.fd_offset, m.shm_offset, m.len, m.flags);
        let mut b = Vec::with_capacity(MSG_HEADER_SIZE + MMAP_BODY_SIZE);
        b.extend_from_slice(&request.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&(MMAP_BODY_SIZE as u32).to_le_bytes());
        b.push(shmid);
        b.extend_from_slice(&[0u8; 7]);
        for v in [fd_offset, shm_offset, len, mflags] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        send_all(self.sock.as_fd(), &b, fd)
    }

    /// Reads what arrived without waiting and returns the complete replies as
    /// `(request, value)`. An error when the channel closed or a reply is malformed.
    fn receive(&mut self) -> std::result::Result<Vec<(u32, u64)>, String> {
        let mut buf = [0u8; 1024];
        loop {
            match hostmem_base::fd::try_recv_with_fds(self.sock.as_fd(), &mut buf) {
                // Fds that came along are closed with `got` (a reply carries none).
                Ok(got) if got.len == 0 => {
                    return Err("the frontend closed the backend channel".into())
                }
                Ok(got) => self
                    .partial
                    .extend_from_slice(buf.get(..got.len).unwrap_or_default()),
                Err(Errno::EAGAIN) => break,
                Err(e) => return Err(format!("backend channel: recvmsg: {e}")),
            }
        }
        let reply_len = MSG_HEADER_SIZE + 8;
        let mut out = Vec::new();
        while self.partial.len() >= reply_len {
            let rest = self.partial.split_off(reply_len);
            let r = std::mem::replace(&mut self.partial, rest);
            let word = |at: usize| {
                r.get(at..at + 4)
                    .and_then(|s| s.try_into().ok())
                    .map(u32::from_le_bytes)
                    .unwrap_or(0)
            };
            let (request, flags, size) = (word(0), word(4), word(8));
            if flags & FLAG_VERSION_MASK != FLAG_VERSION_1 || flags & FLAG_REPLY == 0 || size != 8 {
                return Err(format!(
                    "malformed reply on the backend channel: request {request}, flags {flags:#x}, size {size}"
                ));
            }
            let value = r
                .get(MSG_HEADER_SIZE..reply_len)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_le_bytes)
                .unwrap_or(u64::MAX);
            out.push((request, value));
        }
        Ok(out)
    }
}

/// The [`Placer`] of vhost-user mode: `SHMEM_MAP`/`SHMEM_UNMAP` on the backend channel,
/// asynchronous ([`Placer::verdicts_async`]): `begin_map` sends, the poll loop calls
/// [`ShmemPlacer::receive`] when the channel is readable and then
/// [`VirtioGpu::finish_one`] once per verdict.
///
/// [`VirtioGpu::finish_one`]: crate::virtio::VirtioGpu::finish_one
#[derive(Debug)]
pub struct ShmemPlacer {
    channel: Option<BackendChannel>,
    size: u64,
    stats: ShmemStats,
    next_ticket: u64,
    /// Requests sent and not acked, oldest first.
    inflight: VecDeque<Sent>,
    /// How long the oldest request may wait for its ack.
    ack_timeout: Duration,
    /// Verdicts received and not taken by `finish_next`, oldest first.
    verdicts: VecDeque<(u64, std::result::Result<(), PlaceError>)>,
    /// Acks still owed for requests a reset forgot: skipped when they arrive.
    stale: usize,
    /// During a reset the frontend started: nothing is sent (it waits for our reply on
    /// the main socket and would not read the backend channel).
    suspended: bool,
}

/// A request sent and not acked yet.
#[derive(Debug, Clone, Copy)]
struct Sent {
    ticket: u64,
    request: u32,
    shm_offset: u64,
    len: u64,
    at: Instant,
}

impl Sent {
    /// Names the request in a log line.
    fn describe(&self) -> String {
        format!(
            "{} #{} (shm offset {:#x}, {:#x} bytes)",
            request_name(self.request),
            self.ticket,
            self.shm_offset,
            self.len
        )
    }
}

impl ShmemPlacer {
    /// A placer for a region of `size` bytes, with no backend channel yet, waiting
    /// [`ACK_TIMEOUT`] for an ack.
    pub fn new(size: u64) -> Self {
        ShmemPlacer {
            channel: None,
            size,
            stats: ShmemStats::default(),
            next_ticket: 0,
            inflight: VecDeque::new(),
            ack_timeout: ACK_TIMEOUT,
            verdicts: VecDeque::new(),
            stale: 0,
            suspended: false,
        }
    }

    /// Sets how long a request may wait for its ack.
    pub fn set_ack_timeout(&mut self, timeout: Duration) {
        self.ack_timeout = timeout;
    }

    /// How long a request may wait for its ack.
    pub fn ack_timeout(&self) -> Duration {
        self.ack_timeout
    }

    /// When the oldest request in flight runs out of time; `None` with nothing in flight.
    pub fn ack_deadline(&self) -> Option<Instant> {
        // A timeout too large for an `Instant` is no deadline at all.
        self.inflight.front()?.at.checked_add(self.ack_timeout)
    }

    /// The oldest request in flight, named, when its deadline has passed at `now`: the
    /// frontend is not answering.
    pub fn overdue(&self, now: Instant) -> Option<String> {
        let deadline = self.ack_deadline()?;
        (now >= deadline).then(|| self.inflight.front().map(Sent::describe))?
    }

    /// Takes a (new) backend channel (`SET_BACKEND_REQ_FD`): requests in flight on the old
    /// one fail.
    pub fn set_channel(&mut self, channel: BackendChannel) {
        self.fail_inflight("the backend channel was replaced");
        self.stale = 0;
        self.channel = Some(channel);
    }

    /// The backend channel's socket, to poll.
    pub fn channel_fd(&self) -> Option<BorrowedFd<'_>> {
        self.channel.as_ref().map(BackendChannel::as_fd)
    }

    /// Starts a reset the frontend started: requests in flight fail at once (their acks
    /// will be skipped when they come), unmaps are local only until [`ShmemPlacer::resume`].
    pub fn suspend(&mut self) {
        self.suspended = true;
        self.stale += self.inflight.len();
        self.fail_inflight("the device was reset");
    }

    /// Ends [`ShmemPlacer::suspend`]; verdicts nobody settled are dropped.
    pub fn resume(&mut self) {
        self.suspended = false;
        self.verdicts.clear();
    }

    /// The counters.
    pub fn stats(&self) -> ShmemStats {
        self.stats
    }

    /// Requests sent and not acked yet.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    /// Verdicts ready for [`Placer::finish_next`].
    pub fn ready(&self) -> usize {
        self.verdicts.len()
    }

    /// Reads the acks that arrived (without waiting) and turns them into verdicts; returns
    /// how many verdicts are ready. A closed or broken channel fails everything in flight.
    pub fn receive(&mut self) -> usize {
        let Some(ch) = self.channel.as_mut() else {
            return self.verdicts.len();
        };
        match ch.receive() {
            Ok(replies) => {
                for (request, value) in replies {
                    if self.stale > 0 {
                        self.stale -= 1;
                        self.stats.stale_replies += 1;
                        continue;
                    }
                    let Some(sent) = self.inflight.pop_front() else {
                        self.break_channel(format!("an ack of request {request} nobody asked for"));
                        break;
                    };
                    if request != sent.request {
                        let expected = sent.request;
                        self.inflight.push_front(sent);
                        self.break_channel(format!(
                            "ack of request {request}, expected {expected}"
                        ));
                        break;
                    }
                    let r = self.verdict(sent.request, value);
                    self.verdicts.push_back((sent.ticket, r));
                }
            }
            Err(e) => self.break_channel(e),
        }
        self.verdicts.len()
    }

    fn verdict(&mut self, request: u32, value: u64) -> std::result::Result<(), PlaceError> {
        let what = request_name(request);
        if value != 0 {
            return Err(self.refused(what, format!("the frontend answered {value}")));
        }
        if request == BACKEND_SHMEM_MAP {
            self.stats.maps += 1;
        } else {
            self.stats.unmaps += 1;
        }
        Ok(())
    }

    /// Drops the channel: everything in flight fails, later maps are refused.
    fn break_channel(&mut self, why: String) {
        log::warn!("vhost-user: backend channel unusable: {why}");
        self.channel = None;
        self.stale = 0;
        self.fail_inflight(&why);
    }

    fn fail_inflight(&mut self, why: &str) {
        while let Some(sent) = self.inflight.pop_front() {
            let e = self.refused(request_name(sent.request), why);
            self.verdicts.push_back((sent.ticket, Err(e)));
        }
    }

    fn refused(&mut self, what: &str, e: impl std::fmt::Display) -> PlaceError {
        self.stats.refused += 1;
        VHOST_USER_WARNINGS.warn(
            "placement refused by the frontend",
            format_args!("vhost-user: {what} refused: {e}"),
        );
        PlaceError::Unspec(format!("frontend refused {what}: {e}"))
    }

    /// Sends a request; `Some(ticket)` when its ack is awaited.
    fn send(
        &mut self,
        request: u32,
        msg: &VhostUserMMap,
        fd: Option<BorrowedFd<'_>>,
    ) -> std::result::Result<Option<u64>, PlaceError> {
        let what = request_name(request);
        let Some(ch) = self.channel.as_ref() else {
            return Err(self.refused(what, "no backend channel (BACKEND_REQ)"));
        };
        if let Err(e) = ch.send(request, msg, fd) {
            let why = format!("send: {e}");
            self.break_channel(why.clone());
            return Err(self.refused(what, why));
        }
        if !ch.need_reply {
            // Without REPLY_ACK the frontend sends no ack: the request is final.
            if request == BACKEND_SHMEM_MAP {
                self.stats.maps += 1;
            } else {
                self.stats.unmaps += 1;
            }
            return Ok(None);
        }
        self.next_ticket += 1;
        self.inflight.push_back(Sent {
            ticket: self.next_ticket,
            request,
            shm_offset: msg.shm_offset,
            len: msg.len,
            at: Instant::now(),
        });
        Ok(Some(self.next_ticket))
    }

    /// Waits (at most the ack timeout) for the verdict of `ticket` and everything before it.
    fn wait_for(&mut self, ticket: Option<u64>) -> std::result::Result<(), PlaceError> {
        let Some(ticket) = ticket else { return Ok(()) };
        while let Some((t, r)) = self.finish_next() {
            if t == ticket {
                return r;
            }
        }
        Err(PlaceError::Unspec(format!(
            "request {ticket} was never sent"
        )))
    }
}

fn request_name(request: u32) -> &'static str {
    match request {
        BACKEND_SHMEM_MAP => "SHMEM_MAP",
        BACKEND_SHMEM_UNMAP => "SHMEM_UNMAP",
        _ => "backend request",
    }
}

impl Placer for ShmemPlacer {
    fn map(&mut self, req: &MapRequest<'_>) -> std::result::Result<(), PlaceError> {
        let ticket = self.begin_map(req)?;
        self.wait_for(ticket)
    }

    fn unmap(
        &mut self,
        resource_id: u32,
        offset: u64,
        len: u64,
    ) -> std::result::Result<(), PlaceError> {
        let ticket = self.begin_unmap(resource_id, offset, len)?;
        self.wait_for(ticket)
    }

    fn window_size(&self) -> u64 {
        self.size
    }

    fn begin_map(&mut self, req: &MapRequest<'_>) -> std::result::Result<Option<u64>, PlaceError> {
        if self.suspended {
            return Err(self.refused("SHMEM_MAP", "the device is being reset"));
        }
        let flags = if req.prot == Prot::READ_WRITE {
            VhostUserMMapFlags::WRITABLE
        } else {
            VhostUserMMapFlags::empty()
        };
        let msg = VhostUserMMap {
            shmid: SHMEM_ID,
            fd_offset: req.blob.fd_offset,
            shm_offset: req.offset,
            len: req.len,
            flags: flags.bits(),
            ..Default::default()
        };
        self.send(BACKEND_SHMEM_MAP, &msg, Some(req.blob.fd.as_fd()))
    }

    fn begin_unmap(
        &mut self,
        resource_id: u32,
        offset: u64,
        len: u64,
    ) -> std::result::Result<Option<u64>, PlaceError> {
        if self.suspended || self.channel.is_none() {
            // A reset the frontend started, or no channel: nothing to tell.
            log::debug!("vhost-user: resource {resource_id} dropped at {offset:#x} locally");
            return Ok(None);
        }
        let msg = VhostUserMMap {
            shmid: SHMEM_ID,
            shm_offset: offset,
            len,
            ..Default::default()
        };
        self.send(BACKEND_SHMEM_UNMAP, &msg, None)
    }

    fn finish_next(&mut self) -> Option<(u64, std::result::Result<(), PlaceError>)> {
        if let Some(v) = self.verdicts.pop_front() {
            return Some(v);
        }
        // Synchronous use (`map`/`unmap`): wait for the oldest ack.
        let timeout = self.ack_timeout;
        let start = Instant::now();
        loop {
            let ticket = self.inflight.front()?.ticket;
            let Some(fd) = self.channel_fd() else {
                self.fail_inflight("no backend channel");
                return self.verdicts.pop_front();
            };
            let left = timeout.saturating_sub(start.elapsed());
            let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
            let mut pfd = [PollFd::new(fd, PollFlags::POLLIN)];
            match poll(&mut pfd, PollTimeout::from(ms)) {
                Ok(0) => {
                    self.break_channel(format!("no ack for request {ticket} within {timeout:?}"));
                    return self.verdicts.pop_front();
                }
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => {
                    self.break_channel(format!("poll: {e}"));
                    return self.verdicts.pop_front();
                }
            }
            if self.receive() > 0 {
                return self.verdicts.pop_front();
            }
        }
    }

    fn verdicts_async(&self) -> bool {
        true
    }
}
