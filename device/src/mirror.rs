//! The device's [`Placer`]: every placement is made in the device's mirror of the window
//! first (MAP_FIXED), then reported to the VMM over the mapping tube with the blob's fd; the
//! guest's command completes only when the VMM has acknowledged it. A refusal undoes the
//! mirror placement, so both views stay identical.
//!
//! Unmap restores the mirror's background first, then reports; the VMM restores its own
//! window before it acknowledges, so the guest never sees the blob after UNMAP_BLOB.
//!
//! Placements can be pipelined: `begin_map`/`begin_unmap` change the mirror and send the
//! event without waiting, `finish_next` waits for the oldest verdict (the VMM answers in
//! event order) and undoes a refused placement. `map`/`unmap` are both in one call.

use std::collections::VecDeque;
use std::os::fd::AsFd;
use std::time::Duration;

use hostmem_base::window::{MappedBy, Window};
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
    /// Events sent and not answered yet, oldest first: their seq and, for a placement, the
    /// range to undo if the VMM refuses it.
    inflight: VecDeque<(u64, Option<(u64, u64)>)>,
    /// Placements the renderer mapped itself ([`crate::backend::Backend::map_fixed`]).
    renderer_mapped: u64,
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
            inflight: VecDeque::new(),
            renderer_mapped: 0,
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

    /// How many placements the renderer mapped itself (virglrenderer's map_fixed) rather
    /// than the mirror's MAP_FIXED of the exported fd.
    pub fn renderer_mapped(&self) -> u64 {
        self.renderer_mapped
    }

    /// Why the tube is unusable, if it is.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// True once the VMM asked for shutdown.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown
    }

    /// Sends an event (the next seq) without waiting for its reply.
    fn send_event(
        &mut self,
        msg: DeviceMsg,
        fd: Option<std::os::fd::BorrowedFd<'_>>,
    ) -> Result<(), PlaceError> {
        if let Some(why) = &self.broken {
            return Err(PlaceError::Unspec(format!("mapping tube unusable: {why}")));
        }
        let fds: Vec<_> = fd.into_iter().collect();
        if let Err(e) = self.tube.send(&msg, &fds) {
            return Err(self.break_with(format!("send: {e}")));
        }
        Ok(())
    }

    /// Waits for the reply to event `seq`, the oldest unanswered one.
    fn wait_reply(&mut self, seq: u64) -> Result<(), PlaceError> {
        if let Some(why) = &self.broken {
            return Err(PlaceError::Unspec(format!("mapping tube unusable: {why}")));
        }
        if let Err(e) = self.tube.set_recv_timeout(Some(REPLY_TIMEOUT)) {
            return Err(self.break_with(format!("setting the reply timeout: {e}")));
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
        let ticket = self.begin_map(req)?;
        self.finish(ticket)
    }

    fn unmap(&mut self, resource_id: u32, offset: u64, len: u64) -> Result<(), PlaceError> {
        let ticket = self.begin_unmap(resource_id, offset, len)?;
        self.finish(ticket)
    }

    fn window_size(&self) -> u64 {
        self.window.size()
    }

    fn begin_map(&mut self, req: &MapRequest<'_>) -> Result<Option<u64>, PlaceError> {
        let by = req.place_in(&self.window).map_err(window_error)?;
        if by == MappedBy::Caller {
            self.renderer_mapped += 1;
            if self.renderer_mapped == 1 {
                log::info!("mirror: placing blobs with the renderer's own map_fixed");
            }
        }
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
        if let Err(e) = self.send_event(msg, Some(req.blob.fd.as_fd())) {
            self.undo(req.offset, req.len);
            return Err(e);
        }
        self.inflight
            .push_back((self.seq, Some((req.offset, req.len))));
        Ok(Some(self.seq))
    }

    fn begin_unmap(
        &mut self,
        resource_id: u32,
        offset: u64,
        len: u64,
    ) -> Result<Option<u64>, PlaceError> {
        self.window.restore(offset, len).map_err(window_error)?;
        self.seq += 1;
        let msg = DeviceMsg::Unmap {
            seq: self.seq,
            resource_id,
            offset,
            len,
        };
        self.send_event(msg, None)?;
        self.inflight.push_back((self.seq, None));
        Ok(Some(self.seq))
    }

    fn finish_next(&mut self) -> Option<(u64, Result<(), PlaceError>)> {
        let (seq, undo) = self.inflight.pop_front()?;
        let r = self.wait_reply(seq);
        if let (Err(_), Some((offset, len))) = (&r, undo) {
            // Undo the mirror so that both views stay identical.
            self.undo(offset, len);
        }
        Some((seq, r))
    }
}

impl MirrorPlacer {
    /// Waits for the verdicts of everything started before `ticket`, then for its own.
    fn finish(&mut self, ticket: Option<u64>) -> Result<(), PlaceError> {
        let Some(ticket) = ticket else { return Ok(()) };
        while let Some((seq, r)) = self.finish_next() {
            if seq == ticket {
                return r;
            }
        }
        Err(PlaceError::Unspec(format!("event {ticket} was never sent")))
    }

    fn undo(&mut self, offset: u64, len: u64) {
        if let Err(undo) = self.window.restore(offset, len) {
            log::error!("undo of mirror placement at {offset:#x} failed: {undo}");
        }
    }
}
