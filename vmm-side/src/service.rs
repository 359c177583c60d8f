//! The mapping service: one thread per device that reads placement events from the
//! mapping tube, hands them to [`Hostmem`] (which checks everything) and replies.
//!
//! A [`DeviceMsg::Batch`] (several events, one fd per Map in event order) is handled event
//! by event in its order, with the outcomes the same events in separate messages would
//! get, and answered by one [`VmmMsg::Replies`]; a run of Unmaps in it goes back to
//! background together ([`Hostmem::handle_unmaps`]). A traced batch (`hostmem bench`'s breakdown) gets
//! [`VmmStamps`] per event; to stamp "checks done" apart from "placed", a traced Map runs
//! the checks once on their own first (the placement repeats them; decision 047).

use std::sync::Arc;

use std::os::fd::{AsFd, OwnedFd};

use hostmem_ipc::protocol::{
    monotonic_ns, BatchReply, DeviceMsg, Outcome, RefuseCode, VmmMsg, VmmStamps,
};
use hostmem_ipc::{Error as TubeError, Tube};

use crate::hostmem::{Hostmem, MapEvent};

/// Why the service stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServeEnd {
    /// The device closed its end (it exited or was killed).
    Hangup,
    /// The tube failed in a way that leaves it unusable.
    TubeFailed(String),
}

/// Serves placement events until the device goes away. Never panics on device input: bad
/// messages are logged, counted and, where they carry a sequence number, refused.
pub fn serve(hostmem: &Hostmem, tube: &Arc<Tube>) -> ServeEnd {
    loop {
        let (msg, mut fds) = match tube.recv::<DeviceMsg>() {
            Ok(m) => m,
            Err(TubeError::Hangup) => return ServeEnd::Hangup,
            Err(TubeError::ControlTruncated { message }) => {
                // The event arrived but its fd did not (we are at our fd limit, or the device
                // sent far too many): answer it, so the device restores its mirror and fails
                // the guest's command instead of waiting for a reply that never comes.
                hostmem.note_protocol_error();
                match refuse_lost_fds(hostmem, &message) {
                    Some(reply) => {
                        hostmem.warn(
                            "event fds lost",
                            format_args!("mapping tube: an event's fds did not arrive (EMFILE or too many fds): refused"),
                        );
                        match tube.send(&reply, &[]) {
                            Ok(()) => {}
                            Err(TubeError::Hangup) => return ServeEnd::Hangup,
                            Err(e) => return ServeEnd::TubeFailed(e.to_string()),
                        }
                    }
                    None => {
                        hostmem.warn(
                            "event fds lost",
                            format_args!("mapping tube: dropped a message whose fds did not arrive and that is not an event"),
                        );
                    }
                }
                continue;
            }
            Err(
                e @ (TubeError::Malformed(_)
                | TubeError::UnexpectedFds { .. }
                | TubeError::TooManyFds { .. }
                | TubeError::Truncated),
            ) => {
                // The offending message's fds are already closed by the tube.
                hostmem.note_protocol_error();
                hostmem.warn(
                    "bad message",
                    format_args!("mapping tube: dropped a bad message from the device: {e}"),
                );
                continue;
            }
            Err(e) => return ServeEnd::TubeFailed(e.to_string()),
        };
        // Frames and cursor updates need no reply: checked and kept (`display`).
        if let DeviceMsg::Frame(f) = &msg {
            hostmem.frames().receive(f, fds, &|id| hostmem.given_as(id));
            continue;
        }
        if let DeviceMsg::Cursor(c) = &msg {
            hostmem.frames().cursor(c);
            continue;
        }
        if let DeviceMsg::Batch { events, trace } = msg {
            let replies = handle_batch(hostmem, events, fds, trace);
            match tube.send(&VmmMsg::Replies { replies }, &[]) {
                Ok(()) => {}
                Err(TubeError::Hangup) => return ServeEnd::Hangup,
                Err(e) => return ServeEnd::TubeFailed(e.to_string()),
            }
            continue;
        }
        let (seq, outcome) = match map_event(msg) {
            Ok((seq, ev)) => (seq, hostmem.handle_map(&ev, fds.pop())),
            Err(DeviceMsg::Unmap {
                seq,
                resource_id,
                offset,
                len,
            }) => (seq, hostmem.handle_unmap(resource_id, offset, len)),
            Err(other) => {
                hostmem.note_protocol_error();
                hostmem.warn(
                    "unexpected message",
                    format_args!("mapping tube: unexpected message from the device: {other:?}"),
                );
                continue;
            }
        };
        let reply = VmmMsg::Reply { seq, outcome };
        match tube.send(&reply, &[]) {
            Ok(()) => {}
            Err(TubeError::Hangup) => return ServeEnd::Hangup,
            Err(e) => return ServeEnd::TubeFailed(e.to_string()),
        }
    }
}

