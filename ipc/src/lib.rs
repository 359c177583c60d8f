//! hostmem-ipc: the message tube between the VMM and the device, and the protocol on it.
//!
//! A [`Tube`] is a `SOCK_SEQPACKET` socket: one message per datagram, so framing is the
//! kernel's job. Typed messages travel as serde_json with up to [`MAX_FDS`] fds attached
//! via `SCM_RIGHTS`. Every failure on receive is a typed [`Error`],
//! and any fds that arrived with a bad message are closed, never leaked.
//!
//! [`protocol`] holds the message types and the versioned `Hello` handshake; [`pixel`] the
//! scanout pixel formats both sides of a frame agree on.

#![forbid(unsafe_code)]

pub mod pixel;
pub mod protocol;
mod tube;

pub use tube::{Error, Message, Result, Tube, MAX_FDS, MAX_MESSAGE, REPLY_SPIN};
