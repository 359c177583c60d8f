//! A hostile device, in-process: a real tube to the real mapping service, sending every bad
//! placement event and fd the VMM must refuse. After each: an error reply (or, for messages
//! that are not valid events, a logged protocol error), no panic, the window's mappings equal
//! the VMM's placement table, and no fd of ours left open.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::Arc;
use std::time::Duration;

use hostmem_base::mmap::{MemoryMapping, Prot};
use hostmem_base::procfs::{maps_in_range, open_fds};
use hostmem_base::shm::SharedMemory;
use hostmem_ipc::protocol::{DeviceMsg, Outcome, RefuseCode, VmmMsg};
use hostmem_ipc::Tube;
use hostmem_vmm::hostmem::{Hostmem, Limits, Mode, DEFAULT_WINDOW_GPA};
use hostmem_vmm::service::{serve, ServeEnd};

const P: u64 = 4096;
const WINDOW: u64 = 16 << 20;

struct Vmm {
    hm: Arc<Hostmem>,
    dev: Tube,
    service: std::thread::JoinHandle<ServeEnd>,
    seq: u64,
}

fn start() -> Vmm {
    let hm = Arc::new(
        Hostmem::new(
            WINDOW,
            None,
            DEFAULT_WINDOW_GPA,
            Mode::Fixed,
            Limits {
                max_live: 8,
                ..Limits::default()
            },
        )
        .unwrap(),
    );
    let (vmm_end, dev) = Tube::pair().unwrap();
    let tube = Arc::new(vmm_end);
    let service = {
        let hm = hm.clone();
        std::thread::spawn(move || serve(&hm, &tube))
    };
    dev.set_recv_timeout(Some(Duration::from_secs(5))).unwrap();
    Vmm {
        hm,
        dev,
        service,
        seq: 0,
    }
}

fn blob(name: &str, len: u64, seal: bool) -> SharedMemory {
    let shm = SharedMemory::new(name, len).unwrap();
    MemoryMapping::from_fd(shm.as_fd(), 0, len as usize, Prot::READ_WRITE)
        .unwrap()
        .fill(0, len as usize, 0x5a)
        .unwrap();
    if seal {
        shm.seal_size().unwrap();
    }
    shm
}

impl Vmm {
    fn map(
        &mut self,
        res: u32,
        offset: u64,
        len: u64,
        prot: u32,
        fd: Option<BorrowedFd<'_>>,
    ) -> Outcome {
        self.seq += 1;
        let msg = DeviceMsg::Map {
            seq: self.seq,
            resource_id: res,
            offset,
            len,
            fd_offset: 0,
            prot,
            map_info: 1,
        };
        let fds: Vec<BorrowedFd<'_>> = fd.into_iter().collect();
        // Sent raw so that a message may carry the wrong number of fds.
        self.dev
            .send_bytes(&serde_json::to_vec(&msg).unwrap(), &fds)
            .unwrap();
        self.reply()
    }

    fn unmap(&mut self, res: u32, offset: u64, len: u64) -> Outcome {
        self.seq += 1;
        let msg = DeviceMsg::Unmap {
            seq: self.seq,
            resource_id: res,
            offset,
            len,
        };
        self.dev.send(&msg, &[]).unwrap();
        self.reply()
    }

