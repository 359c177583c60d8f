//! The device's [`Placer`]: every placement is made in the device's mirror of the window
//! first (MAP_FIXED), then reported to the VMM over the mapping tube with the blob's fd; the
//! guest's command completes only when the VMM has acknowledged it. A refusal undoes the
//! mirror placement, so both views stay identical.
//!
//! Unmap restores the mirror's background first, then reports; the VMM restores its own
//! window before it acknowledges, so the guest never sees the blob after UNMAP_BLOB.

use std::os::fd::AsFd;
use std::time::Duration;

use hostmem_base::window::Window;
use hostmem_ipc::protocol::{DeviceMsg, Outcome, RefuseCode, VmmMsg};
use hostmem_ipc::Tube;

use crate::gpu::{MapRequest, PlaceError, Placer};

/// How long the device waits for the VMM to answer one placement event.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Places blobs in the mirror and reports them to the VMM.
#[derive(Debug)]
pub struct MirrorPlacer {
    window: Window,
    tube: Tube,
    seq: u64,
    /// Set when the tube failed: the VMM is gone or broke protocol; the device should exit.
    broken: Option<String>,
    /// Set when the VMM asked us to shut down while we waited for a reply.
    shutdown: bool,
}

fn refuse(code: RefuseCode, reason: String) -> PlaceError {
    match code {
        RefuseCode::OutOfMemory => PlaceError::OutOfMemory(reason),
        RefuseCode::InvalidParameter => PlaceError::InvalidParameter(reason),
        RefuseCode::Unspec => PlaceError::Unspec(reason),
    }
}

fn window_error(e: hostmem_base::Error) -> PlaceError {
    use hostmem_base::Error as E;
    match e {
        E::VmaHeadroom { .. } => PlaceError::OutOfMemory(e.to_string()),
        E::MapFixed {
            errno: nix::errno::Errno::ENOMEM,
            ..
        } => PlaceError::OutOfMemory(e.to_string()),
        E::Overlap { .. }
        | E::OutOfRange { .. }
        | E::Misaligned { .. }
        | E::InvalidSize(_)
        | E::BadProtection(_)
        | E::NotPlaced { .. } => PlaceError::InvalidParameter(e.to_string()),
        other => PlaceError::Unspec(other.to_string()),
    }
}

impl MirrorPlacer {
    /// A placer over `window` (the mirror) reporting on `tube`.
    pub fn new(window: Window, tube: Tube) -> Self {
        // The VMM answers each event within microseconds: poll for it before sleeping.
        tube.set_recv_spin(hostmem_ipc::REPLY_SPIN);
        MirrorPlacer {
            window,
            tube,
            seq: 0,
            broken: None,
            shutdown: false,
        }
    }

    /// The mirror.
    pub fn window(&self) -> &Window {
        &self.window
    }

    /// The mapping tube.
    pub fn tube(&self) -> &Tube {
        &self.tube
    }

    /// Why the tube is unusable, if it is.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// True once the VMM asked for shutdown.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown
    }

    /// Sends an event and waits for the reply with the same seq.
    fn report(
        &mut self,
        msg: DeviceMsg,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<(), PlaceError> {
        if let Some(why) = &self.broken {
            return Err(PlaceError::Unspec(format!("mapping tube unusable: {why}")));
        }
        let seq = self.seq;
        let fds: Vec<_> = fd.into_iter().collect();
        let sent = self
            .tube
            .send(&msg, &fds)
            .and_then(|()| self.tube.set_recv_timeout(Some(REPLY_TIMEOUT)));
        if let Err(e) = sent {
            return Err(self.break_with(format!("send: {e}")));
        }
        match self.tube.recv::<VmmMsg>() {
            Ok((VmmMsg::Reply { seq: s, outcome }, _)) if s == seq => match outcome {
                Outcome::Ok => Ok(()),
                Outcome::Refused { code, reason } => Err(refuse(code, reason)),
            },
            Ok((VmmMsg::Shutdown, _)) => {
                self.shutdown = true;
                Err(self.break_with("shutdown requested".into()))
            }
            Ok((other, _)) => Err(self.break_with(format!("unexpected message {other:?}"))),
            Err(e) => Err(self.break_with(format!("receive: {e}"))),
        }
    }

    fn break_with(&mut self, why: String) -> PlaceError {
        log::error!("mapping tube: {why}");
        self.broken = Some(why.clone());
        PlaceError::Unspec(format!("mapping tube: {why}"))
    }
}

impl Placer for MirrorPlacer {
    fn map(&mut self, req: &MapRequest<'_>) -> Result<(), PlaceError> {
        self.window
            .place(
                req.offset,
                req.len,
                req.blob.fd.as_fd(),
                req.blob.fd_offset,
                req.prot,
            )
            .map_err(window_error)?;
        self.seq += 1;
        let msg = DeviceMsg::Map {
            seq: self.seq,
            resource_id: req.resource_id,
            offset: req.offset,
            len: req.len,
            fd_offset: req.blob.fd_offset,
            prot: req.prot.bits(),
            map_info: req.map_info,
        };
        if let Err(e) = self.report(msg, Some(req.blob.fd.as_fd())) {
            // Undo the mirror so that both views stay identical.
            if let Err(undo) = self.window.restore(req.offset, req.len) {
                log::error!(
                    "undo of mirror placement at {:#x} failed: {undo}",
                    req.offset
                );
            }
            return Err(e);
        }
        Ok(())
    }

    fn unmap(&mut self, resource_id: u32, offset: u64, len: u64) -> Result<(), PlaceError> {
        self.window.restore(offset, len).map_err(window_error)?;
        self.seq += 1;
        let msg = DeviceMsg::Unmap {
            seq: self.seq,
            resource_id,
            offset,
            len,
        };
        self.report(msg, None)
    }

    fn window_size(&self) -> u64 {
        self.window.size()
    }
}
