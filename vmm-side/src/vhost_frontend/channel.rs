//! The backend channel: the device's `SHMEM_MAP`/`SHMEM_UNMAP` requests, each checked and
//! placed by [`Hostmem`] before the ack, served on a thread of its own (see the parent
//! module's "Threads").

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use hostmem_device::vhost_user::SHMEM_ID;
use hostmem_ipc::protocol::{Outcome, RefuseCode};
use vhost::vhost_user::message::{VhostUserMMap, VhostUserMMapFlags};
use vhost::vhost_user::{
    Error as VuError, Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandler,
};

use super::PAGE;
use crate::hostmem::{Hostmem, MapEvent};

/// The frontend's side of the backend channel: `SHMEM_MAP`/`SHMEM_UNMAP` checked and placed
/// by [`Hostmem`] (see the module doc).
#[derive(Debug)]
pub struct ShmemService {
    hostmem: Arc<Hostmem>,
}

impl ShmemService {
    /// A service placing into `hostmem`'s window.
    pub fn new(hostmem: Arc<Hostmem>) -> Self {
        ShmemService { hostmem }
    }
}

/// Backend requests refused before they reach `Hostmem`, by kind.
pub(crate) static NACKS: hostmem_base::log_limit::LogLimiter =
    hostmem_base::log_limit::LogLimiter::new("hostmem_vmm::vhost_frontend");

/// The id a placement at `offset` is known by (its page index).
fn placement_id(offset: u64) -> Option<u32> {
    u32::try_from(offset / PAGE).ok()
}

/// A refused backend request, logged rate-limited (the device can send as many as it
/// likes; SHMEM_MAPs that reach `Hostmem` are logged there).
fn nack(errno: i32, why: &str) -> std::io::Error {
    NACKS.warn(
        "backend request refused",
        format_args!("vhost-user frontend: nack: {why}"),
    );
    std::io::Error::from_raw_os_error(errno)
}

fn outcome(o: Outcome) -> std::io::Result<u64> {
    match o {
        Outcome::Ok => Ok(0),
        Outcome::Refused { code, .. } => Err(std::io::Error::from_raw_os_error(match code {
            RefuseCode::OutOfMemory => libc::ENOMEM,
            RefuseCode::InvalidParameter => libc::EINVAL,
            RefuseCode::Unspec => libc::EIO,
        })),
    }
}

impl VhostUserFrontendReqHandler for ShmemService {
    fn shmem_map(&self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> std::io::Result<u64> {
        // Copies: the message struct is packed.
        let (shmid, offset, len, fd_offset, flags) =
            (req.shmid, req.shm_offset, req.len, req.fd_offset, req.flags);
        if shmid != SHMEM_ID {
            self.hostmem.note_protocol_error();
            return Err(nack(libc::EINVAL, &format!("SHMEM_MAP for region {shmid}")));
        }
        let Some(resource_id) = placement_id(offset) else {
            self.hostmem.note_protocol_error();
            return Err(nack(libc::EINVAL, &format!("SHMEM_MAP at {offset:#x}")));
        };
        let writable =
            VhostUserMMapFlags::from_bits_truncate(flags).contains(VhostUserMMapFlags::WRITABLE);
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // The library lends the fd for the call; Hostmem takes an owned one (and closes
        // it once placed: the mapping keeps the file).
        let fd = match hostmem_base::fd::dup_raw(fd.as_raw_fd()) {
            Ok(fd) => fd,
            Err(e) => return Err(nack(e as i32, &format!("dup of the blob fd: {e}"))),
        };
        let ev = MapEvent {
            resource_id,
            offset,
            len,
            fd_offset,
            prot: prot as u32,
        };
        outcome(self.hostmem.handle_map(&ev, Some(fd)))
    }

    fn shmem_unmap(&self, req: &VhostUserMMap) -> std::io::Result<u64> {
        let (shmid, offset, len) = (req.shmid, req.shm_offset, req.len);
        if shmid != SHMEM_ID {
            self.hostmem.note_protocol_error();
            return Err(nack(
                libc::EINVAL,
                &format!("SHMEM_UNMAP for region {shmid}"),
            ));
        }
        let Some(resource_id) = placement_id(offset) else {
            return Err(nack(libc::EINVAL, &format!("SHMEM_UNMAP at {offset:#x}")));
        };
        outcome(self.hostmem.handle_unmap(resource_id, offset, len))
    }
}

/// Polls `fd` without sleeping until it is readable or `spin` passed (yielding the CPU
/// between looks), as the native mapping service's tube does before it sleeps
/// ([`hostmem_ipc::REPLY_SPIN`]): the device's next request (the unmap after a map, the
/// next map of a burst) mostly comes sooner than a wake-up from sleep would take.
fn spin_until_readable(fd: &OwnedFd, spin: Duration) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let t0 = Instant::now();
    loop {
        let mut p = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut p, PollTimeout::ZERO) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => {}
            // Readable, hung up or broken: the blocking receive says which.
            Ok(_) | Err(_) => return,
        }
        if t0.elapsed() >= spin {
            return;
        }
        std::thread::yield_now();
    }
}

