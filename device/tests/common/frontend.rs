//! A vhost-user frontend for tests, on the `vhost` crate's frontend side: it negotiates
//! everything, gives the backend 4 MiB of guest RAM and one control queue laid out by hand,
//! and records (or refuses, or never acks) the backend's `SHMEM_MAP` / `SHMEM_UNMAP` on its backend channel.
//!
//! Shared by two suites: `device/tests/vhost_user.rs` (the backend in a thread) and
//! `vmm-side/tests/vhost_user.rs` (the jailed backend under the supervisor), each with
//! `#[path] mod frontend;`. A file included from both rather than a `testing` module behind
//! a cargo feature: it stays test code (asserts and panics, no public-API docs, no optional
//! dependency in the device crate) and changes nothing in either crate's build.
#![allow(dead_code)] // each suite uses a subset

// Relative to this file's directory: the same module from either suite.
#[path = "mod.rs"]
mod ring;

use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hostmem_base::shm::SharedMemory;
use hostmem_device::vhost_user::OFFERED_FEATURES;
use hostmem_device::virtio::GuestMemoryMmap;
use hostmem_device::wire::*;
use vhost::vhost_user::message::VhostUserMMap;
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandlerMut,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub use ring::RAM_GPA;
use ring::{AVAIL, DESC, USED};

pub const RAM_SIZE: u64 = 4 << 20;
const DATA: u64 = RAM_GPA + 0x10000;
const QSIZE: u16 = 16;
pub const PAGE: u64 = 4096;

/// What the frontend's backend channel saw.
#[derive(Default)]
pub struct Recorder {
    pub maps: Vec<(VhostUserMMap, u64)>,
    pub unmaps: Vec<VhostUserMMap>,
    /// Refuse every `SHMEM_MAP` (ENOMEM).
    pub refuse: bool,
    /// Never ack: while set, a `SHMEM_MAP` is recorded and its ack held back (the
    /// channel's thread waits, holding the recorder's lock: set it through a clone of
    /// the `Arc`, not through the lock, and clear it to let the thread go).
    pub stall: Arc<AtomicBool>,
    /// Like QEMU 11.1: before acking a map (unmap), add (remove) a memory region for it on
    /// the main socket and wait for the backend's reply.
    pub qemu_like: Option<Frontend>,
    /// The regions added that way, by shm offset.
    pub regions: Vec<(u64, SharedMemory)>,
}

/// Where the test's "shared memory region" lies in guest-physical space.
const SHM_GPA: u64 = 0x1_0000_0000;

impl Recorder {
    fn region(shm_offset: u64, len: u64, fd: i32) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: SHM_GPA + shm_offset,
            memory_size: len,
            userspace_addr: SHM_GPA + shm_offset,
            mmap_offset: 0,
            mmap_handle: fd,
        }
    }
}

impl VhostUserFrontendReqHandlerMut for Recorder {
    fn shmem_map(&mut self, req: &VhostUserMMap, fd: &dyn AsRawFd) -> std::io::Result<u64> {
        if self.refuse {
            return Err(std::io::Error::from_raw_os_error(
                nix::errno::Errno::ENOMEM as i32,
            ));
        }
        let len = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))?.len();
        self.maps.push((*req, len));
        while self.stall.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(fe) = self.qemu_like.as_mut() {
            let (off, l) = (req.shm_offset, req.len);
            let shm = SharedMemory::new("shm-map", l).map_err(std::io::Error::other)?;
            // Waits for the backend's reply: the backend must serve this while our ack
            // of its SHMEM_MAP is outstanding.
            fe.add_mem_region(&Recorder::region(off, l, shm.as_fd().as_raw_fd()))
                .map_err(std::io::Error::other)?;
            self.regions.push((off, shm));
        }
        Ok(0)
    }
    fn shmem_unmap(&mut self, req: &VhostUserMMap) -> std::io::Result<u64> {
        self.unmaps.push(*req);
        if let Some(fe) = self.qemu_like.as_mut() {
            let (off, l) = (req.shm_offset, req.len);
            let i = self
                .regions
                .iter()
                .position(|(o, _)| *o == off)
                .ok_or_else(|| std::io::Error::other("unmap of a region never mapped"))?;
            let (_, shm) = self.regions.remove(i);
            fe.remove_mem_region(&Recorder::region(off, l, shm.as_fd().as_raw_fd()))
                .map_err(std::io::Error::other)?;
        }
        Ok(0)
    }
}

/// A frontend with one control queue, guest RAM and a backend channel.
pub struct Fe {
    pub fe: Frontend,
    pub rec: Arc<Mutex<Recorder>>,
    _channel: JoinHandle<()>,
    _ram: SharedMemory,
    mem: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_seen: u16,
    data: u64,
}

