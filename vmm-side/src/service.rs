//! The mapping service: one thread per device that reads placement events from the
//! mapping tube, hands them to [`Hostmem`] (which checks everything) and replies.

use std::sync::Arc;

use hostmem_ipc::protocol::{DeviceMsg, VmmMsg};
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
            Err(
                e @ (TubeError::Malformed(_)
                | TubeError::UnexpectedFds { .. }
                | TubeError::TooManyFds { .. }
                | TubeError::Truncated
                | TubeError::ControlTruncated),
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
