//! Tube tests: a real second process, fd passing, bad input, no fd leaks.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::process::Command;
use std::time::Duration;

use hostmem_base::mmap::{MemoryMapping, Prot};
use hostmem_base::procfs::open_fds;
use hostmem_base::shm::SharedMemory;
use hostmem_ipc::protocol::{handshake, DeviceMsg, Hello, Role, VmmMsg, PROTOCOL_VERSION};
use hostmem_ipc::{Error, Tube, MAX_FDS, MAX_MESSAGE};
use nix::fcntl::{fcntl, FcntlArg, FdFlag};

const CHILD_ENV: &str = "HOSTMEM_TUBE_TEST_CHILD_FD";

/// Number of fds in this process that point at a memfd called `name`.
fn memfds_named(name: &str) -> usize {
    let tag = format!("/memfd:{name} ");
    open_fds()
        .unwrap()
        .iter()
        .filter(|(_, t)| t.starts_with(&tag))
        .count()
}

/// Re-executes this test binary running only `test`, with `fd` inherited.
fn spawn_child(test: &str, fd: OwnedFd) -> std::process::Child {
    // Inheritance without pre_exec: clear CLOEXEC on the one fd the child needs. Other tests
    // in this binary spawn nothing, so no other child can inherit it.
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, fd.as_raw_fd().to_string())
        .spawn()
        .unwrap();
    drop(fd);
    child
}

/// In the child: the inherited tube, if this process is one.
fn child_tube() -> Option<Tube> {
    let fd: i32 = std::env::var(CHILD_ENV).ok()?.parse().ok()?;
    let owned = hostmem_base::fd::take_inherited(fd).unwrap();
    Some(Tube::from_fd(owned).unwrap())
}

#[test]
fn cross_process_round_trip_with_memfd() {
    if let Some(tube) = child_tube() {
        // Child: handshake, receive the memfd, write into it, report, exit.
        handshake::<DeviceMsg, VmmMsg>(&tube, Role::Device, Duration::from_secs(5)).unwrap();
        let (msg, mut fds) = tube.recv::<VmmMsg>().unwrap();
        let VmmMsg::Hostmem { size } = msg else {
            panic!("{msg:?}")
        };
        let shm = SharedMemory::from_fd(fds.pop().unwrap(), size).unwrap();
        let m = MemoryMapping::from_fd(shm.as_fd(), 0, size as usize, Prot::READ_WRITE).unwrap();
        m.write_slice(100, b"from the child").unwrap();
        tube.send(
            &DeviceMsg::Ready {
                backend: "test".into(),
                num_capsets: 2,
                num_scanouts: 3,
            },
            &[],
        )
        .unwrap();
        std::process::exit(0);
    }
    let (ours, theirs) = Tube::pair().unwrap();
    let mut child = spawn_child("cross_process_round_trip_with_memfd", theirs.into_fd());
    let peer = handshake::<VmmMsg, DeviceMsg>(&ours, Role::Vmm, Duration::from_secs(10)).unwrap();
    assert_eq!(peer.role, Role::Device);
    assert_eq!(peer.version, PROTOCOL_VERSION);
    let shm = SharedMemory::new("roundtrip", 8192).unwrap();
    ours.send(&VmmMsg::Hostmem { size: 8192 }, &[shm.as_fd()])
        .unwrap();
    ours.set_recv_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let (msg, fds) = ours.recv::<DeviceMsg>().unwrap();
    assert_eq!(
        msg,
        DeviceMsg::Ready {
            backend: "test".into(),
            num_capsets: 2,
            num_scanouts: 3,
        }
    );
    assert!(fds.is_empty());
    let m = MemoryMapping::from_fd(shm.as_fd(), 0, 8192, Prot::READ).unwrap();
    let mut buf = [0u8; 14];
    m.read_slice(100, &mut buf).unwrap();
    assert_eq!(&buf, b"from the child");
    // The child exits: a clean Hangup, not a hang or a panic.
    assert!(child.wait().unwrap().success());
    assert!(matches!(ours.recv::<DeviceMsg>(), Err(Error::Hangup)));
    assert!(matches!(
        ours.send(&VmmMsg::Shutdown, &[]),
        Err(Error::Hangup) | Err(Error::Send(_))
    ));
}

