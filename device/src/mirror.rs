//! The device's [`Placer`]: every placement is made in the device's mirror of the window
//! and reported to the VMM over the mapping tube with the blob's fd; the guest's command
//! completes only when the VMM has acknowledged it. A refusal undoes the mirror placement,
//! so both views stay identical.
//!
//! **Overlap.** The event goes to the VMM *before* the device's own mirror placement (or
//! restore), so on two cores the VMM's MAP_FIXED and the device's run at the same time;
//! the verdict is read only after both. The window's cheap checks (range, overlap) run
//! before anything is sent. A pipelined map is announced ([`Placer::announce_map`]) and
//! placed later ([`Placer::place_announced`], which first sends whatever waits in the
//! outbox): the handler places a run of maps when the run of chains is done
//! ([`crate::gpu::Gpu::place_due`]), so the whole run reaches the VMM before the device
//! spends its MAP_FIXEDs. If the mirror placement still fails after the event left, the
//! command fails: a placement the VMM accepted is taken back with an Unmap before the
//! guest hears of it; a mirror restore that fails after the VMM was told, or an Unmap the
//! VMM refuses after the mirror was restored, breaks the tube (the device exits and the
//! VMM restores its whole window, invariant 4 in docs/invariants.md). For
//! an unmap, the guest still hears only after the VMM restored its window (invariant 2).
//!
//! **Batching.** Events wait in an outbox while [`MESSAGES_IN_FLIGHT`] of our messages
//! already wait for the VMM's answer (replies already queued are read without waiting):
//! as soon as fewer do, when the outbox holds [`MAX_BATCH`] events, or when the device
//! needs a verdict, the outbox goes as one message, a [`DeviceMsg::Batch`] with one fd per Map,
//! answered by one [`VmmMsg::Replies`] in event order. A lone event goes as a plain
//! [`DeviceMsg::Map`]/[`DeviceMsg::Unmap`]. The VMM answers in event order, so verdicts
//! keep command order.
//!
//! **Trace** (`hostmem bench`'s per-hop breakdown, off in a normal run): with
//! `MirrorPlacer::set_trace` (cargo feature `trace`) every placement gets [`DeviceStamps`], every event goes in a
//! batch asking the VMM for its [`hostmem_ipc::protocol::VmmStamps`], and the records wait
//! for `MirrorPlacer::take_trace`.
//!
//! `begin_map`/`begin_unmap` start a placement without waiting, `finish_next` waits for
//! the oldest verdict; `map`/`unmap` are both in one call.
//!
//! **Test-only failure injection** ([`MirrorFaults`], `MirrorPlacer::set_test_faults`, cargo feature `fault-injection`;
//! the device's `--test-fail-mirror-place N` / `--test-fail-mirror-restore N`): the Nth
//! mirror placement or restore fails as if its MAP_FIXED had returned ENOMEM, *after* its
//! event was sent, to exercise the take-back and the broken tube above. Off unless a
//! test sets it; nothing in a normal run does.

use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

use hostmem_base::window::{MappedBy, Window};
use hostmem_ipc::protocol::{
    monotonic_ns, DeviceMsg, DeviceStamps, Outcome, RefuseCode, TraceRecord, VmmMsg, VmmStamps,
    MAX_BATCH,
};
use hostmem_ipc::Tube;

use crate::gpu::{MapRequest, PlaceError, Placer};

/// How long the device waits for the VMM to answer one placement event.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Messages waiting at the VMM at most while the device has more events, so the VMM finds
/// the next one queued when it answers (decision 043, "Two messages in flight").
pub const MESSAGES_IN_FLIGHT: usize = 2;
/// Trace records kept at most (older ones are dropped).
pub const MAX_TRACE: usize = 16 * 1024;

/// Test-only failure injection in the mirror: counted from when it is set, the Nth
/// placement (`fail_place`) or restore (`fail_restore`) fails as if MAP_FIXED had returned
/// ENOMEM, after its event went to the VMM (the mirror keeps what it had: nothing placed,
/// or the blob not restored). Each fires once. Default: off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MirrorFaults {
    /// The Nth mirror placement from now (1: the next) fails.
    pub fail_place: Option<u64>,
    /// The Nth mirror restore from now (1: the next) fails; undoing a refused placement
    /// is not counted.
    pub fail_restore: Option<u64>,
}

