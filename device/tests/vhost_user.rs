//! The device as a vhost-user backend ([`hostmem_device::vhost_user`]) against a frontend
//! built here on the `vhost` crate's frontend side: feature and protocol negotiation,
//! `GET_CONFIG`, `GET_SHMEM_CONFIG`, a `SET_MEM_TABLE` without fds (refused: the connection
//! is closed), a `MAP_BLOB` that becomes `SHMEM_MAP` with the right fields, a frontend that
//! refuses the map (the guest's command fails), a frontend that (as QEMU 11.1 does) sends
//! `ADD_MEM_REG` / `REM_MEM_REG` and waits for their replies before it acks a
//! `SHMEM_MAP` / `SHMEM_UNMAP` (the device keeps serving: no deadlock), num_scanouts and
//! `GET_DISPLAY_INFO`, and disconnect → reset → reconnect. The
//! backend serves in a thread of the test (`serve_listener` on a socket in a temp dir), the
//! frontend's backend channel in another.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hostmem_base::shm::SharedMemory;
use hostmem_device::backend::shm::SHM_CAPSET_ID;
use hostmem_device::vhost_user::{
    serve_listener, Options, CONFIG_SIZE, OFFERED_FEATURES, SHMEM_ID,
};
use hostmem_device::virtio::{guest_memory, GuestMemoryMmap};
use hostmem_device::wire::*;
use hostmem_ipc::protocol::GuestRegion;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserMMap, VhostUserMMapFlags,
    VhostUserProtocolFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandlerMut,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const REGION: u64 = 64 << 20;
const RAM_GPA: u64 = 0x10_0000;
const RAM_SIZE: u64 = 4 << 20;
const DESC: u64 = RAM_GPA;
const AVAIL: u64 = RAM_GPA + 0x1000;
const USED: u64 = RAM_GPA + 0x2000;
const DATA: u64 = RAM_GPA + 0x10000;
const QSIZE: u16 = 16;
const PAGE: u64 = 4096;

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hostmem-vu-{}-{name}.sock", std::process::id()))
}

/// The backend on a fresh listening socket, serving `connections` frontends in a thread.
fn backend(name: &str, connections: usize) -> (PathBuf, JoinHandle<()>) {
    let path = socket_path(name);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind");
    let opts = Options {
        shmem_size: REGION,
        max_connections: Some(connections),
        ..Options::default()
    };
    let t = std::thread::spawn(move || serve_listener(&listener, &opts).expect("backend serves"));
    (path, t)
}

/// What the frontend's backend channel saw.
#[derive(Default)]
struct Recorder {
    maps: Vec<(VhostUserMMap, u64)>,
    unmaps: Vec<VhostUserMMap>,
    refuse: bool,
    /// Like QEMU 11.1: before acking a map (unmap), add (remove) a memory region for it on
    /// the main socket and wait for the backend's reply.
    qemu_like: Option<Frontend>,
    /// The regions added that way, by shm offset.
    regions: Vec<(u64, SharedMemory)>,
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
            return Err(std::io::Error::from_raw_os_error(libc_enomem()));
        }
        let len = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))?.len();
        self.maps.push((*req, len));
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

fn libc_enomem() -> i32 {
    nix::errno::Errno::ENOMEM as i32
}

/// A frontend with one control queue, guest RAM and a backend channel.
struct Fe {
    fe: Frontend,
    rec: Arc<Mutex<Recorder>>,
    _channel: JoinHandle<()>,
    _ram: SharedMemory,
    mem: GuestMemoryMmap,
    kick: EventFd,
    call: EventFd,
    avail_idx: u16,
    used_seen: u16,
    data: u64,
}

