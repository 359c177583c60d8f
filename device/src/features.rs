//! The virtio feature bits of the GPU, in one place for both transports: the VMM's
//! virtio-pci function (`hostmem_vmm::virtio_pci`) and the vhost-user backend
//! ([`crate::vhost_user`]). The bit numbers come from the kernel's headers as rust-vmm's
//! `virtio-bindings` has them (`virtio_config.h`, `virtio_ring.h`, `virtio_gpu.h`); here
//! they are masks.

use virtio_bindings::{virtio_config, virtio_gpu, virtio_ring};

/// The mask of feature bit `n`.
const fn bit(n: u32) -> u64 {
    1 << n
}

/// `VIRTIO_F_VERSION_1` (bit 32): a virtio 1.x device; required of the driver.
pub const VIRTIO_F_VERSION_1: u64 = bit(virtio_config::VIRTIO_F_VERSION_1);
/// `VIRTIO_F_RING_EVENT_IDX` (bit 29; `VIRTIO_RING_F_EVENT_IDX`): used/avail event
/// indexes. Offered over vhost-user; the virtio-pci function forwards it if it is ever
/// negotiated.
pub const VIRTIO_F_RING_EVENT_IDX: u64 = bit(virtio_ring::VIRTIO_RING_F_EVENT_IDX);
/// `VIRTIO_GPU_F_VIRGL` (bit 0): 3D contexts and capsets.
pub const VIRTIO_GPU_F_VIRGL: u64 = bit(virtio_gpu::VIRTIO_GPU_F_VIRGL);
/// `VIRTIO_GPU_F_EDID` (bit 1): the device answers `GET_EDID`.
pub const VIRTIO_GPU_F_EDID: u64 = bit(virtio_gpu::VIRTIO_GPU_F_EDID);
/// `VIRTIO_GPU_F_RESOURCE_UUID` (bit 2): the device answers `RESOURCE_ASSIGN_UUID`.
pub const VIRTIO_GPU_F_RESOURCE_UUID: u64 = bit(virtio_gpu::VIRTIO_GPU_F_RESOURCE_UUID);
/// `VIRTIO_GPU_F_RESOURCE_BLOB` (bit 3): blob resources, `RESOURCE_MAP_BLOB`.
pub const VIRTIO_GPU_F_RESOURCE_BLOB: u64 = bit(virtio_gpu::VIRTIO_GPU_F_RESOURCE_BLOB);
/// `VIRTIO_GPU_F_CONTEXT_INIT` (bit 4): `CTX_CREATE` names its capset.
pub const VIRTIO_GPU_F_CONTEXT_INIT: u64 = bit(virtio_gpu::VIRTIO_GPU_F_CONTEXT_INIT);

/// The GPU's features, offered by both transports (vhost-user adds
/// [`VIRTIO_F_RING_EVENT_IDX`] and `VHOST_USER_F_PROTOCOL_FEATURES`).
pub const GPU_FEATURES: u64 = VIRTIO_F_VERSION_1
    | VIRTIO_GPU_F_VIRGL
    | VIRTIO_GPU_F_EDID
    | VIRTIO_GPU_F_RESOURCE_UUID
    | VIRTIO_GPU_F_RESOURCE_BLOB
    | VIRTIO_GPU_F_CONTEXT_INIT;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bits_are_the_specs() {
        assert_eq!(VIRTIO_F_VERSION_1, 1 << 32);
        assert_eq!(VIRTIO_F_RING_EVENT_IDX, 1 << 29);
        assert_eq!(GPU_FEATURES, (1 << 32) | 0x1f);
    }
}