/// One event sent (or in the outbox) and not settled.
#[derive(Debug)]
struct Entry {
    seq: u64,
    resource_id: u32,
    offset: u64,
    len: u64,
    map: bool,
    /// The mirror placement failed after the event left.
    mirror_err: Option<PlaceError>,
}

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
    /// Events not settled yet, oldest first.
    inflight: VecDeque<Entry>,
    /// Events not sent yet (their Map fds with them), oldest first.
    outbox: Vec<(DeviceMsg, Option<OwnedFd>)>,
    /// Events still unanswered in each message sent, oldest first.
    sent: VecDeque<usize>,
    /// The tube's receive timeout is [`REPLY_TIMEOUT`].
    timeout_set: bool,
    /// Verdicts that arrived before they were asked for.
    verdicts: HashMap<u64, Outcome>,
    /// Placements the renderer mapped itself ([`crate::backend::Backend::map_fixed`]).
    renderer_mapped: u64,
    /// Tube messages sent with events, and events sent.
    messages: u64,
    events: u64,
    /// Tracing: records being filled (by seq) and finished ones.
    trace: bool,
    woke: u64,
    open: HashMap<u64, TraceRecord>,
    records: Vec<TraceRecord>,
    /// Test-only failure injection, and the placements and restores tried since it was set.
    faults: MirrorFaults,
    places: u64,
    restores: u64,
}

fn refuse(code: RefuseCode, reason: String) -> PlaceError {
    match code {
        RefuseCode::OutOfMemory => PlaceError::OutOfMemory(reason),
        RefuseCode::InvalidParameter => PlaceError::InvalidParameter(reason),
        RefuseCode::Unspec => PlaceError::Unspec(reason),
    }
}