/// A Map's sequence number and the event it asks the window for; any other message comes
/// back as it was.
fn map_event(msg: DeviceMsg) -> Result<(u64, MapEvent), DeviceMsg> {
    match msg {
        DeviceMsg::Map {
            seq,
            resource_id,
            offset,
            len,
            fd_offset,
            prot,
            map_info: _,
        } => Ok((
            seq,
            MapEvent {
                resource_id,
                offset,
                len,
                fd_offset,
                prot,
            },
        )),
        other => Err(other),
    }
}

/// Handles the events of one batch in order; `fds` are the Maps' fds in event order (the
/// tube checked their number). A nested batch or a non-event inside is a protocol error
/// and gets no verdict (it has no sequence number).
fn handle_batch(
    hostmem: &Hostmem,
    events: Vec<DeviceMsg>,
    fds: Vec<OwnedFd>,
    trace: bool,
) -> Vec<BatchReply> {
    let received = if trace { monotonic_ns() } else { 0 };
    let mut fds = fds.into_iter();
    let mut replies = Vec::with_capacity(events.len());
    let mut events = events.into_iter().peekable();
    while let Some(ev) = events.next() {
        let mut st = VmmStamps {
            received,
            ..VmmStamps::default()
        };
        let (seq, outcome) = match map_event(ev) {
            Ok((seq, ev)) => {
                let fd = fds.next();
                if trace {
                    if let Some(f) = &fd {
                        if let Ok(facts) = hostmem_base::shm::mapping_facts(f.as_fd()) {
                            let _ = hostmem.check_map(&ev, &facts);
                        }
                    }
                    st.checked = monotonic_ns();
                }
                (seq, hostmem.handle_map(&ev, fd))
            }
            Err(DeviceMsg::Unmap {
                seq,
                resource_id,
                offset,
                len,
            }) => {
                // A run of Unmaps goes back to background together (Hostmem::handle_unmaps).
                let mut run = vec![(seq, (resource_id, offset, len))];
                while let Some(DeviceMsg::Unmap { .. }) = events.peek() {
                    if let Some(DeviceMsg::Unmap {
                        seq,
                        resource_id,
                        offset,
                        len,
                    }) = events.next()
                    {
                        run.push((seq, (resource_id, offset, len)));
                    }
                }
                st.checked = st.received;
                let reqs: Vec<(u32, u64, u64)> = run.iter().map(|r| r.1).collect();
                let outcomes = hostmem.handle_unmaps(&reqs);
                if trace {
                    st.placed = monotonic_ns();
                }
                for ((seq, _), outcome) in run.into_iter().zip(outcomes) {
                    replies.push(BatchReply {
                        seq,
                        outcome,
                        stamps: trace.then_some(st),
                    });
                }
                continue;
            }
            Err(other) => {
                hostmem.note_protocol_error();
                hostmem.warn(
                    "unexpected message",
                    format_args!(
                        "mapping tube: a batch holds a message that is no event: {other:?}"
                    ),
                );
                continue;
            }
        };
        if trace {
            st.placed = monotonic_ns();
        }
        replies.push(BatchReply {
            seq,
            outcome,
            stamps: trace.then_some(st),
        });
    }
    if trace {
        let now = monotonic_ns();
        for r in &mut replies {
            if let Some(s) = &mut r.stamps {
                s.replied = now;
            }
        }
    }
    replies
}

/// The refusal for an event whose fds were lost in transit (`None` if `message` is not an
/// event with a sequence number).
fn refuse_lost_fds(hostmem: &Hostmem, message: &[u8]) -> Option<VmmMsg> {
    let refused = || {
        Outcome::Refused {
        code: RefuseCode::OutOfMemory,
        reason: "the event's fd did not arrive: the VMM is at its fd limit (EMFILE) or too many fds were sent".into(),
    }
    };
    match serde_json::from_slice::<DeviceMsg>(message).ok()? {
        DeviceMsg::Map { seq, .. } | DeviceMsg::Unmap { seq, .. } => Some(VmmMsg::Reply {
            seq,
            outcome: refused(),
        }),
        // A batch: its Maps are refused (no fd is there to match them), its Unmaps, which
        // need none, are done, so that both views stay the same.
        DeviceMsg::Batch { events, .. } => Some(VmmMsg::Replies {
            replies: events
                .into_iter()
                .filter_map(|e| match e {
                    DeviceMsg::Map { seq, .. } => Some(BatchReply {
                        seq,
                        outcome: refused(),
                        stamps: None,
                    }),
                    DeviceMsg::Unmap {
                        seq,
                        resource_id,
                        offset,
                        len,
                    } => Some(BatchReply {
                        seq,
                        outcome: hostmem.handle_unmap(resource_id, offset, len),
                        stamps: None,
                    }),
                    _ => None,
                })
                .collect(),
        }),
        _ => None,
    }
}