pub fn connect(path: &PathBuf) -> Frontend {
    for _ in 0..100 {
        if let Ok(fe) = Frontend::connect(path, 2) {
            return fe;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("cannot connect to {}", path.display());
}

impl Fe {
    /// Connects and negotiates everything; the control queue runs.
    pub fn new(path: &PathBuf) -> Fe {
        let mut fe = connect(path);
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        assert_eq!(features, OFFERED_FEATURES);
        // No event index: this driver wants every used buffer signalled.
        fe.set_features(features & !(1 << 29)).unwrap();
        let proto = fe.get_protocol_features().unwrap();
        fe.set_protocol_features(proto).unwrap();
        let rec = Arc::new(Mutex::new(Recorder::default()));
        let mut handler = FrontendReqHandler::new(rec.clone()).unwrap();
        handler.set_reply_ack_flag(true);
        fe.set_backend_request_fd(&handler.get_tx_raw_fd()).unwrap();
        let channel = std::thread::spawn(move || loop {
            match handler.handle_request() {
                Ok(_) | Err(vhost::vhost_user::Error::ReqHandlerError(_)) => {}
                Err(_) => return,
            }
        });
        let (ram, mem) = ring::ram("guest-ram", RAM_SIZE);
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: RAM_GPA,
            memory_size: RAM_SIZE,
            // Our "address space" is the guest's: user_addr = GPA.
            userspace_addr: RAM_GPA,
            mmap_offset: 0,
            mmap_handle: ram.as_fd().as_raw_fd(),
        }])
        .unwrap();
        let nonblock = nix::sys::eventfd::EfdFlags::EFD_NONBLOCK.bits();
        let kick = EventFd::new(nonblock).unwrap();
        let call = EventFd::new(nonblock).unwrap();
        fe.set_vring_num(0, QSIZE).unwrap();
        fe.set_vring_addr(
            0,
            &VringConfigData {
                queue_max_size: 256,
                queue_size: QSIZE,
                flags: 0,
                desc_table_addr: DESC,
                used_ring_addr: USED,
                avail_ring_addr: AVAIL,
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(0, 0).unwrap();
        fe.set_vring_kick(0, &kick).unwrap();
        fe.set_vring_call(0, &call).unwrap();
        fe.set_vring_enable(0, true).unwrap();
        Fe {
            fe,
            rec,
            _channel: channel,
            _ram: ram,
            mem,
            kick,
            call,
            avail_idx: 0,
            used_seen: 0,
            data: DATA,
        }
    }

    fn alloc(&mut self, bytes: &[u8], len: u32) -> u64 {
        let at = self.data;
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        self.data += u64::from(len.max(bytes.len() as u32)).next_multiple_of(64);
        at
    }

    /// Puts `cmd` on the control queue and kicks; returns the chain's head and the GPA of
    /// its response buffer. Nothing waits for the answer (a test may expect none).
    #[allow(dead_code)] // not every suite that includes this file posts without waiting
    pub fn post(&mut self, cmd: &Command) -> (u16, u64) {
        let req = cmd.encode();
        let r = self.alloc(&req, req.len() as u32);
        let w = self.alloc(&[], 512);
        let head = (self.avail_idx % (QSIZE / 2)) * 2;
        ring::write_desc(&self.mem, DESC, head, r, req.len() as u32, 1, head + 1);
        ring::write_desc(&self.mem, DESC, head + 1, w, 512, 2, 0);
        self.avail_idx = ring::offer(&self.mem, AVAIL, QSIZE, self.avail_idx, head);
        self.kick.write(1).unwrap();
        (head, w)
    }

    /// Sends `cmd` on the control queue, waits for the call eventfd, returns the response.
    pub fn roundtrip(&mut self, cmd: &Command) -> Response {
        let (head, w) = self.post(cmd);
        // vmm-sys-util's EventFd has no AsFd to poll: look at the used ring until it moves
        // (5 s at most), then the call eventfd must have been signalled.
        let t0 = std::time::Instant::now();
        let used_idx = loop {
            let idx = ring::used_idx(&self.mem, USED);
            if idx != self.used_seen {
                break idx;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "no used entry for {cmd:?} within 5 s"
            );
            std::thread::sleep(Duration::from_micros(200));
        };
        // The device writes the used ring first, then signals.
        while self.call.read().is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "the call eventfd was not signalled for {cmd:?}"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        assert_eq!(used_idx, self.used_seen.wrapping_add(1), "one used entry");
        let (id, len) = ring::used_elem(&self.mem, USED, QSIZE, self.used_seen);
        self.used_seen = used_idx;
        assert_eq!(id, u32::from(head));
        let mut b = vec![0u8; len as usize];
        self.mem.read_slice(&mut b, GuestAddress(w)).unwrap();
        Response::parse(&b).expect("response parses")
    }

    pub fn maps(&self) -> Vec<(VhostUserMMap, u64)> {
        self.rec.lock().unwrap().maps.clone()
    }
}

pub fn assert_ok(r: &Response) {
    assert!(
        matches!(r, Response::OkNoData { .. }),
        "expected OK, got {r:?}"
    );
}

pub fn blob(fe: &mut Fe, ctx: u32, id: u32, size: u64) {
    assert_ok(&fe.roundtrip(&Command::create_blob(
        ctx,
        id,
        VIRTIO_GPU_BLOB_MEM_HOST3D,
        VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
        0,
        size,
    )));
}