fn verdict(o: Outcome) -> Result<(), PlaceError> {
    match o {
        Outcome::Ok => Ok(()),
        Outcome::Refused { code, reason } => Err(refuse(code, reason)),
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
            outbox: Vec::new(),
            sent: VecDeque::new(),
            timeout_set: false,
            verdicts: HashMap::new(),
            renderer_mapped: 0,
            messages: 0,
            events: 0,
            trace: false,
            woke: 0,
            open: HashMap::new(),
            records: Vec::new(),
            faults: MirrorFaults::default(),
            places: 0,
            restores: 0,
        }
    }

    /// **Test only**: makes the Nth mirror placement or restore from now fail after its
    /// event was sent ([`MirrorFaults`]). A normal run never calls this.
    #[cfg(feature = "fault-injection")]
    pub fn set_test_faults(&mut self, faults: MirrorFaults) {
        if faults != MirrorFaults::default() {
            log::warn!("test knob: mirror failure injection {faults:?}");
        }
        self.faults = faults;
        self.places = 0;
        self.restores = 0;
    }

    /// The injected failure of this placement or restore, if the test knob names it.
    fn injected(&mut self, restore: bool, offset: u64, len: u64) -> Option<hostmem_base::Error> {
        let (n, at) = if restore {
            self.restores += 1;
            (self.restores, self.faults.fail_restore)
        } else {
            self.places += 1;
            (self.places, self.faults.fail_place)
        };
        (at == Some(n)).then(|| {
            log::warn!(
                "test knob: mirror {} {n} of {offset:#x}+{len:#x} fails",
                if restore { "restore" } else { "placement" }
            );
            hostmem_base::Error::MapFixed {
                offset,
                len,
                errno: nix::errno::Errno::ENOMEM,
            }
        })
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

    /// Tube messages that carried events, and the events they carried (their ratio is the
    /// mean batch).
    pub fn batching(&self) -> (u64, u64) {
        (self.messages, self.events)
    }

    /// Why the tube is unusable, if it is.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// True once the VMM asked for shutdown.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown
    }

    /// Starts (dropping older records) or stops tracing.
    #[cfg(feature = "trace")]
    pub fn set_trace(&mut self, on: bool) {
        self.trace = on;
        self.open.clear();
        self.records.clear();
    }

    /// True while tracing.
    pub fn tracing(&self) -> bool {
        self.trace
    }

    /// The device loop woke on a kick (trace only).
    pub fn note_woke(&mut self) {
        if self.trace {
            self.woke = monotonic_ns();
        }
    }

    /// The loop wrote the responses that were ready into the used ring: settled records are
    /// finished (trace only).
    pub fn note_used(&mut self) {
        if !self.trace || self.open.is_empty() {
            return;
        }
        let now = monotonic_ns();
        let done: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, r)| r.device.reply != 0)
            .map(|(s, _)| *s)
            .collect();
        for seq in done {
            if let Some(mut r) = self.open.remove(&seq) {
                r.device.used = now;
                if self.records.len() < MAX_TRACE {
                    self.records.push(r);
                }
            }
        }
    }

    /// Up to `max` of the finished trace records, oldest first (and forgets them).
    #[cfg(feature = "trace")]
    pub fn take_trace(&mut self, max: usize) -> Vec<TraceRecord> {
        self.records.sort_by_key(|x| x.seq);
        let n = max.min(self.records.len());
        self.records.drain(..n).collect()
    }

    fn stamp(&mut self, seq: u64, f: impl FnOnce(&mut TraceRecord)) {
        if self.trace {
            if let Some(r) = self.open.get_mut(&seq) {
                f(r);
            }
        }
    }

    fn usable(&self) -> Result<(), PlaceError> {
        match &self.broken {
            Some(why) => Err(PlaceError::Unspec(format!("mapping tube unusable: {why}"))),
            None => Ok(()),
        }
    }

    fn break_with(&mut self, why: String) -> PlaceError {
        if self.broken.is_none() {
            log::error!("mapping tube: {why}");
            self.broken = Some(why.clone());
        }
        PlaceError::Unspec(format!("mapping tube: {why}"))
    }

    /// Queues an event (and the entry that waits for its verdict) and sends what the VMM
    /// can take now.
    fn queue(&mut self, msg: DeviceMsg, fd: Option<OwnedFd>, e: Entry) {
        if self.trace {
            let r = TraceRecord {
                seq: e.seq,
                map: e.map,
                device: DeviceStamps {
                    woke: self.woke,
                    begin: monotonic_ns(),
                    ..DeviceStamps::default()
                },
                ..TraceRecord::default()
            };
            self.open.insert(e.seq, r);
        }
        self.outbox.push((msg, fd));
        self.inflight.push_back(e);
        self.pump();
    }

    /// Sends the outbox if fewer than [`MESSAGES_IN_FLIGHT`] of our messages wait for the
    /// VMM's answer (reading the replies already queued, without waiting) or if the outbox
    /// is full.
    fn pump(&mut self) {
        if self.outbox.is_empty() || self.broken.is_some() {
            return;
        }
        while self.sent.len() >= MESSAGES_IN_FLIGHT && self.outbox.len() < MAX_BATCH {
            match self.receive(false) {
                Ok(true) => {}
                Ok(false) | Err(_) => break,
            }
        }
        if self.sent.len() < MESSAGES_IN_FLIGHT || self.outbox.len() >= MAX_BATCH {
            self.flush_outbox();
        }
    }

    /// Sends every event in the outbox, as one message.
    fn flush_outbox(&mut self) {
        if self.outbox.is_empty() || self.broken.is_some() {
            return;
        }
        let out = std::mem::take(&mut self.outbox);
        let n = out.len();
        let (events, fds): (Vec<DeviceMsg>, Vec<Option<OwnedFd>>) = out.into_iter().unzip();
        let seqs: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                DeviceMsg::Map { seq, .. } | DeviceMsg::Unmap { seq, .. } => Some(*seq),
                _ => None,
            })
            .collect();
        let borrowed: Vec<_> = fds.iter().flatten().map(|f| f.as_fd()).collect();
        let sent = if n == 1 && !self.trace {
            let mut events = events;
            match events.pop() {
                Some(ev) => self.tube.send(&ev, &borrowed),
                None => Ok(()),
            }
        } else {
            let msg = DeviceMsg::Batch {
                events,
                trace: self.trace,
            };
            self.tube.send(&msg, &borrowed)
        };
        if let Err(e) = sent {
            // Every entry waiting for these verdicts fails through `broken`.
            self.break_with(format!("send: {e}"));
            return;
        }
        self.sent.push_back(n);
        self.messages += 1;
        self.events += n as u64;
        if self.trace {
            let now = monotonic_ns();
            for s in seqs {
                self.stamp(s, |r| {
                    r.device.sent = now;
                    r.batch = u32::try_from(n).unwrap_or(u32::MAX);
                });
            }
        }
    }

    /// Reads one message from the VMM (waiting for it if `wait`); its verdicts go to
    /// `verdicts`. `Ok(false)`: nothing was queued (only without `wait`).
    fn receive(&mut self, wait: bool) -> Result<bool, PlaceError> {
        self.usable()?;
        let got = if wait {
            // Once: nothing else sets this tube's timeout (a setsockopt per verdict was a
            // tenth of the device's syscalls in a pipelined batch).
            if !self.timeout_set {
                if let Err(e) = self.tube.set_recv_timeout(Some(REPLY_TIMEOUT)) {
                    return Err(self.break_with(format!("setting the reply timeout: {e}")));
                }
                self.timeout_set = true;
            }
            self.tube.recv::<VmmMsg>().map(|(m, _)| Some(m))
        } else {
            match self.tube.try_recv_bytes() {
                Ok(None) => Ok(None),
                Ok(Some((bytes, fds))) => {
                    drop(fds);
                    serde_json::from_slice::<VmmMsg>(&bytes)
                        .map(Some)
                        .map_err(hostmem_ipc::Error::from)
                }
                Err(e) => Err(e),
            }
        };
        let msg = match got {
            Ok(Some(m)) => m,
            Ok(None) => return Ok(false),
            Err(e) => return Err(self.break_with(format!("receive: {e}"))),
        };
        let now = if self.trace { monotonic_ns() } else { 0 };
        let put = |p: &mut Self, seq: u64, outcome: Outcome, vmm: Option<VmmStamps>| {
            // The VMM answers in event order, hence message by message.
            if let Some(left) = p.sent.front_mut() {
                *left = left.saturating_sub(1);
                if *left == 0 {
                    p.sent.pop_front();
                }
            }
            p.verdicts.insert(seq, outcome);
            p.stamp(seq, |r| {
                r.device.reply = now;
                r.vmm = vmm.unwrap_or_default();
            });
        };
        match msg {
            VmmMsg::Reply { seq, outcome } => put(self, seq, outcome, None),
            VmmMsg::Replies { replies } => {
                for r in replies {
                    put(self, r.seq, r.outcome, r.stamps);
                }
            }
            VmmMsg::Shutdown => {
                self.shutdown = true;
                return Err(self.break_with("shutdown requested".into()));
            }
            other => return Err(self.break_with(format!("unexpected message {other:?}"))),
        }
        Ok(true)
    }

    /// The verdict of event `seq` (sent, or sent now with the rest of the outbox).
    fn wait_verdict(&mut self, seq: u64) -> Result<(), PlaceError> {
        self.flush_outbox();
        loop {
            if let Some(o) = self.verdicts.remove(&seq) {
                return verdict(o);
            }
            self.usable()?;
            if self.sent.is_empty() {
                return Err(self.break_with(format!("event {seq} has no verdict coming")));
            }
            self.receive(true)?;
        }
    }

    /// Removes an event that never left (its entry too); false if it was sent.
    fn recall(&mut self, seq: u64) -> bool {
        let before = self.outbox.len();
        self.outbox.retain(|(m, _)| {
            !matches!(m, DeviceMsg::Map { seq: s, .. } | DeviceMsg::Unmap { seq: s, .. } if *s == seq)
        });
        if self.outbox.len() == before {
            return false;
        }
        self.inflight.retain(|e| e.seq != seq);
        self.open.remove(&seq);
        true
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
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
        let seq = self.announce_map(req)?;
        // The VMM may be placing it now: place the mirror meanwhile.
        match self.place_mirror(seq, req) {
            Ok(()) => Ok(Some(seq)),
            // Not sent yet: the command fails without the VMM.
            Err(err) if self.recall(seq) => Err(err),
            Err(err) => {
                // Sent: settled (and taken back from the VMM) in `finish_next`.
                self.note_mirror_err(seq, err);
                Ok(Some(seq))
            }
        }
    }

    fn announces(&self) -> bool {
        true
    }

    fn announce_map(&mut self, req: &MapRequest<'_>) -> Result<u64, PlaceError> {
        self.usable()?;
        // The cheap checks before the VMM hears of it (the VMA budget and the fd's facts
        // are checked by the placement itself).
        self.window
            .check_place(req.offset, req.len)
            .map_err(window_error)?;
        let fd = req
            .blob
            .fd
            .try_clone()
            .map_err(|e| PlaceError::OutOfMemory(format!("dup of the blob fd: {e}")))?;
        let seq = self.next_seq();
        let msg = DeviceMsg::Map {
            seq,
            resource_id: req.resource_id,
            offset: req.offset,
            len: req.len,
            fd_offset: req.blob.fd_offset,
            prot: req.prot.bits(),
            map_info: req.map_info,
        };
        let entry = Entry {
            seq,
            resource_id: req.resource_id,
            offset: req.offset,
            len: req.len,
            map: true,
            mirror_err: None,
        };
        self.queue(msg, Some(fd), entry);
        Ok(seq)
    }

    fn place_announced(&mut self, ticket: u64, req: &MapRequest<'_>) {
        // Whatever waits in the outbox goes first, so the VMM places while we do.
        self.flush_outbox();
        if let Err(err) = self.place_mirror(ticket, req) {
            self.note_mirror_err(ticket, err);
        }
    }

    fn begin_unmap(
        &mut self,
        resource_id: u32,
        offset: u64,
        len: u64,
    ) -> Result<Option<u64>, PlaceError> {
        self.usable()?;
        let seq = self.next_seq();
        let msg = DeviceMsg::Unmap {
            seq,
            resource_id,
            offset,
            len,
        };
        let entry = Entry {
            seq,
            resource_id,
            offset,
            len,
            map: false,
            mirror_err: None,
        };
        self.queue(msg, None, entry);
        let restored = match self.injected(true, offset, len) {
            Some(e) => Err(e),
            None => self.window.restore(offset, len),
        };
        match restored {
            Ok(_) => {
                let now = if self.trace { monotonic_ns() } else { 0 };
                self.stamp(seq, |r| r.device.mirror_done = now);
            }
            Err(e) => {
                let err = window_error(e);
                if self.recall(seq) {
                    return Err(err);
                }
                // The VMM restores its window while ours keeps the blob: the views would
                // differ. Give up the device; the VMM restores everything (invariant 4).
                return Err(self.break_with(format!(
                    "mirror restore of {offset:#x}+{len:#x} failed after the VMM was told: {err:?}"
                )));
            }
        }
        Ok(Some(seq))
    }

    fn next_verdict_ready(&mut self) -> bool {
        let Some(seq) = self.inflight.front().map(|e| e.seq) else {
            return false;
        };
        loop {
            if self.verdicts.contains_key(&seq) {
                return true;
            }
            // Replies already queued on the tube; an error marks the tube broken, and the
            // next finish fails at once.
            match self.receive(false) {
                Ok(true) => {}
                Ok(false) | Err(_) => return self.broken.is_some(),
            }
        }
    }

    fn finish_next(&mut self) -> Option<(u64, Result<(), PlaceError>)> {
        let e = self.inflight.pop_front()?;
        let v = self.wait_verdict(e.seq);
        let r = match (e.map, e.mirror_err, v) {
            (true, None, Ok(())) | (false, _, Ok(())) => Ok(()),
            (true, None, Err(refused)) => {
                // Undo the mirror so that both views stay identical.
                self.undo(e.offset, e.len);
                Err(refused)
            }
            (true, Some(err), Ok(())) => {
                // The VMM placed what our mirror could not: take it back before the guest
                // hears of the failure.
                let seq = self.next_seq();
                let msg = DeviceMsg::Unmap {
                    seq,
                    resource_id: e.resource_id,
                    offset: e.offset,
                    len: e.len,
                };
                self.flush_outbox();
                self.outbox.push((msg, None));
                if let Err(u) = self.wait_verdict(seq) {
                    self.break_with(format!(
                        "taking back {:#x}+{:#x} after the mirror failed: {u:?}",
                        e.offset, e.len
                    ));
                }
                Err(err)
            }
            (true, Some(err), Err(_)) => Err(err),
            (false, _, Err(refused)) => {
                // Our mirror is background there, the VMM's window keeps the blob: the views
                // differ. Give up the device; the VMM restores everything (invariant 4).
                Err(self.break_with(format!(
                    "the VMM refused the unmap of {:#x}+{:#x} ({refused:?}) after the mirror was restored",
                    e.offset, e.len
                )))
            }
        };
        Some((e.seq, r))
    }
}

impl MirrorPlacer {
    /// The mirror placement of Map `seq` (sent or in the outbox).
    fn place_mirror(&mut self, seq: u64, req: &MapRequest<'_>) -> Result<(), PlaceError> {
        let placed = match self.injected(false, req.offset, req.len) {
            Some(e) => Err(e),
            None => req.place_in(&self.window),
        };
        let by = placed.map_err(window_error)?;
        if by == MappedBy::Caller {
            self.renderer_mapped += 1;
            if self.renderer_mapped == 1 {
                log::info!("mirror: placing blobs with the renderer's own map_fixed");
            }
        }
        let now = if self.trace { monotonic_ns() } else { 0 };
        self.stamp(seq, |r| r.device.mirror_done = now);
        Ok(())
    }

    /// The mirror placement of Map `seq`, already sent, failed: its settling takes it back.
    fn note_mirror_err(&mut self, seq: u64, err: PlaceError) {
        if let Some(en) = self.inflight.iter_mut().find(|en| en.seq == seq) {
            en.mirror_err = Some(err);
        }
    }

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