    fn reply(&mut self) -> Outcome {
        match self.dev.recv::<VmmMsg>().unwrap().0 {
            VmmMsg::Reply { seq, outcome } => {
                assert_eq!(seq, self.seq, "reply for the event just sent");
                outcome
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The window's mappings equal the placement table: background everywhere else.
    fn consistent(&self) {
        self.hm.audit().unwrap();
    }
}

fn refused(o: &Outcome, code: RefuseCode, what: &str) {
    match o {
        Outcome::Refused { code: c, reason } => assert_eq!(*c, code, "{what}: {reason}"),
        Outcome::Ok => panic!("{what}: accepted"),
    }
}

/// Fds of this test that point at our memfds (other tests in the binary run in parallel).
fn our_fds() -> usize {
    open_fds()
        .unwrap()
        .iter()
        .filter(|(_, t)| t.contains("hostile-"))
        .count()
}

#[test]
fn every_bad_event_is_refused_and_nothing_leaks() {
    let mut v = start();
    let good = blob("hostile-good", 4 * P, true);
    let baseline = our_fds();
    let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;

    // A good placement, to overlap with later.
    assert_eq!(v.map(1, 8 * P, 4 * P, rw, Some(good.as_fd())), Outcome::Ok);
    v.consistent();

    let inv = RefuseCode::InvalidParameter;
    let cases: Vec<(&str, u32, u64, u64, u32)> = vec![
        ("outside the window", 2, WINDOW, 4 * P, rw),
        ("end past the window", 3, WINDOW - P, 4 * P, rw),
        ("offset + len overflows", 4, u64::MAX - P + 1, 4 * P, rw),
        ("misaligned offset", 5, 100, 4 * P, rw),
        ("misaligned length", 6, 0, 100, rw),
        ("zero length", 7, 0, 0, rw),
        ("overlaps a live placement", 8, 10 * P, 4 * P, rw),
        (
            "PROT_EXEC",
            9,
            0,
            4 * P,
            (libc::PROT_READ | libc::PROT_EXEC) as u32,
        ),
        (
            "PROT_WRITE|EXEC",
            10,
            0,
            4 * P,
            (libc::PROT_WRITE | libc::PROT_EXEC) as u32,
        ),
        ("no protection", 11, 0, 4 * P, 0),
    ];
    for (what, res, off, len, prot) in cases {
        refused(&v.map(res, off, len, prot, Some(good.as_fd())), inv, what);
        v.consistent();
    }
    // The VMM no longer sees the guest's commands (they live in the device's virtqueues):
    // a valid placement nobody asked for is accepted, as a renderer could show any bytes in
    // its blobs; the device can take it away again at any time.
    assert_eq!(v.map(20, 0, 4 * P, rw, Some(good.as_fd())), Outcome::Ok);
    v.consistent();
    // The same resource placed a second time while live, even where nothing overlaps.
    refused(
        &v.map(20, 16 * P, 4 * P, rw, Some(good.as_fd())),
        inv,
        "one resource placed twice",
    );
    v.consistent();
    assert_eq!(v.unmap(20, 0, 4 * P), Outcome::Ok);
    v.consistent();
    assert_eq!(v.hm.live(), 1);

    // Fds that are not sealed regular files of the right size.
    let (sock_a, _sock_b) = Tube::pair().unwrap();
    let dir = std::fs::File::open("/tmp").unwrap();
    let (pipe_r, _pipe_w) = nix::unistd::pipe().unwrap();
    let zero = std::fs::File::open("/dev/zero").unwrap();
    let short = blob("hostile-short", P, true);
    let unsealed = blob("hostile-unsealed", 4 * P, false);
    let bad_fds: Vec<(&str, BorrowedFd<'_>)> = vec![
        ("a socket", sock_a.as_fd()),
        ("a directory", dir.as_fd()),
        ("a pipe", pipe_r.as_fd()),
        ("/dev/zero", zero.as_fd()),
        ("a memfd shorter than the length", short.as_fd()),
        ("a memfd that can shrink", unsealed.as_fd()),
    ];
    for (i, (what, fd)) in bad_fds.into_iter().enumerate() {
        let res = 30 + i as u32;
        refused(&v.map(res, 0, 4 * P, rw, Some(fd)), inv, what);
        v.consistent();
    }
    // The unsealed one is truncated after it was refused: nothing of it is mapped anyway.
    nix::unistd::ftruncate(unsealed.as_fd(), 0).unwrap();

    // Wrong fd count: a Map without its fd (a protocol error: no reply, logged, counted).
    let before = v.hm.counters().protocol_errors;
    v.seq += 1;
    let msg = DeviceMsg::Map {
        seq: v.seq,
        resource_id: 40,
        offset: 0,
        len: P,
        fd_offset: 0,
        prot: rw,
        map_info: 1,
    };
    v.dev
        .send_bytes(&serde_json::to_vec(&msg).unwrap(), &[])
        .unwrap();
    // An Unmap with an fd attached.
    v.dev
        .send_bytes(
            br#"{"Unmap":{"seq":1,"resource_id":1,"offset":0,"len":4096}}"#,
            &[good.as_fd()],
        )
        .unwrap();
    // Malformed JSON, an oversized datagram, more fds than allowed.
    v.dev.send_bytes(b"{\"Map\": nonsense", &[]).unwrap();
    nix::sys::socket::send(
        v.dev.as_fd().as_raw_fd(),
        &vec![b'x'; 70_000],
        nix::sys::socket::MsgFlags::empty(),
    )
    .unwrap();
    let many = [good.as_fd().as_raw_fd(); 6];
    nix::sys::socket::sendmsg::<()>(
        v.dev.as_fd().as_raw_fd(),
        &[std::io::IoSlice::new(b"\"Shutdown\"")],
        &[nix::sys::socket::ControlMessage::ScmRights(&many)],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    // Still serving: an unmap of something that is not placed is refused with a reply.
    refused(&v.unmap(1, 0, 4 * P), inv, "unmap of an unplaced range");
    assert_eq!(v.hm.counters().protocol_errors, before + 5);

    // Unmap with the wrong resource, the wrong offset or the wrong length.
    refused(
        &v.unmap(99, 8 * P, 4 * P),
        inv,
        "unmap of another resource's placement",
    );
    refused(&v.unmap(1, 8 * P, P), inv, "unmap with the wrong length");
    refused(
        &v.unmap(1, 9 * P, 3 * P),
        inv,
        "unmap of part of a placement",
    );
    // An unmap of its own placement that no guest command asked for: accepted (the guest
    // reads background there again), and the range can be placed again.
    assert_eq!(v.unmap(1, 8 * P, 4 * P), Outcome::Ok);
    v.consistent();
    assert_eq!(v.map(1, 8 * P, 4 * P, rw, Some(good.as_fd())), Outcome::Ok);

    // A flood of bogus events: each answered, the service stays responsive.
    for i in 0..2000u32 {
        refused(&v.unmap(1000 + i, 0, P), inv, "flood");
    }

    // The live-placement limit (8) answers OUT_OF_MEMORY.
    let mut placed = vec![1];
    for res in 50..60u32 {
        let off = (res as u64 - 48) * 8 * P;
        match v.map(res, off, 4 * P, rw, Some(good.as_fd())) {
            Outcome::Ok => placed.push(res),
            o => refused(&o, RefuseCode::OutOfMemory, "live limit"),
        }
    }
    assert_eq!(placed.len(), 8);
    v.consistent();

    // The device hangs up in the middle of everything: the service ends cleanly, and the
    // reset restores the whole window.
    drop(v.dev);
    assert_eq!(v.service.join().unwrap(), ServeEnd::Hangup);
    assert_eq!(v.hm.reset().unwrap(), 8);
    let (start, len) = v.hm.window().host_range();
    assert_eq!(
        maps_in_range(start, start + len).unwrap().len(),
        1,
        "one background VMA again"
    );
    drop((short, unsealed));
    assert_eq!(
        our_fds(),
        baseline,
        "no fd of a refused or placed blob is left open"
    );
}
