//! hostmem-device: the virtio-gpu hostmem device (runs as the jailed `hostmem-gpu-device`).
//!
//! * [`wire`]: virtio-gpu control commands and responses in their little-endian wire layout.
//! * [`backend`]: the renderer backend trait, the `shm` backend and (feature `virgl`) the
//!   virglrenderer backend.
//! * [`gpu`]: the command handler: blob table, validation, error responses; placement goes
//!   through the [`gpu::Placer`] trait.
//! * [`display`]: scanouts, 2D resources and their guest backing, the cursor, and the
//!   [`display::FrameSink`] flushed frames go to; [`edid`]: the EDID of a scanout.
//! * [`mirror`]: the device's `Placer`: MAP_FIXED into the window mirror, then report the
//!   placement to the VMM over the mapping tube and wait for its acknowledgment.
//! * [`virtio`]: the virtio core: guest RAM (`vm-memory`) and split virtqueues
//!   (`virtio-queue`) from the transport tube, hostile-driver checks, responses through the
//!   used ring.
//! * [`process`]: the device process: seccomp, handshake, then the poll loop over the
//!   transport tube and the kick eventfds.
//! * [`vhost_user`]: the same device as a vhost-user backend (`--vhost-user`), placing
//!   blobs with `SHMEM_MAP` in the frontend's shared memory region.

#![forbid(unsafe_code)]

pub mod backend;
pub mod display;
pub mod edid;
pub mod error;
pub mod features;
pub mod gpu;
pub mod mirror;
pub mod process;
pub mod vhost_user;
pub mod virtio;
pub mod wire;

pub use error::{Error, Result};