fn connect(path: &PathBuf) -> Frontend {
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
    fn new(path: &PathBuf) -> Fe {
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
        let ram = SharedMemory::new("guest-ram", RAM_SIZE).unwrap();
        let mem = guest_memory(
            &[GuestRegion {
                gpa: RAM_GPA,
                size: RAM_SIZE,
                fd_offset: 0,
            }],
            vec![ram.try_clone_fd().unwrap()],
        )
        .unwrap();
        fe.set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: RAM_GPA,
            memory_size: RAM_SIZE,
            // Our "address space" is the guest's: user_addr = GPA.
            userspace_addr: RAM_GPA,
            mmap_offset: 0,
            mmap_handle: ram.as_fd().as_raw_fd(),
        }])
        .unwrap();
        let kick = EventFd::new(libc_efd_nonblock()).unwrap();
        let call = EventFd::new(libc_efd_nonblock()).unwrap();
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

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = Vec::with_capacity(16);
        b.extend_from_slice(&addr.to_le_bytes());
        b.extend_from_slice(&len.to_le_bytes());
        b.extend_from_slice(&flags.to_le_bytes());
        b.extend_from_slice(&next.to_le_bytes());
        self.mem
            .write_slice(&b, GuestAddress(DESC + u64::from(i) * 16))
            .unwrap();
    }

    /// Sends `cmd` on the control queue, waits for the call eventfd, returns the response.
    fn roundtrip(&mut self, cmd: &Command) -> Response {
        let req = cmd.encode();
        let r = self.alloc(&req, req.len() as u32);
        let w = self.alloc(&[], 512);
        let head = (self.avail_idx % (QSIZE / 2)) * 2;
        self.desc(head, r, req.len() as u32, 1, head + 1);
        self.desc(head + 1, w, 512, 2, 0);
        let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx % QSIZE);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx.to_le(), GuestAddress(AVAIL + 2))
            .unwrap();
        self.kick.write(1).unwrap();
        // vmm-sys-util's EventFd has no AsFd to poll: look at the used ring until it moves
        // (5 s at most), then the call eventfd must have been signalled.
        let t0 = std::time::Instant::now();
        let used_idx = loop {
            let idx: u16 = u16::from_le(self.mem.read_obj(GuestAddress(USED + 2)).unwrap());
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
        let at = USED + 4 + 8 * u64::from(self.used_seen % QSIZE);
        let id: u32 = u32::from_le(self.mem.read_obj(GuestAddress(at)).unwrap());
        let len: u32 = u32::from_le(self.mem.read_obj(GuestAddress(at + 4)).unwrap());
        self.used_seen = used_idx;
        assert_eq!(id, u32::from(head));
        let mut b = vec![0u8; len as usize];
        self.mem.read_slice(&mut b, GuestAddress(w)).unwrap();
        Response::parse(&b).expect("response parses")
    }

    fn maps(&self) -> Vec<(VhostUserMMap, u64)> {
        self.rec.lock().unwrap().maps.clone()
    }
}

fn libc_efd_nonblock() -> i32 {
    nix::sys::eventfd::EfdFlags::EFD_NONBLOCK.bits()
}

fn assert_ok(r: &Response) {
    assert!(
        matches!(r, Response::OkNoData { .. }),
        "expected OK, got {r:?}"
    );
}

fn blob(fe: &mut Fe, ctx: u32, id: u32, size: u64) {
    assert_ok(&fe.roundtrip(&Command::create_blob(
        ctx,
        id,
        VIRTIO_GPU_BLOB_MEM_HOST3D,
        VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
        0,
        size,
    )));
}

#[test]
fn negotiation_config_and_shmem_config() {
    let (path, t) = backend("negotiate", 1);
    let mut fe = connect(&path);
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    for bit in [32u32, 29, 0, 3, 4, 30] {
        assert_ne!(f & (1 << bit), 0, "feature bit {bit} offered: {f:#x}");
    }
    fe.set_features(f).unwrap();
    let p = fe.get_protocol_features().unwrap();
    // The spec's final SHMEM bit: 22.
    assert_eq!(VhostUserProtocolFeatures::SHMEM.bits(), 1 << 22);
    for want in [
        VhostUserProtocolFeatures::SHMEM,
        VhostUserProtocolFeatures::CONFIG,
        VhostUserProtocolFeatures::BACKEND_REQ,
        VhostUserProtocolFeatures::REPLY_ACK,
        VhostUserProtocolFeatures::MQ,
        VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS,
    ] {
        assert!(p.contains(want), "{want:?} offered in {p:?}");
    }
    fe.set_protocol_features(p).unwrap();
    assert_eq!(fe.get_queue_num().unwrap(), 2);
    let (_, cfg) = fe
        .get_config(
            0,
            CONFIG_SIZE as u32,
            VhostUserConfigFlags::WRITABLE,
            &[0; CONFIG_SIZE],
        )
        .unwrap();
    assert_eq!(cfg.len(), CONFIG_SIZE);
    // events_read 0, events_clear 0, num_scanouts 1 (Linux refuses 0), num_capsets 1 (the
    // shm capset).
    assert_eq!(&cfg[..8], &[0u8; 8]);
    assert_eq!(u32::from_le_bytes(cfg[8..12].try_into().unwrap()), 1);
    assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), 1);
    let shm = fe.get_shmem_config().unwrap();
    assert_eq!(shm.nregions, 1);
    assert_eq!(shm.memory_sizes[usize::from(SHMEM_ID)], REGION);
    assert_eq!(shm.memory_sizes[0], 0);
    drop(fe);
    t.join().unwrap();
    let _ = std::fs::remove_file(path);
}