/// The backend channel served on its own thread. The thread hands the request handler back
/// when it ends, so the socket's fd number stays ours until [`Channel::stop`] joined it.
pub(super) struct Channel {
    raw: RawFd,
    thread: Option<JoinHandle<FrontendReqHandler<ShmemService>>>,
}

impl Channel {
    /// Creates the channel, gives the device its end (`SET_BACKEND_REQ_FD`) and starts
    /// serving it on a thread restricted to `cpus` (empty: any), as the native mapping
    /// service is ([`crate::device::DeviceConfig::service_cpus`]).
    pub(super) fn start(
        fe: &mut Frontend,
        hostmem: Arc<Hostmem>,
        pid: i32,
        cpus: Vec<usize>,
    ) -> anyhow::Result<Channel> {
        let mut handler = FrontendReqHandler::new(Arc::new(ShmemService::new(hostmem.clone())))
            .context("creating the backend channel")?;
        handler.set_reply_ack_flag(true);
        fe.set_backend_request_fd(&handler.get_tx_raw_fd())
            .context("SET_BACKEND_REQ_FD")?;
        let raw = handler.as_raw_fd();
        // What the thread polls before each blocking receive (the same open file
        // description as the handler's socket).
        let look = hostmem_base::fd::dup_raw(raw).context("dup of the backend channel")?;
        let thread = std::thread::Builder::new()
            .name(format!("vhost-user-channel-{pid}"))
            .spawn(move || {
                crate::affinity::pin_self_or_warn(&cpus, "vhost-user channel");
                loop {
                    spin_until_readable(&look, hostmem_ipc::REPLY_SPIN);
                    match handler.handle_request() {
                        // A refusal was nacked; the device fails the guest's command.
                        Ok(_) | Err(VuError::ReqHandlerError(_)) => {}
                        Err(VuError::Disconnected | VuError::PartialMessage) => break,
                        Err(e) => {
                            hostmem.note_protocol_error();
                            log::warn!("vhost-user frontend: backend channel: {e}; closed");
                            break;
                        }
                    }
                }
                handler
            })
            .context("spawning the backend channel thread")?;
        Ok(Channel {
            raw,
            thread: Some(thread),
        })
    }

    pub(super) fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Ends the thread: our end of the channel is shut down (the handler also holds the
    /// device's end, so the device's death alone is no EOF), then joined.
    pub(super) fn stop(&mut self) {
        if let Some(t) = self.thread.take() {
            // The fd is still open: the thread returns the handler that owns it.
            if let Err(e) = nix::sys::socket::shutdown(self.raw, nix::sys::socket::Shutdown::Both) {
                log::debug!("vhost-user frontend: shutting the backend channel down: {e}");
            }
            match t.join() {
                Ok(handler) => drop(handler),
                Err(_) => log::error!("vhost-user frontend: the backend channel thread panicked"),
            }
        }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        self.stop();
    }
}
