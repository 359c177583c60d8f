//! The crate's error type: one variant per failed operation.
//!
//! Guest-visible failures are not errors of this type: the command handler answers them
//! with virtio-gpu error responses ([`crate::wire::ErrorCode`]). This enum is for the
//! device process itself (start-up, tubes, backends). Extend it by appending variants.

/// Result alias for hostmem-device.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can fail in hostmem-device outside the guest's command stream.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A buffer is not a well-formed virtio-gpu command or response.
    #[error("virtio-gpu wire format: {0}")]
    Wire(#[from] crate::wire::WireError),
    /// A hostmem-base operation (memfd, mapping, window, fd) failed.
    #[error(transparent)]
    Base(#[from] hostmem_base::Error),
    /// The control queue or mapping tube failed.
    #[error("tube: {0}")]
    Tube(#[from] hostmem_ipc::Error),
    /// Creating or driving a renderer backend failed.
    #[error("backend: {0}")]
    Backend(String),
    /// The peer broke the protocol (unexpected message, missing fd, ...).
    #[error("protocol: {0}")]
    Protocol(String),
    /// Guest RAM from the transport could not be taken (bad region, short fd, mmap).
    #[error("guest memory: {0}")]
    GuestMemory(String),
    /// A queue setup from the transport was refused.
    #[error("queue {index}: {reason}")]
    QueueSetup {
        /// Queue index.
        index: u16,
        /// Why.
        reason: String,
    },
    /// Polling the transport tube and the kick eventfds failed.
    #[error("poll: {0}")]
    Poll(nix::errno::Errno),
    /// The run-time seccomp filter could not be stacked.
    #[error("jail: {0}")]
    Jail(#[from] hostmem_jail::Error),
}