#[test]
fn set_mem_table_without_fds_is_refused_and_the_next_frontend_is_served() {
    let (path, t) = backend("nofd", 2);
    let mut s = UnixStream::connect(&path).unwrap();
    // VHOST_USER_SET_MEM_TABLE (5), version 1 | NEED_REPLY, one region, no fd attached.
    let mut msg = Vec::new();
    msg.extend_from_slice(&5u32.to_le_bytes());
    msg.extend_from_slice(&(0x1u32 | 0x8).to_le_bytes());
    msg.extend_from_slice(&40u32.to_le_bytes());
    msg.extend_from_slice(&1u32.to_le_bytes());
    msg.extend_from_slice(&0u32.to_le_bytes());
    for v in [RAM_GPA, RAM_SIZE, RAM_GPA, 0u64] {
        msg.extend_from_slice(&v.to_le_bytes());
    }
    s.write_all(&msg).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let n = s
        .read(&mut buf)
        .expect("the backend closes, it does not hang");
    assert_eq!(
        n, 0,
        "no ack for a memory table without fds: the connection is closed"
    );
    // The listener goes on: a proper frontend is served.
    let mut fe = Fe::new(&path);
    assert_ok(&fe.roundtrip(&Command::ctx_create(1, SHM_CAPSET_ID, b"t")));
    drop(fe);
    t.join().unwrap();
    let _ = std::fs::remove_file(path);
}

