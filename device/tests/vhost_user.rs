//! The device as a vhost-user backend ([`hostmem_device::vhost_user`]) against a frontend
//! built here on the `vhost` crate's frontend side: feature and protocol negotiation,
//! `GET_CONFIG`, `GET_SHMEM_CONFIG`, a `SET_MEM_TABLE` without fds (refused: the connection
//! is closed), a `MAP_BLOB` that becomes `SHMEM_MAP` with the right fields, a frontend that
//! refuses the map (the guest's command fails), a frontend that (as QEMU 11.1 does) sends
//! `ADD_MEM_REG` / `REM_MEM_REG` and waits for their replies before it acks a
//! `SHMEM_MAP` / `SHMEM_UNMAP` (the device keeps serving: no deadlock), num_scanouts and
//! `GET_DISPLAY_INFO`, disconnect → reset → reconnect, and a frontend that never acks a
//! `SHMEM_MAP` (the backend closes it after the ack timeout and serves the next). The
//! backend serves in a thread of the test (`serve_listener` on a socket in a temp dir), the
//! frontend (`common/frontend.rs`, shared with the VMM's vhost-user suite) and its backend
//! channel in others.

#[path = "common/frontend.rs"]
mod frontend;

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use frontend::{assert_ok, blob, connect, Fe, PAGE, RAM_GPA, RAM_SIZE};
use hostmem_device::backend::shm::{ShmBackend, SHM_CAPSET_ID};
use hostmem_device::vhost_user::{serve_listener, Options, CONFIG_SIZE, SHMEM_ID};
use hostmem_device::wire::*;
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserHeaderFlag, VhostUserMMapFlags, VhostUserProtocolFeatures,
};
use vhost::vhost_user::VhostUserFrontend;
use vhost::VhostBackend;

const REGION: u64 = 64 << 20;

fn socket_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("hostmem-vu-{}-{name}.sock", std::process::id()))
}

/// The backend on a fresh listening socket, serving `connections` frontends in a thread.
fn backend(name: &str, connections: usize) -> (PathBuf, JoinHandle<()>) {
    backend_with(name, connections, Options::default().ack_timeout)
}

/// [`backend`] with its own ack timeout.
fn backend_with(
    name: &str,
    connections: usize,
    ack_timeout: Duration,
) -> (PathBuf, JoinHandle<()>) {
    let path = socket_path(name);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind");
    let opts = Options {
        shmem_size: REGION,
        max_connections: Some(connections),
        ack_timeout,
        ..Options::default()
    };
    let t = std::thread::spawn(move || serve_listener(&listener, &opts).expect("backend serves"));
    (path, t)
}

#[test]
fn negotiation_config_and_shmem_config() {
    let (path, t) = backend("negotiate", 1);
    let mut fe = connect(&path);
    fe.set_owner().unwrap();
    let f = fe.get_features().unwrap();
    for bit in [32u32, 29, 0, 1, 2, 3, 4, 30] {
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
fn display_info_answers_the_default_scanout() {
    let (path, t) = backend("display", 1);
    let mut fe = Fe::new(&path);
    match fe.roundtrip(&Command::get_display_info()) {
        Response::OkDisplayInfo { modes, .. } => {
            assert_eq!(
                (modes[0].width, modes[0].height, modes[0].enabled),
                (1024, 768, 1)
            );
            assert!(modes[1..].iter().all(|m| m.enabled == 0), "{modes:?}");
        }
        other => panic!("{other:?}"),
    }
    drop(fe);
    t.join().unwrap();
    let _ = std::fs::remove_file(path);
}

#[test]
fn a_shmem_map_never_acked_ends_the_connection_and_the_next_frontend_is_served() {
    let limit = Duration::from_millis(300);
    let (path, t) = backend_with("stall", 2, limit);
    let mut fe = Fe::new(&path);
    assert_ok(&fe.roundtrip(&Command::ctx_create(1, SHM_CAPSET_ID, b"t")));
    blob(&mut fe, 1, 7, PAGE);
    let stall = fe.rec.lock().unwrap().stall.clone();
    stall.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    fe.post(&Command::map_blob(1, 7, 0));
    // The backend closes its end of the main socket: our side reads EOF. Bounded, so that
    // a backend without the timeout fails this test instead of hanging it.
    let sock = fe.fe.as_raw_fd();
    let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
    let mut b = [0u8; 1];
    loop {
        match nix::sys::socket::recv(sock, &mut b, flags) {
            Ok(0) => break,
            Ok(_) => panic!("the backend sent something on the main socket"),
            Err(nix::errno::Errno::EAGAIN) => {}
            Err(e) => panic!("recv: {e}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the backend did not close the connection within 5 s of an unacked SHMEM_MAP \
             (ack timeout {limit:?})"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let took = t0.elapsed();
    assert!(
        took >= limit,
        "closed after {took:?}, before the {limit:?} limit"
    );
    // Let the channel's thread go (it holds the recorder's lock until then).
    stall.store(false, Ordering::Relaxed);
    assert_eq!(fe.maps().len(), 1, "the SHMEM_MAP did reach the frontend");
    drop(fe);
    // The listener goes on: a new frontend is served, from a fresh device.
    let mut fe = Fe::new(&path);
    let r = fe.roundtrip(&Command::map_blob(1, 7, 0));
    assert_eq!(r.error(), Some(ErrorCode::InvalidResourceId), "{r:?}");
    assert_ok(&fe.roundtrip(&Command::ctx_create(1, SHM_CAPSET_ID, b"t")));
    blob(&mut fe, 1, 7, PAGE);
    let r = fe.roundtrip(&Command::map_blob(1, 7, 0));
    assert!(matches!(r, Response::OkMapInfo { .. }), "{r:?}");
    assert_eq!(fe.maps().len(), 1);
    drop(fe);
    t.join().unwrap();
    let _ = std::fs::remove_file(path);
}

#[test]
fn config_reports_the_displays_scanouts() {
    use hostmem_device::display::DisplayConfig;
    let mut vu = hostmem_device::vhost_user::VuGpu::new(Box::new(ShmBackend::new()), REGION);
    assert_eq!(
        u32::from_le_bytes(vu.config()[8..12].try_into().unwrap()),
        1
    );
    vu.device_mut()
        .gpu_mut()
        .set_display(DisplayConfig::parse("800x600,640x480,320x200").unwrap());
    let cfg = vu.config();
    assert_eq!(u32::from_le_bytes(cfg[8..12].try_into().unwrap()), 3);
    assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), 1);
}
