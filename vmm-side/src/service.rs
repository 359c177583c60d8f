//! The mapping service: one thread per device that reads placement events from the
//! mapping tube, hands them to [`Hostmem`] (which checks everything) and replies.

use std::sync::Arc;

use hostmem_ipc::protocol::{DeviceMsg, Outcome, RefuseCode, VmmMsg};
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
                match refuse_lost_fds(&message) {
                    Some(reply) => {
                        log::warn!("mapping tube: an event's fds did not arrive (EMFILE or too many fds): refused");
                        match tube.send(&reply, &[]) {
                            Ok(()) => {}
                            Err(TubeError::Hangup) => return ServeEnd::Hangup,
                            Err(e) => return ServeEnd::TubeFailed(e.to_string()),
                        }
                    }
                    None => log::warn!(
                        "mapping tube: dropped a message whose fds did not arrive and that is not an event"
                    ),
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
                log::warn!("mapping tube: dropped a bad message from the device: {e}");
                continue;
            }
            Err(e) => return ServeEnd::TubeFailed(e.to_string()),
        };
        let (seq, outcome) = match msg {
            DeviceMsg::Map {
                seq,
                resource_id,
                offset,
                len,
                fd_offset,
                prot,
                map_info: _,
            } => {
                let ev = MapEvent {
                    resource_id,
                    offset,
                    len,
                    fd_offset,
                    prot,
                };
                (seq, hostmem.handle_map(&ev, fds.pop()))
            }
            DeviceMsg::Unmap {
                seq,
                resource_id,
                offset,
                len,
            } => (seq, hostmem.handle_unmap(resource_id, offset, len)),
            other => {
                hostmem.note_protocol_error();
                log::warn!("mapping tube: unexpected message from the device: {other:?}");
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

/// The refusal for an event whose fds were lost in transit (`None` if `message` is not an
/// event with a sequence number).
fn refuse_lost_fds(message: &[u8]) -> Option<VmmMsg> {
    let seq = match serde_json::from_slice::<DeviceMsg>(message).ok()? {
        DeviceMsg::Map { seq, .. } | DeviceMsg::Unmap { seq, .. } => seq,
        _ => return None,
    };
    Some(VmmMsg::Reply {
        seq,
        outcome: Outcome::Refused {
            code: RefuseCode::OutOfMemory,
            reason: "the event's fd did not arrive: the VMM is at its fd limit (EMFILE) or too many fds were sent".into(),
        },
    })
}