#[test]
fn bad_input_is_a_typed_error_and_leaks_no_fd() {
    let (a, b) = Tube::pair().unwrap();
    let name = "leakcheck";
    let shm = SharedMemory::new(name, 4096).unwrap();
    assert_eq!(memfds_named(name), 1);

    // Malformed JSON, with an fd attached: error, fd closed.
    a.send_bytes(b"{not json", &[shm.as_fd()]).unwrap();
    assert!(matches!(b.recv::<VmmMsg>(), Err(Error::Malformed(_))));
    assert_eq!(memfds_named(name), 1);

    // Valid JSON of the wrong shape.
    a.send_bytes(br#"{"Bogus":1}"#, &[]).unwrap();
    assert!(matches!(b.recv::<VmmMsg>(), Err(Error::Malformed(_))));

    // A message with an fd the receiver did not expect (Shutdown carries none).
    a.send_bytes(br#""Shutdown""#, &[shm.as_fd()]).unwrap();
    assert!(matches!(
        b.recv::<VmmMsg>(),
        Err(Error::UnexpectedFds {
            got: 1,
            expected: 0
        })
    ));
    assert_eq!(memfds_named(name), 1);

    // A message that needs an fd but came without.
    a.send_bytes(br#"{"Hostmem":{"size":4096}}"#, &[]).unwrap();
    assert!(matches!(
        b.recv::<VmmMsg>(),
        Err(Error::UnexpectedFds {
            got: 0,
            expected: 1
        })
    ));

    // More fds than allowed (MAX_FDS + 2, sent raw, bypassing our sender's check).
    let fds = [shm.as_fd(); MAX_FDS + 2];
    let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
    nix::sys::socket::sendmsg::<()>(
        a.as_fd().as_raw_fd(),
        &[std::io::IoSlice::new(b"\"Shutdown\"")],
        &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert!(matches!(
        b.recv::<VmmMsg>(),
        Err(Error::TooManyFds { got, .. }) if got == MAX_FDS + 2
    ));
    assert_eq!(memfds_named(name), 1);
    // Far more fds than the receive buffer has room for: control data truncated.
    let raw = [shm.as_fd().as_raw_fd(); 3 * MAX_FDS];
    nix::sys::socket::sendmsg::<()>(
        a.as_fd().as_raw_fd(),
        &[std::io::IoSlice::new(b"\"Shutdown\"")],
        &[nix::sys::socket::ControlMessage::ScmRights(&raw)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert!(
        matches!(b.recv::<VmmMsg>(), Err(Error::ControlTruncated { message }) if !message.is_empty())
    );
    assert_eq!(memfds_named(name), 1);
    // Our own sender refuses too many fds before sending.
    assert!(matches!(
        a.send_bytes(b"x", &fds),
        Err(Error::TooManyFds { .. })
    ));

    // Oversized: our sender refuses; a raw oversized datagram is reported as truncated.
    let big = vec![b' '; MAX_MESSAGE + 1];
    assert!(matches!(
        a.send_bytes(&big, &[]),
        Err(Error::Oversized { .. })
    ));
    nix::sys::socket::send(
        a.as_fd().as_raw_fd(),
        &big,
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    assert!(matches!(b.recv::<VmmMsg>(), Err(Error::Truncated)));

    // Timeout, then the tube still works.
    b.set_recv_timeout(Some(Duration::from_millis(20))).unwrap();
    assert!(matches!(b.recv::<VmmMsg>(), Err(Error::Timeout)));
    a.send(&VmmMsg::Shutdown, &[]).unwrap();
    assert_eq!(b.recv::<VmmMsg>().unwrap().0, VmmMsg::Shutdown);

    // A handshake with a peer of another version is refused.
    let bad = Hello {
        version: PROTOCOL_VERSION + 1,
        role: Role::Device,
        pid: 1,
    };
    b.send(&DeviceMsg::Hello(bad), &[]).unwrap();
    assert!(matches!(
        handshake::<VmmMsg, DeviceMsg>(&a, Role::Vmm, Duration::from_secs(1)),
        Err(Error::Handshake(_))
    ));
    // One that claims our own role is refused as well.
    let _ = b.recv::<VmmMsg>();
    b.send(&DeviceMsg::Hello(Hello::new(Role::Vmm)), &[])
        .unwrap();
    assert!(matches!(
        handshake::<VmmMsg, DeviceMsg>(&a, Role::Vmm, Duration::from_secs(1)),
        Err(Error::Handshake(_))
    ));
    drop(shm);
    assert_eq!(memfds_named(name), 0);
    // A non-seqpacket fd is refused as a tube.
    let (r, _w) = nix::unistd::pipe().unwrap();
    assert!(matches!(Tube::from_fd(r), Err(Error::NotSeqpacket { .. })));
}

#[test]
fn polling_receive_gets_early_and_late_messages_fds_and_timeouts() {
    let (a, b) = Tube::pair().unwrap();
    b.set_recv_spin(Duration::from_millis(2));
    // Already queued: the first poll takes it, with its fd.
    let shm = SharedMemory::new("spin", 4096).unwrap();
    a.send(&VmmMsg::Hostmem { size: 4096 }, &[shm.as_fd()])
        .unwrap();
    let (m, fds) = b.recv::<VmmMsg>().unwrap();
    assert_eq!(m, VmmMsg::Hostmem { size: 4096 });
    assert_eq!(fds.len(), 1);
    // Sent while polling, and sent after the poll gave up and the receive sleeps.
    for delay in [Duration::from_micros(500), Duration::from_millis(20)] {
        let a2 = Tube::from_fd(a.as_fd().try_clone_to_owned().unwrap()).unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(delay);
            a2.send(&VmmMsg::Shutdown, &[]).unwrap();
        });
        assert_eq!(b.recv::<VmmMsg>().unwrap().0, VmmMsg::Shutdown, "{delay:?}");
        t.join().unwrap();
    }
    // The receive timeout still holds after the poll.
    b.set_recv_timeout(Some(Duration::from_millis(30))).unwrap();
    let t0 = std::time::Instant::now();
    assert!(matches!(b.recv::<VmmMsg>(), Err(Error::Timeout)));
    assert!(t0.elapsed() >= Duration::from_millis(30));
    // And a hang-up ends a polling receive too.
    drop(a);
    b.set_recv_timeout(None).unwrap();
    assert!(matches!(b.recv::<VmmMsg>(), Err(Error::Hangup)));
}

#[test]
fn shutdown_ends_the_connection_while_other_holders_keep_the_socket() {
    let (a, b) = Tube::pair().unwrap();
    let a = std::sync::Arc::new(a);
    // Another holder of the same end (as the VMM's loop and the device handle share it), and
    // a dup of the socket (as a forked child would hold).
    let other = a.clone();
    let dup = Tube::from_fd(a.as_fd().try_clone_to_owned().unwrap()).unwrap();
    // A receive blocked on our end is woken with a hang-up.
    let blocked = {
        let other = other.clone();
        std::thread::spawn(move || other.recv::<VmmMsg>().map(|(m, _)| m))
    };
    std::thread::sleep(Duration::from_millis(20));
    a.shutdown().unwrap();
    assert!(matches!(blocked.join().unwrap(), Err(Error::Hangup)));
    // The peer reads EOF at once although every holder is still alive.
    b.set_recv_timeout(Some(Duration::from_secs(5))).unwrap();
    let t0 = std::time::Instant::now();
    assert!(matches!(b.recv::<VmmMsg>(), Err(Error::Hangup)));
    assert!(t0.elapsed() < Duration::from_secs(1));
    // Neither side can send any more; a second shutdown is harmless.
    assert!(matches!(b.send(&VmmMsg::Shutdown, &[]), Err(Error::Hangup)));
    assert!(matches!(
        dup.send(&VmmMsg::Shutdown, &[]),
        Err(Error::Hangup)
    ));
    assert!(matches!(other.recv::<VmmMsg>(), Err(Error::Hangup)));
    a.shutdown().unwrap();
    b.shutdown().unwrap();
}

#[test]
fn fields_added_within_a_protocol_version_read_with_their_defaults() {
    // A Ready from before num_scanouts: one scanout. A Cursor from before image_hash: 0.
    let ready: DeviceMsg =
        serde_json::from_str(r#"{"Ready":{"backend":"shm","num_capsets":1}}"#).unwrap();
    assert_eq!(
        ready,
        DeviceMsg::Ready {
            backend: "shm".into(),
            num_capsets: 1,
            num_scanouts: 1,
        }
    );
    let cursor: DeviceMsg = serde_json::from_str(
        r#"{"Cursor":{"scanout_id":0,"x":1,"y":2,"resource_id":3,"hot_x":4,"hot_y":5}}"#,
    )
    .unwrap();
    let DeviceMsg::Cursor(c) = cursor else {
        panic!("{cursor:?}")
    };
    assert_eq!((c.x, c.hot_y, c.image_hash), (1, 5, 0));
}

#[test]
fn what_a_peer_sent_before_it_closed_with_our_messages_unread_is_still_received() {
    // The peer's close with our message unread leaves ECONNRESET on our socket, which the
    // kernel reports ahead of the peer's queued messages: they must still come, then EOF.
    let (ours, theirs) = Tube::pair().unwrap();
    for n in 0..3 {
        theirs
            .send(
                &DeviceMsg::Ready {
                    backend: format!("m{n}"),
                    num_capsets: n,
                    num_scanouts: 1,
                },
                &[],
            )
            .unwrap();
    }
    ours.send(&VmmMsg::Shutdown, &[]).unwrap();
    drop(theirs);
    for n in 0..3 {
        let (msg, _) = ours.recv::<DeviceMsg>().unwrap();
        assert!(
            matches!(&msg, DeviceMsg::Ready { num_capsets, .. } if *num_capsets == n),
            "{msg:?}"
        );
    }
    assert!(matches!(ours.recv::<DeviceMsg>(), Err(Error::Hangup)));
}