#[test]
fn map_blob_becomes_shmem_map_and_unmap_becomes_shmem_unmap() {
    let (path, t) = backend("map", 1);
    let mut fe = Fe::new(&path);
    assert_ok(&fe.roundtrip(&Command::ctx_create(1, SHM_CAPSET_ID, b"t")));
    blob(&mut fe, 1, 7, 2 * PAGE);
    let r = fe.roundtrip(&Command::map_blob(1, 7, 8 * PAGE));
    assert!(matches!(r, Response::OkMapInfo { .. }), "{r:?}");
    let maps = fe.maps();
    assert_eq!(maps.len(), 1, "{maps:?}");
    let (m, fd_len) = maps[0];
    let (shmid, shm_offset, len, fd_offset, flags) =
        (m.shmid, m.shm_offset, m.len, m.fd_offset, m.flags);
    assert_eq!(shmid, SHMEM_ID);
    assert_eq!(shm_offset, 8 * PAGE);
    assert_eq!(len, 2 * PAGE);
    assert_eq!(fd_offset, 0);
    assert_eq!(flags, VhostUserMMapFlags::WRITABLE.bits());
    assert!(
        fd_len >= 2 * PAGE,
        "the blob's fd came along ({fd_len} bytes)"
    );
    // Outside the region: refused by the handler, never sent.
    blob(&mut fe, 1, 8, PAGE);
    let r = fe.roundtrip(&Command::map_blob(1, 8, REGION));
    assert_eq!(r.error(), Some(ErrorCode::InvalidParameter), "{r:?}");
    assert_eq!(fe.maps().len(), 1);
    assert_ok(&fe.roundtrip(&Command::unmap_blob(1, 7)));
    let unmaps = fe.rec.lock().unwrap().unmaps.clone();
    assert_eq!(unmaps.len(), 1);
    let (o, l) = (unmaps[0].shm_offset, unmaps[0].len);
    assert_eq!((o, l), (8 * PAGE, 2 * PAGE));
    drop(fe);
    t.join().unwrap();
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_refused_shmem_map_fails_the_guests_command() {
    let (path, t) = backend("nack", 1);
    let mut fe = Fe::new(&path);
    assert_ok(&fe.roundtrip(&Command::ctx_create(1, SHM_CAPSET_ID, b"t")));
    blob(&mut fe, 1, 7, PAGE);
    fe.rec.lock().unwrap().refuse = true;
    let r = fe.roundtrip(&Command::map_blob(1, 7, 0));
    assert_eq!(r.error(), Some(ErrorCode::Unspec), "{r:?}");
    // Nothing was recorded as mapped: once the frontend agrees, the same map works.
    fe.rec.lock().unwrap().refuse = false;
    let r = fe.roundtrip(&Command::map_blob(1, 7, 0));
    assert!(matches!(r, Response::OkMapInfo { .. }), "{r:?}");
    assert_eq!(fe.maps().len(), 1);
    drop(fe);
    t.join().unwrap();
    let _ = std::fs::remove_file(path);
}

#[test]
fn disconnect_resets_and_a_new_frontend_starts_fresh() {
    let (path, t) = backend("reconnect", 2);
    let mut fe = Fe::new(&path);
    assert_ok(&fe.roundtrip(&Command::ctx_create(1, SHM_CAPSET_ID, b"t")));
    blob(&mut fe, 1, 7, PAGE);
    let r = fe.roundtrip(&Command::map_blob(1, 7, 0));
    assert!(matches!(r, Response::OkMapInfo { .. }), "{r:?}");
    drop(fe);
    // The second frontend finds no context 1 and no resource 7: the device reset.
    let mut fe = Fe::new(&path);
    let r = fe.roundtrip(&Command::map_blob(1, 7, 0));
    assert_eq!(r.error(), Some(ErrorCode::InvalidResourceId), "{r:?}");
    assert_ok(&fe.roundtrip(&Command::ctx_create(1, SHM_CAPSET_ID, b"t")));
    blob(&mut fe, 1, 7, PAGE);
    let r = fe.roundtrip(&Command::map_blob(1, 7, 0));
    assert!(matches!(r, Response::OkMapInfo { .. }), "{r:?}");
    assert_eq!(fe.maps().len(), 1, "the new frontend's own map");
    drop(fe);
    t.join().unwrap();
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_frontend_that_adds_a_memory_region_before_it_acks_does_not_deadlock() {
    let (path, t) = backend("qemu-like", 1);
    let mut fe = Fe::new(&path);
    // QEMU sends ADD_MEM_REG/REM_MEM_REG with NEED_REPLY and waits for the ack.
    fe.fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
    fe.rec.lock().unwrap().qemu_like = Some(fe.fe.clone());
    assert_ok(&fe.roundtrip(&Command::ctx_create(1, SHM_CAPSET_ID, b"t")));
    // Several rounds, and two blobs mapped at once: each map and unmap goes through
    // ADD_MEM_REG / REM_MEM_REG first. `roundtrip` gives up after 5 s (a deadlock fails
    // the test instead of hanging it).
    for round in 0..4u32 {
        let (a, b) = (10 + 2 * round, 11 + 2 * round);
        blob(&mut fe, 1, a, PAGE);
        blob(&mut fe, 1, b, 2 * PAGE);
        assert_ok(&fe.roundtrip(&Command::ctx_attach_resource(1, a)));
        let r = fe.roundtrip(&Command::map_blob(1, a, 0));
        assert!(matches!(r, Response::OkMapInfo { .. }), "{r:?}");
        let r = fe.roundtrip(&Command::map_blob(1, b, 4 * PAGE));
        assert!(matches!(r, Response::OkMapInfo { .. }), "{r:?}");
        assert_eq!(fe.rec.lock().unwrap().regions.len(), 2);
        assert_ok(&fe.roundtrip(&Command::unmap_blob(1, a)));
        // UNREF of a mapped blob: its SHMEM_UNMAP is acked after REM_MEM_REG too.
        assert_ok(&fe.roundtrip(&Command::unref(b)));
        assert_ok(&fe.roundtrip(&Command::ctx_detach_resource(1, a)));
        assert_ok(&fe.roundtrip(&Command::unref(a)));
        assert!(fe.rec.lock().unwrap().regions.is_empty());
    }
    assert_eq!(fe.maps().len(), 8);
    assert_eq!(fe.rec.lock().unwrap().unmaps.len(), 8);
    fe.rec.lock().unwrap().qemu_like = None;
    drop(fe);
    t.join().unwrap();
    let _ = std::fs::remove_file(path);
}

#[test]
fn display_info_answers_the_one_disabled_scanout() {
    let (path, t) = backend("display", 1);
    let mut fe = Fe::new(&path);
    match fe.roundtrip(&Command::get_display_info()) {
        Response::OkDisplayInfo { modes, .. } => {
            assert!(modes.iter().all(|m| m.enabled == 0), "{modes:?}");
        }
        other => panic!("{other:?}"),
    }
    drop(fe);
    t.join().unwrap();
    let _ = std::fs::remove_file(path);
}
