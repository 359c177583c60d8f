//! What this crate's driver-side suites share (each uses a subset): eventfds, guest RAM on a
//! memfd, and the split-ring layout they all drive by hand — the descriptor table, avail
//! ring and used ring in the first three pages of RAM at 1 MiB — with writers for
//! descriptors and avail entries and readers for the used ring.
#![allow(dead_code)]

use std::os::fd::OwnedFd;

use hostmem_base::shm::SharedMemory;
use hostmem_device::virtio::{guest_memory, GuestMemoryMmap};
use hostmem_ipc::protocol::GuestRegion;
use nix::sys::eventfd::{EfdFlags, EventFd};
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM starts at 1 MiB (GPA 0 and the hostmem window at 4 GiB are outside).
pub const RAM_GPA: u64 = 0x10_0000;
/// The control queue's descriptor table.
pub const DESC: u64 = RAM_GPA;
/// The control queue's avail ring.
pub const AVAIL: u64 = RAM_GPA + 0x1000;
/// The control queue's used ring.
pub const USED: u64 = RAM_GPA + 0x2000;

/// A non-blocking eventfd (kick or call).
pub fn efd() -> OwnedFd {
    EventFd::from_value_and_flags(0, EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .expect("eventfd")
        .into()
}

/// The one RAM region: `size` bytes at [`RAM_GPA`], from the start of its memfd.
pub fn region(size: u64) -> GuestRegion {
    GuestRegion {
        gpa: RAM_GPA,
        size,
        fd_offset: 0,
    }
}

/// Guest RAM of `size` bytes on a fresh memfd: the memfd (to hand to the device) and the
/// driver's own mapping of it.
pub fn ram(name: &str, size: u64) -> (SharedMemory, GuestMemoryMmap) {
    let memfd = SharedMemory::new(name, size).expect("memfd");
    let mem = guest_memory(&[region(size)], vec![memfd.try_clone_fd().unwrap()]).expect("ram");
    (memfd, mem)
}

/// A descriptor's 16 bytes: address, length, flags, next.
pub fn desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&addr.to_le_bytes());
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..14].copy_from_slice(&flags.to_le_bytes());
    b[14..].copy_from_slice(&next.to_le_bytes());
    b
}

/// Writes descriptor `i` of the table at `table`.
pub fn write_desc(
    mem: &GuestMemoryMmap,
    table: u64,
    i: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let at = table + u64::from(i) * 16;
    mem.write_slice(&desc_bytes(addr, len, flags, next), GuestAddress(at))
        .unwrap();
}

/// Puts `head` in slot `idx % size` of the avail ring at `avail` and publishes `idx + 1`,
/// which it returns (no kick).
pub fn offer(mem: &GuestMemoryMmap, avail: u64, size: u16, idx: u16, head: u16) -> u16 {
    let slot = avail + 4 + 2 * u64::from(idx % size);
    mem.write_obj(head.to_le(), GuestAddress(slot)).unwrap();
    let next = idx.wrapping_add(1);
    mem.write_obj(next.to_le(), GuestAddress(avail + 2))
        .unwrap();
    next
}

/// The used ring's index.
pub fn used_idx(mem: &GuestMemoryMmap, used: u64) -> u16 {
    u16::from_le(mem.read_obj(GuestAddress(used + 2)).unwrap())
}

/// Used entry `i % size` as `(id, len)`.
pub fn used_elem(mem: &GuestMemoryMmap, used: u64, size: u16, i: u16) -> (u32, u32) {
    let at = used + 4 + 8 * u64::from(i % size);
    let id: u32 = u32::from_le(mem.read_obj(GuestAddress(at)).unwrap());
    let len: u32 = u32::from_le(mem.read_obj(GuestAddress(at + 4)).unwrap());
    (id, len)
}
