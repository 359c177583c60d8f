//! The virtio core against a driver written here: split rings laid out by hand in guest
//! RAM (a memfd mapped twice, once for the "driver" below and once by the device through
//! `virtio::guest_memory`), kick and call eventfds, the shm backend and a pipelining fake
//! placer. The happy path, notification suppression, and every hostile-driver case of
//! invariant 8 in docs/invariants.md: each must end in an error response or a chain returned with length
//! 0 (or dropped), and the device must go on serving.

mod common;

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use hostmem_base::shm::SharedMemory;
use hostmem_device::backend::shm::{encode_stream, ShmBackend, ShmOp, SHM_CAPSET_ID};
use hostmem_device::backend::Backend;
use hostmem_device::display::{Format, FrameInfo, FramePixels, FrameSink};
use hostmem_device::gpu::{Gpu, MapRequest, PlaceError, Placer};
use hostmem_device::process::handle_transport;
use hostmem_device::virtio::{
    guest_memory, BadChain, GuestMemoryMmap, VirtioGpu, CONTROLQ, CURSORQ, MAX_REQUEST,
};
use hostmem_device::wire::*;
use hostmem_ipc::protocol::{GuestRegion, QueueSetup, TransportMsg, TransportReply};
use vm_memory::{Bytes, GuestAddress};

use common::{efd, ram, region, AVAIL, DESC, RAM_GPA, USED};

const WINDOW: u64 = 16 << 20;
/// Guest RAM: 4 MiB at [`RAM_GPA`].
const RAM_SIZE: u64 = 4 << 20;
const CURSOR_DESC: u64 = RAM_GPA + 0x3000;
const CURSOR_AVAIL: u64 = RAM_GPA + 0x4000;
const CURSOR_USED: u64 = RAM_GPA + 0x5000;
const DATA: u64 = RAM_GPA + 0x10000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Map(u32, u64),
    Unmap(u32, u64),
}

/// Records placements; `pipelined` answers begin_map/begin_unmap with a ticket settled by
/// finish_next (in order), like the mirror placer.
#[derive(Debug, Default)]
struct FakePlacer {
    pipelined: bool,
    calls: Vec<Call>,
    tickets: VecDeque<u64>,
    next: u64,
}

impl Placer for FakePlacer {
    fn map(&mut self, req: &MapRequest<'_>) -> Result<(), PlaceError> {
        self.calls.push(Call::Map(req.resource_id, req.offset));
        Ok(())
    }
    fn unmap(&mut self, resource_id: u32, offset: u64, _len: u64) -> Result<(), PlaceError> {
        self.calls.push(Call::Unmap(resource_id, offset));
        Ok(())
    }
    fn window_size(&self) -> u64 {
        WINDOW
    }
    fn begin_map(&mut self, req: &MapRequest<'_>) -> Result<Option<u64>, PlaceError> {
        self.map(req)?;
        Ok(self.ticket())
    }
    fn begin_unmap(&mut self, id: u32, offset: u64, len: u64) -> Result<Option<u64>, PlaceError> {
        self.unmap(id, offset, len)?;
        Ok(self.ticket())
    }
    fn finish_next(&mut self) -> Option<(u64, Result<(), PlaceError>)> {
        self.tickets.pop_front().map(|t| (t, Ok(())))
    }
}

impl FakePlacer {
    fn ticket(&mut self) -> Option<u64> {
        if !self.pipelined {
            return None;
        }
        self.next += 1;
        self.tickets.push_back(self.next);
        Some(self.next)
    }
}

type Dev = VirtioGpu<FakePlacer>;

/// One queue as the driver sees it.
struct Ring {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_seen: u16,
    kick: OwnedFd,
    call: OwnedFd,
}

/// The test's driver: its own mapping of guest RAM, the rings, a bump allocator for data.
struct Driver {
    memfd: SharedMemory,
    mem: GuestMemoryMmap,
    rings: [Option<Ring>; 2],
    data: u64,
}

fn dup(fd: &OwnedFd) -> OwnedFd {
    fd.try_clone().expect("dup")
}

impl Driver {
    fn new() -> Driver {
        let (memfd, mem) = ram("guest-ram", RAM_SIZE);
        Driver {
            memfd,
            mem,
            rings: [None, None],
            data: DATA,
        }
    }

    fn device_memory(&self) -> GuestMemoryMmap {
        guest_memory(
            &[region(RAM_SIZE)],
            vec![self.memfd.try_clone_fd().unwrap()],
        )
        .expect("ram")
    }

    fn setup(&self, index: u16, size: u16, event_idx: bool) -> QueueSetup {
        let (desc, avail, used) = if index == CONTROLQ {
            (DESC, AVAIL, USED)
        } else {
            (CURSOR_DESC, CURSOR_AVAIL, CURSOR_USED)
        };
        QueueSetup {
            index,
            size,
            desc,
            avail,
            used,
            event_idx,
        }
    }

    /// Enables queue `index` in the device; returns the device's verdict.
    fn enable(&mut self, dev: &mut Dev, index: u16, size: u16, event_idx: bool) {
        let s = self.setup(index, size, event_idx);
        let (kick, call) = (efd(), efd());
        dev.enable_queue(&s, dup(&kick), dup(&call))
            .expect("enable queue");
        // Zeroed rings: a fresh queue.
        for a in [s.avail, s.used] {
            self.mem.write_slice(&[0u8; 6], GuestAddress(a)).unwrap();
        }
        self.rings[usize::from(index)] = Some(Ring {
            size,
            desc: s.desc,
            avail: s.avail,
            used: s.used,
            avail_idx: 0,
            used_seen: 0,
            kick,
            call,
        });
    }

    fn ring(&mut self, q: u16) -> &mut Ring {
        self.rings[usize::from(q)].as_mut().expect("queue enabled")
    }

    fn desc(&mut self, q: u16, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let table = self.ring(q).desc;
        common::write_desc(&self.mem, table, i, addr, len, flags, next);
    }

    /// Offers `head` in the avail ring (no kick).
    fn offer(&mut self, q: u16, head: u16) {
        let r = self.ring(q);
        let (avail, size, idx) = (r.avail, r.size, r.avail_idx);
        self.ring(q).avail_idx = common::offer(&self.mem, avail, size, idx, head);
    }

    fn kick(&mut self, dev: &mut Dev, q: u16) {
        nix::unistd::write(self.ring(q).kick.as_fd(), &1u64.to_ne_bytes()).unwrap();
        dev.kick(q);
    }

    fn alloc(&mut self, bytes: &[u8], len: u32) -> u64 {
        let at = self.data;
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
        self.data += u64::from(len.max(bytes.len() as u32)).next_multiple_of(64);
        at
    }

    /// A well-formed chain at descriptors `first`, `first+1`: the request, then `resp`
    /// writable bytes. Offered, not kicked. Returns the response address.
    fn chain(&mut self, q: u16, first: u16, req: &[u8], resp: u32) -> u64 {
        let r = self.alloc(req, req.len() as u32);
        let w = self.alloc(&[], resp);
        self.desc(q, first, r, req.len() as u32, F_NEXT, first + 1);
        self.desc(q, first + 1, w, resp, F_WRITE, 0);
        self.offer(q, first);
        w
    }

    /// New used entries `(id, len)` since the last call.
    fn used(&mut self, q: u16) -> Vec<(u32, u32)> {
        let r = self.ring(q);
        let (used, size, seen) = (r.used, r.size, r.used_seen);
        let idx = common::used_idx(&self.mem, used);
        let mut out = Vec::new();
        let mut i = seen;
        while i != idx {
            out.push(common::used_elem(&self.mem, used, size, i));
            i = i.wrapping_add(1);
        }
        self.ring(q).used_seen = idx;
        out
    }

    fn response(&self, at: u64, len: u32) -> Response {
        let mut b = vec![0u8; len as usize];
        self.mem.read_slice(&mut b, GuestAddress(at)).unwrap();
        Response::parse(&b).expect("response parses")
    }

    /// Reads the call eventfd's counter (0 when not signalled).
    fn calls(&mut self, q: u16) -> u64 {
        let mut b = [0u8; 8];
        match nix::unistd::read(self.ring(q).call.as_raw_fd(), &mut b) {
            Ok(8) => u64::from_ne_bytes(b),
            _ => 0,
        }
    }

    /// Sends `cmd` on the control queue at descriptors 0/1 and returns its response.
    fn roundtrip(&mut self, dev: &mut Dev, cmd: &Command) -> Response {
        let w = self.chain(CONTROLQ, 0, &cmd.encode(), 512);
        self.kick(dev, CONTROLQ);
        while dev.in_flight() > 0 {
            dev.finish_one();
        }
        let used = self.used(CONTROLQ);
        assert_eq!(used.len(), 1, "one used entry for {cmd:?}: {used:?}");
        assert_eq!(used[0].0, 0);
        self.response(w, used[0].1)
    }
}

fn device(pipelined: bool) -> Dev {
    let placer = FakePlacer {
        pipelined,
        ..Default::default()
    };
    VirtioGpu::new(Gpu::new(
        Box::new(ShmBackend::new()) as Box<dyn Backend>,
        placer,
    ))
}

/// A device with memory and an enabled control queue of 16 entries.
fn ready(pipelined: bool) -> (Driver, Dev) {
    let mut drv = Driver::new();
    let mut dev = device(pipelined);
    dev.set_memory(drv.device_memory()).unwrap();
    drv.enable(&mut dev, CONTROLQ, 16, false);
    (drv, dev)
}

fn assert_ok(r: &Response) {
    assert!(
        matches!(r, Response::OkNoData { .. }),
        "expected OK, got {r:?}"
    );
}

/// The device still serves: a context create/destroy round trip works.
fn assert_serving(drv: &mut Driver, dev: &mut Dev) {
    let id = 1000 + dev.stats().chains as u32;
    assert_ok(&drv.roundtrip(dev, &Command::ctx_create(id, 0, b"alive")));
    assert_ok(&drv.roundtrip(dev, &Command::ctx_destroy(id)));
}

const PAGE: u64 = 4096;

#[test]
fn commands_flow_through_the_control_queue_in_order() {
    let (mut drv, mut dev) = ready(true);
    assert_ok(&drv.roundtrip(&mut dev, &Command::ctx_create(1, 0, b"t")));
    let info = drv.roundtrip(&mut dev, &Command::get_capset_info(0));
    assert!(
        matches!(info, Response::OkCapsetInfo { capset_id, .. } if capset_id == SHM_CAPSET_ID),
        "{info:?}"
    );
    assert_ok(&drv.roundtrip(
        &mut dev,
        &Command::create_blob(
            1,
            7,
            VIRTIO_GPU_BLOB_MEM_HOST3D,
            VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
            0,
            2 * PAGE,
        ),
    ));
    // Pipelined: MAP, UNMAP, MAP of blob 7 in one kick; the responses come in order.
    let cmds = [
        Command::map_blob(1, 7, 0),
        Command::unmap_blob(1, 7),
        Command::map_blob(1, 7, 4 * PAGE).fenced(99),
    ];
    let mut at = Vec::new();
    for (i, c) in cmds.iter().enumerate() {
        at.push(drv.chain(CONTROLQ, 2 * i as u16, &c.encode(), 64));
    }
    drv.kick(&mut dev, CONTROLQ);
    while dev.in_flight() > 0 {
        dev.finish_one();
    }
    let used = drv.used(CONTROLQ);
    assert_eq!(
        used.iter().map(|u| u.0).collect::<Vec<_>>(),
        [0, 2, 4],
        "in command order"
    );
    let r0 = drv.response(at[0], used[0].1);
    assert!(matches!(r0, Response::OkMapInfo { .. }), "{r0:?}");
    assert_eq!(used[0].1 as usize, RESP_MAP_INFO_SIZE);
    assert_ok(&drv.response(at[1], used[1].1));
    let r2 = drv.response(at[2], used[2].1);
    assert_eq!(r2.hdr().fence_id, 99, "fence echoed");
    assert_eq!(
        dev.gpu().placer().calls,
        [Call::Map(7, 0), Call::Unmap(7, 0), Call::Map(7, 4 * PAGE)]
    );
    // SUBMIT_3D: the hostmem reply bytes follow the OK_NODATA header.
    let stream = encode_stream(&[ShmOp::Checksum {
        resource_id: 7,
        offset: 0,
        len: PAGE,
    }]);
    let r = drv.roundtrip(&mut dev, &Command::submit_3d(1, stream));
    assert!(
        matches!(&r, Response::OkNoData { reply, .. } if reply.len() == 8),
        "{r:?}"
    );
    let s = dev.stats();
    assert_eq!(s.chains, 7);
    assert_eq!(s.bad_chains, 0);
    assert!(s.kicks >= 5 && s.wakeups >= 5, "{s:?}");
    assert!(s.interrupts >= 5, "{s:?}");
    assert!(drv.calls(CONTROLQ) >= 5, "call eventfd signalled");
}

#[test]
fn notifications_follow_the_drivers_wishes() {
    // Without event index: VRING_AVAIL_F_NO_INTERRUPT suppresses the call.
    let (mut drv, mut dev) = ready(false);
    drv.mem
        .write_obj(1u16.to_le(), GuestAddress(AVAIL))
        .unwrap();
    assert_serving(&mut drv, &mut dev);
    let s = dev.stats();
    assert_eq!((s.interrupts, s.suppressed), (0, 2), "{s:?}");
    assert_eq!(drv.calls(CONTROLQ), 0);
    drv.mem
        .write_obj(0u16.to_le(), GuestAddress(AVAIL))
        .unwrap();
    assert_serving(&mut drv, &mut dev);
    assert_eq!(dev.stats().interrupts, 2);
    assert_eq!(drv.calls(CONTROLQ), 2);

    // With event index: used_event (after the avail ring) far ahead suppresses; the device
    // publishes avail_event (after the used ring) = its next avail index.
    let mut drv = Driver::new();
    let mut dev = device(false);
    dev.set_memory(drv.device_memory()).unwrap();
    drv.enable(&mut dev, CONTROLQ, 16, true);
    let used_event = GuestAddress(AVAIL + 4 + 2 * 16);
    drv.mem.write_obj(100u16.to_le(), used_event).unwrap();
    assert_serving(&mut drv, &mut dev);
    assert_eq!(dev.stats().suppressed, 2);
    assert_eq!(dev.stats().interrupts, 0);
    let avail_event: u16 = drv.mem.read_obj(GuestAddress(USED + 4 + 8 * 16)).unwrap();
    assert_eq!(u16::from_le(avail_event), 2);
    // used_event = 2: the next used entry (index 2 -> 3) crosses it.
    drv.mem.write_obj(2u16.to_le(), used_event).unwrap();
    assert_ok(&drv.roundtrip(&mut dev, &Command::ctx_create(5, 0, b"")));
    assert_eq!(dev.stats().interrupts, 1);
}

#[test]
fn the_cursor_queue_returns_chains_with_length_zero() {
    let (mut drv, mut dev) = ready(false);
    drv.enable(&mut dev, CURSORQ, 8, false);
    let c = drv.alloc(&[1u8; 56], 56);
    drv.desc(CURSORQ, 3, c, 56, 0, 0);
    drv.offer(CURSORQ, 3);
    drv.desc(CURSORQ, 5, c, 56, 0, 0);
    drv.offer(CURSORQ, 5);
    drv.kick(&mut dev, CURSORQ);
    assert_eq!(drv.used(CURSORQ), [(3, 0), (5, 0)]);
    assert_eq!(dev.stats().chains, 2);
    // A head beyond the cursor queue is dropped, not returned.
    drv.offer(CURSORQ, 8);
    drv.kick(&mut dev, CURSORQ);
    assert!(drv.used(CURSORQ).is_empty());
    assert_eq!(dev.refused(BadChain::HeadOutOfRange), 1);
    assert_serving(&mut drv, &mut dev);
}

/// Offers a chain built by `build` at head 0, kicks, and returns the used entries and the
/// bytes at `resp` (if given).
fn hostile(
    drv: &mut Driver,
    dev: &mut Dev,
    build: impl FnOnce(&mut Driver),
    kind: BadChain,
) -> Vec<(u32, u32)> {
    let before = dev.refused(kind);
    build(drv);
    drv.kick(dev, CONTROLQ);
    let used = drv.used(CONTROLQ);
    assert_eq!(dev.refused(kind), before + 1, "refused as {kind:?}");
    used
}

#[test]
fn descriptor_loops_and_overlong_chains_are_refused() {
    let (mut drv, mut dev) = ready(false);
    let req = Command::ctx_create(9, 0, b"").encode();
    // 0 -> 1 -> 0 -> ...: readable only, no room for an answer: used with length 0.
    let used = hostile(
        &mut drv,
        &mut dev,
        |d| {
            let r = d.alloc(&req, req.len() as u32);
            d.desc(CONTROLQ, 0, r, 8, F_NEXT, 1);
            d.desc(CONTROLQ, 1, r, 8, F_NEXT, 0);
            d.offer(CONTROLQ, 0);
        },
        BadChain::TooLong,
    );
    assert_eq!(used, [(0, 0)]);
    // A writable descriptor pointing at itself: an error header in it.
    let mut w = 0;
    let used = hostile(
        &mut drv,
        &mut dev,
        |d| {
            let r = d.alloc(&req, req.len() as u32);
            w = d.alloc(&[], 64);
            d.desc(CONTROLQ, 0, r, req.len() as u32, F_NEXT, 1);
            d.desc(CONTROLQ, 1, w, 64, F_WRITE | F_NEXT, 1);
            d.offer(CONTROLQ, 0);
        },
        BadChain::TooLong,
    );
    assert_eq!(used, [(0, 24)]);
    assert_eq!(drv.response(w, 24).error(), Some(ErrorCode::Unspec));
    assert!(!dev.gpu().contexts().any(|c| c == 9), "not executed");
    // next beyond the queue.
    let used = hostile(
        &mut drv,
        &mut dev,
        |d| {
            let r = d.alloc(&req, req.len() as u32);
            d.desc(CONTROLQ, 0, r, 8, F_NEXT, 16);
            d.offer(CONTROLQ, 0);
        },
        BadChain::NextOutOfRange,
    );
    assert_eq!(used, [(0, 0)]);
    // A head beyond the queue cannot be returned at all: dropped.
    let used = hostile(
        &mut drv,
        &mut dev,
        |d| d.offer(CONTROLQ, 300),
        BadChain::HeadOutOfRange,
    );
    assert!(used.is_empty());
    // Indirect descriptors are not offered.
    let used = hostile(
        &mut drv,
        &mut dev,
        |d| {
            let t = d.alloc(&[0u8; 32], 32);
            d.desc(CONTROLQ, 0, t, 32, F_INDIRECT, 0);
            d.offer(CONTROLQ, 0);
        },
        BadChain::Indirect,
    );
    assert_eq!(used, [(0, 0)]);
    assert_eq!(dev.stats().bad_chains, 5);
    assert_serving(&mut drv, &mut dev);
}

#[test]
fn lengths_that_overflow_and_buffers_outside_ram_are_refused() {
    let (mut drv, mut dev) = ready(false);
    let req = Command::ctx_create(9, 0, b"").encode();
    let mut w = 0;
    // addr + len wraps around 2^64.
    let used = hostile(
        &mut drv,
        &mut dev,
        |d| {
            w = d.alloc(&[], 64);
            d.desc(CONTROLQ, 0, u64::MAX - 16, 4096, F_NEXT, 1);
            d.desc(CONTROLQ, 1, w, 64, F_WRITE, 0);
            d.offer(CONTROLQ, 0);
        },
        BadChain::LengthOverflow,
    );
    assert_eq!(used, [(0, 24)]);
    assert_eq!(drv.response(w, 24).error(), Some(ErrorCode::Unspec));
    // Outside RAM: GPA 0, past the end of RAM, and inside the hostmem window (4 GiB).
    for gpa in [0, RAM_GPA + RAM_SIZE - 8, 0x1_0000_0000] {
        let used = hostile(
            &mut drv,
            &mut dev,
            |d| {
                w = d.alloc(&[], 64);
                d.desc(CONTROLQ, 0, gpa, req.len() as u32, F_NEXT, 1);
                d.desc(CONTROLQ, 1, w, 64, F_WRITE, 0);
                d.offer(CONTROLQ, 0);
            },
            BadChain::OutsideRam,
        );
        assert_eq!(used, [(0, 24)], "gpa {gpa:#x}");
        assert_eq!(
            drv.response(w, 24).error(),
            Some(ErrorCode::InvalidParameter)
        );
    }
    // A writable buffer outside RAM, and nothing else to answer in: length 0.
    let used = hostile(
        &mut drv,
        &mut dev,
        |d| {
            let r = d.alloc(&req, req.len() as u32);
            d.desc(CONTROLQ, 0, r, req.len() as u32, F_NEXT, 1);
            d.desc(CONTROLQ, 1, 0x1_0000_0000, 64, F_WRITE, 0);
            d.offer(CONTROLQ, 0);
        },
        BadChain::OutsideRam,
    );
    assert_eq!(used, [(0, 0)]);
    // A request larger than the device takes (the RAM holds it).
    let used = hostile(
        &mut drv,
        &mut dev,
        |d| {
            w = d.alloc(&[], 64);
            d.desc(CONTROLQ, 0, DATA, MAX_REQUEST as u32 + 1, F_NEXT, 1);
            d.desc(CONTROLQ, 1, w, 64, F_WRITE, 0);
            d.offer(CONTROLQ, 0);
        },
        BadChain::RequestTooLarge,
    );
    assert_eq!(used, [(0, 24)]);
    // Many readable descriptors whose lengths add up past the limit.
    let used = hostile(
        &mut drv,
        &mut dev,
        |d| {
            for i in 0..15 {
                d.desc(CONTROLQ, i, DATA, 1 << 20, F_NEXT, i + 1);
            }
            d.desc(CONTROLQ, 15, w, 64, F_WRITE, 0);
            d.offer(CONTROLQ, 0);
        },
        BadChain::RequestTooLarge,
    );
    assert_eq!(used, [(0, 24)]);
    assert!(!dev.gpu().contexts().any(|c| c == 9));
    assert_serving(&mut drv, &mut dev);
}

#[test]
fn short_buffers_and_swapped_parts_are_refused() {
    let (mut drv, mut dev) = ready(false);
    // A request shorter than its command: the handler's ERR_UNSPEC.
    let req = Command::ctx_create(9, 0, b"").encode();
    let w = drv.chain(CONTROLQ, 0, &req[..30], 64);
    drv.kick(&mut dev, CONTROLQ);
    let used = drv.used(CONTROLQ);
    assert_eq!(used, [(0, 24)]);
    assert_eq!(drv.response(w, 24).error(), Some(ErrorCode::Unspec));
    // No readable part at all: an empty request, which the handler answers ERR_UNSPEC.
    let w = drv.alloc(&[], 64);
    drv.desc(CONTROLQ, 0, w, 64, F_WRITE, 0);
    drv.offer(CONTROLQ, 0);
    drv.kick(&mut dev, CONTROLQ);
    assert_eq!(drv.used(CONTROLQ), [(0, 24)]);
    assert_eq!(drv.response(w, 24).error(), Some(ErrorCode::Unspec));
    // A response buffer below a header: not executed, length 0.
    let used = hostile(
        &mut drv,
        &mut dev,
        |d| {
            d.chain(CONTROLQ, 0, &req, 8);
        },
        BadChain::ResponseTooSmall,
    );
    assert_eq!(used, [(0, 0)]);
    assert!(!dev.gpu().contexts().any(|c| c == 9), "not executed");
    // MAP_BLOB needs 32 bytes: 24 get ERR_UNSPEC and nothing is mapped.
    assert_ok(&drv.roundtrip(&mut dev, &Command::ctx_create(1, 0, b"")));
    assert_ok(&drv.roundtrip(
        &mut dev,
        &Command::create_blob(
            1,
            3,
            VIRTIO_GPU_BLOB_MEM_HOST3D,
            VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
            0,
            PAGE,
        ),
    ));
    let mut w = 0;
    let used = hostile(
        &mut drv,
        &mut dev,
        |d| {
            w = d.chain(CONTROLQ, 0, &Command::map_blob(1, 3, 0).encode(), 24);
        },
        BadChain::ResponseTooSmall,
    );
    assert_eq!(used, [(0, 24)]);
    assert_eq!(drv.response(w, 24).error(), Some(ErrorCode::Unspec));
    assert!(dev.gpu().placer().calls.is_empty(), "not mapped");
    // Writable before readable.
    let used = hostile(
        &mut drv,
        &mut dev,
        |d| {
            w = d.alloc(&[], 64);
            let r = d.alloc(&req, req.len() as u32);
            d.desc(CONTROLQ, 0, w, 64, F_WRITE | F_NEXT, 1);
            d.desc(CONTROLQ, 1, r, req.len() as u32, 0, 0);
            d.offer(CONTROLQ, 0);
        },
        BadChain::WritableBeforeReadable,
    );
    assert_eq!(used, [(0, 24)]);
    assert_eq!(drv.response(w, 24).error(), Some(ErrorCode::Unspec));
    // A capset larger than the buffer: ERR_UNSPEC instead of a cut capset.
    let cmd = Command::get_capset(SHM_CAPSET_ID, 1).encode();
    let w = drv.chain(CONTROLQ, 0, &cmd, 25);
    drv.kick(&mut dev, CONTROLQ);
    let used = drv.used(CONTROLQ);
    assert_eq!(used, [(0, 24)]);
    assert_eq!(drv.response(w, 24).error(), Some(ErrorCode::Unspec));
    // A SUBMIT_3D reply cut to the buffer: the header survives.
    let stream = encode_stream(&[ShmOp::Checksum {
        resource_id: 3,
        offset: 0,
        len: PAGE,
    }]);
    let w = drv.chain(CONTROLQ, 0, &Command::submit_3d(1, stream).encode(), 28);
    drv.kick(&mut dev, CONTROLQ);
    let used = drv.used(CONTROLQ);
    assert_eq!(used, [(0, 28)]);
    assert_ok(&drv.response(w, 24));
    assert_serving(&mut drv, &mut dev);
}

#[test]
fn queue_setups_are_checked() {
    let mut drv = Driver::new();
    let mut dev = device(false);
    let s = drv.setup(CONTROLQ, 16, false);
    let try_enable = |dev: &mut Dev, s: &QueueSetup| dev.enable_queue(s, efd(), efd());
    let err = |dev: &mut Dev, s: QueueSetup, what: &str| {
        let e = try_enable(dev, &s).expect_err(what).to_string();
        assert!(!dev.queue_enabled(s.index), "{what}");
        e
    };
    assert!(err(&mut dev, s, "before memory").contains("no guest memory"));
    dev.set_memory(drv.device_memory()).unwrap();
    for size in [0u16, 3, 100, 512, u16::MAX] {
        err(&mut dev, QueueSetup { size, ..s }, "bad size");
    }
    err(
        &mut dev,
        QueueSetup {
            desc: DESC + 8,
            ..s
        },
        "misaligned desc",
    );
    err(
        &mut dev,
        QueueSetup {
            used: USED + 2,
            ..s
        },
        "misaligned used",
    );
    err(&mut dev, QueueSetup { index: 2, ..s }, "no such queue");
    let e = err(
        &mut dev,
        QueueSetup {
            avail: DESC + 0x80,
            ..s
        },
        "overlap",
    );
    assert!(e.contains("overlaps"), "{e}");
    err(
        &mut dev,
        QueueSetup {
            used: AVAIL + 16,
            ..s
        },
        "overlap",
    );
    err(&mut dev, QueueSetup { desc: 0, ..s }, "outside RAM");
    err(
        &mut dev,
        QueueSetup {
            used: 0x1_0000_0000,
            ..s
        },
        "in the window",
    );
    err(
        &mut dev,
        QueueSetup {
            used: u64::MAX - 3,
            ..s
        },
        "wraps",
    );
    drv.enable(&mut dev, CONTROLQ, 16, false);
    let e = try_enable(&mut dev, &s).expect_err("twice").to_string();
    assert!(e.contains("already enabled"), "{e}");
    assert!(dev.queue_enabled(CONTROLQ), "the first setup stays");
    // Memory cannot change under live queues.
    assert!(dev.set_memory(drv.device_memory()).is_err());
    // Kicks on queues that are not enabled are ignored.
    dev.kick(CURSORQ);
    dev.kick(7);
    assert_serving(&mut drv, &mut dev);
}

#[test]
fn kicks_before_enable_or_memory_are_harmless() {
    let mut dev = device(false);
    dev.kick(CONTROLQ);
    dev.process_queue(CONTROLQ);
    dev.flush();
    // A kick written to the eventfd before the queue is enabled is read on the first kick.
    let mut drv = Driver::new();
    dev.set_memory(drv.device_memory()).unwrap();
    let s = drv.setup(CONTROLQ, 16, false);
    let (kick, call) = (efd(), efd());
    nix::unistd::write(kick.as_fd(), &3u64.to_ne_bytes()).unwrap();
    dev.enable_queue(&s, dup(&kick), dup(&call)).unwrap();
    drv.mem.write_slice(&[0u8; 6], GuestAddress(AVAIL)).unwrap();
    drv.mem.write_slice(&[0u8; 6], GuestAddress(USED)).unwrap();
    drv.rings[0] = Some(Ring {
        size: 16,
        desc: DESC,
        avail: AVAIL,
        used: USED,
        avail_idx: 0,
        used_seen: 0,
        kick,
        call,
    });
    dev.kick(CONTROLQ);
    assert_eq!(dev.stats().kicks, 3);
    assert_eq!(dev.stats().chains, 0);
    assert_serving(&mut drv, &mut dev);
}

#[test]
fn a_broken_avail_index_stops_only_that_queue() {
    let (mut drv, mut dev) = ready(false);
    drv.enable(&mut dev, CURSORQ, 8, false);
    // avail idx 40 ahead of the device's 0 on a queue of 16.
    drv.mem
        .write_obj(40u16.to_le(), GuestAddress(AVAIL + 2))
        .unwrap();
    drv.kick(&mut dev, CONTROLQ);
    assert!(drv.used(CONTROLQ).is_empty());
    assert_eq!(dev.refused(BadChain::AvailIndex), 1);
    drv.kick(&mut dev, CONTROLQ);
    assert_eq!(dev.refused(BadChain::AvailIndex), 1, "ignored until reset");
    let c = drv.alloc(&[0u8; 8], 8);
    drv.desc(CURSORQ, 0, c, 8, 0, 0);
    drv.offer(CURSORQ, 0);
    drv.kick(&mut dev, CURSORQ);
    assert_eq!(drv.used(CURSORQ), [(0, 0)], "the cursor queue still serves");
    // A reset brings the control queue back.
    dev.reset();
    dev.set_memory(drv.device_memory()).unwrap();
    drv.enable(&mut dev, CONTROLQ, 16, false);
    assert_serving(&mut drv, &mut dev);
}

#[test]
fn a_head_in_flight_offered_again_is_dropped() {
    let (mut drv, mut dev) = ready(true);
    assert_ok(&drv.roundtrip(&mut dev, &Command::ctx_create(1, 0, b"")));
    assert_ok(&drv.roundtrip(
        &mut dev,
        &Command::create_blob(
            1,
            3,
            VIRTIO_GPU_BLOB_MEM_HOST3D,
            VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
            0,
            PAGE,
        ),
    ));
    let w = drv.chain(CONTROLQ, 0, &Command::map_blob(1, 3, 0).encode(), 64);
    drv.kick(&mut dev, CONTROLQ);
    assert_eq!(dev.in_flight(), 1);
    assert_eq!(dev.pending(), 1);
    drv.offer(CONTROLQ, 0);
    drv.kick(&mut dev, CONTROLQ);
    assert_eq!(dev.refused(BadChain::HeadInFlight), 1);
    assert!(drv.used(CONTROLQ).is_empty());
    dev.finish_one();
    let used = drv.used(CONTROLQ);
    assert_eq!(used, [(0, RESP_MAP_INFO_SIZE as u32)]);
    assert!(matches!(
        drv.response(w, used[0].1),
        Response::OkMapInfo { .. }
    ));
    assert_serving(&mut drv, &mut dev);
}

#[test]
fn reset_in_the_middle_of_traffic_unmaps_and_drops_everything() {
    let (mut drv, mut dev) = ready(true);
    assert_ok(&drv.roundtrip(&mut dev, &Command::ctx_create(1, 0, b"")));
    for id in [3, 4] {
        assert_ok(&drv.roundtrip(
            &mut dev,
            &Command::create_blob(
                1,
                id,
                VIRTIO_GPU_BLOB_MEM_HOST3D,
                VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
                0,
                PAGE,
            ),
        ));
    }
    let r = drv.roundtrip(&mut dev, &Command::map_blob(1, 3, 0));
    assert!(matches!(r, Response::OkMapInfo { .. }), "{r:?}");
    // MAP of blob 4 still in flight when the driver resets.
    drv.chain(CONTROLQ, 2, &Command::map_blob(1, 4, 8 * PAGE).encode(), 64);
    drv.kick(&mut dev, CONTROLQ);
    assert_eq!(dev.in_flight(), 1);
    let chains = dev.stats().chains;
    dev.reset();
    assert_eq!(dev.in_flight(), 0);
    assert_eq!(dev.pending(), 0);
    assert!(
        drv.used(CONTROLQ).is_empty(),
        "nothing answered after reset"
    );
    let mut unmapped: Vec<_> = dev
        .gpu()
        .placer()
        .calls
        .iter()
        .filter(|c| matches!(c, Call::Unmap(..)))
        .cloned()
        .collect();
    unmapped.sort_by_key(|c| format!("{c:?}"));
    assert_eq!(unmapped, [Call::Unmap(3, 0), Call::Unmap(4, 8 * PAGE)]);
    assert_eq!(dev.gpu().blobs().count(), 0);
    assert_eq!(dev.gpu().contexts().count(), 0);
    assert!(!dev.queue_enabled(CONTROLQ));
    assert!(dev.memory().is_some(), "guest memory survives a reset");
    assert_eq!(dev.stats().chains, chains, "stats survive a reset");
    // Kicks after reset reach no queue.
    dev.kick(CONTROLQ);
    // The device comes back with new queues (and may be given new memory first).
    dev.set_memory(drv.device_memory()).unwrap();
    drv.enable(&mut dev, CONTROLQ, 16, false);
    assert_serving(&mut drv, &mut dev);
    assert_ok(&drv.roundtrip(&mut dev, &Command::ctx_create(1, 0, b"again")));
}

#[test]
fn guest_memory_regions_are_checked() {
    let fd = |size: u64| SharedMemory::new("r", size).unwrap().into_fd();
    let r = |gpa: u64, size: u64, fd_offset: u64| GuestRegion {
        gpa,
        size,
        fd_offset,
    };
    let bad = |regions: &[GuestRegion], fds: Vec<OwnedFd>, what: &str| {
        let e = guest_memory(regions, fds).expect_err(what);
        assert!(
            matches!(e, hostmem_device::Error::GuestMemory(_)),
            "{what}: {e}"
        );
    };
    bad(&[], vec![], "no region");
    bad(&[r(0, 0, 0)], vec![fd(PAGE)], "zero size");
    bad(&[r(0, 100, 0)], vec![fd(PAGE)], "unaligned size");
    bad(&[r(8, PAGE, 0)], vec![fd(PAGE)], "unaligned gpa");
    bad(&[r(0, PAGE, 8)], vec![fd(2 * PAGE)], "unaligned fd offset");
    bad(&[r(0, 2 * PAGE, 0)], vec![fd(PAGE)], "fd too short");
    bad(
        &[r(0, PAGE, PAGE)],
        vec![fd(PAGE)],
        "fd too short at offset",
    );
    bad(
        &[r(0, PAGE, u64::MAX - PAGE + 1)],
        vec![fd(PAGE)],
        "fd offset overflows",
    );
    bad(
        &[r(u64::MAX - PAGE + 1, PAGE, 0)],
        vec![fd(PAGE)],
        "gpa overflows",
    );
    bad(
        &[r(0, 2 * PAGE, 0), r(PAGE, PAGE, 0)],
        vec![fd(2 * PAGE), fd(PAGE)],
        "overlap",
    );
    bad(&[r(0, PAGE, 0)], vec![fd(PAGE), fd(PAGE)], "fd count");
    let five: Vec<_> = (0..5).map(|i| r(i * PAGE, PAGE, 0)).collect();
    bad(&five, (0..5).map(|_| fd(PAGE)).collect(), "too many");
    // Unsorted but disjoint regions, one at an fd offset, are fine.
    let m = guest_memory(
        &[r(0x10_0000, PAGE, PAGE), r(0, PAGE, 0)],
        vec![fd(2 * PAGE), fd(PAGE)],
    )
    .unwrap();
    use vm_memory::GuestMemoryBackend;
    assert_eq!(m.num_regions(), 2);
}

#[test]
fn the_transport_messages_are_answered_with_their_seq() {
    let drv = Driver::new();
    let mut dev = device(false);
    let send = |dev: &mut Dev, msg: &TransportMsg, fds: Vec<OwnedFd>| {
        handle_transport(dev, &serde_json::to_vec(msg).unwrap(), fds)
    };
    let done = |seq: u64, ok: bool| {
        move |r: Option<TransportReply>| match r {
            Some(TransportReply::Done { seq: s, error }) => {
                assert_eq!(s, seq);
                assert_eq!(error.is_none(), ok, "{error:?}");
            }
            other => panic!("expected Done {seq}, got {other:?}"),
        }
    };
    let setup = drv.setup(CONTROLQ, 16, false);
    done(1, false)(send(
        &mut dev,
        &TransportMsg::QueueEnable {
            seq: 1,
            queue: setup,
        },
        vec![efd(), efd()],
    ));
    done(2, false)(send(
        &mut dev,
        &TransportMsg::GuestMemory {
            seq: 2,
            regions: vec![region(RAM_SIZE)],
        },
        vec![],
    ));
    done(3, true)(send(
        &mut dev,
        &TransportMsg::GuestMemory {
            seq: 3,
            regions: vec![region(RAM_SIZE)],
        },
        vec![drv.memfd.try_clone_fd().unwrap()],
    ));
    done(4, false)(send(
        &mut dev,
        &TransportMsg::QueueEnable {
            seq: 4,
            queue: setup,
        },
        vec![efd()],
    ));
    done(5, true)(send(
        &mut dev,
        &TransportMsg::QueueEnable {
            seq: 5,
            queue: setup,
        },
        vec![efd(), efd()],
    ));
    assert!(dev.queue_enabled(CONTROLQ));
    match send(&mut dev, &TransportMsg::Stats { seq: 6 }, vec![]) {
        Some(TransportReply::Stats { seq: 6, stats }) => assert_eq!(stats.chains, 0),
        other => panic!("{other:?}"),
    }
    done(7, true)(send(&mut dev, &TransportMsg::Reset { seq: 7 }, vec![]));
    assert!(!dev.queue_enabled(CONTROLQ));
    assert!(handle_transport(&mut dev, b"{not json", vec![]).is_none());
}

/// Frames a sink saw, with a copy of the 2D resource's bytes.
#[derive(Debug, Default, Clone)]
struct FrameLog(std::sync::Arc<std::sync::Mutex<Vec<Frame>>>);

/// A frame's description and bytes.
type Frame = (FrameInfo, Vec<u8>);

impl FrameSink for FrameLog {
    fn frame(&mut self, info: &FrameInfo, pixels: FramePixels<'_>) {
        if let FramePixels::Bytes(b) = pixels {
            self.0.lock().unwrap().push((*info, b.to_vec()));
        }
    }
}

#[test]
fn a_frame_travels_through_the_queues_and_the_cursor_queue_is_served() {
    let (mut drv, mut dev) = ready(true);
    let log = FrameLog::default();
    dev.gpu_mut().set_frame_sink(Box::new(log.clone()));
    // The framebuffer in the driver's RAM: 32×16 pixels, 2 KiB, in two pieces.
    let (w, h) = (32u32, 16u32);
    let img: Vec<u8> = (0..w * h * 4).map(|i| (i * 7 + 3) as u8).collect();
    let a = drv.alloc(&img[..1000], 1000);
    let b = drv.alloc(&img[1000..], (img.len() - 1000) as u32);
    let fmt = VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM;
    assert_ok(&drv.roundtrip(&mut dev, &Command::create_2d(5, fmt, w, h)));
    let backing = [(a, 1000u32), (b, img.len() as u32 - 1000)];
    assert_ok(&drv.roundtrip(&mut dev, &Command::attach_backing(5, &backing)));
    let full = Rect::new(0, 0, w, h);
    let t = Command::transfer_to_host_2d(5, full, 0).fenced(3);
    match drv.roundtrip(&mut dev, &t) {
        Response::OkNoData { hdr, .. } => assert_eq!(hdr.fence_id, 3, "fence echoed"),
        other => panic!("{other:?}"),
    }
    assert_ok(&drv.roundtrip(&mut dev, &Command::set_scanout(0, 5, full)));
    assert_ok(&drv.roundtrip(&mut dev, &Command::resource_flush(5, full)));
    {
        let frames = log.0.lock().unwrap();
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].1, img, "the exact bytes");
        assert_eq!(
            (frames[0].0.width, frames[0].0.format),
            (w, Format::B8G8R8A8)
        );
    }
    // Backing outside RAM (the window at 4 GiB is not RAM here): refused.
    assert_ok(&drv.roundtrip(&mut dev, &Command::create_2d(6, fmt, 64, 64)));
    let r = drv.roundtrip(&mut dev, &Command::attach_backing(6, &[(1 << 32, 4096)]));
    assert_eq!(r.error(), Some(ErrorCode::InvalidParameter), "{r:?}");
    assert_ok(&drv.roundtrip(&mut dev, &Command::attach_backing(6, &[(a, 4096)])));
    // GET_DISPLAY_INFO fits the 512 writable bytes; GET_EDID's 1056 do not: not run.
    assert!(matches!(
        drv.roundtrip(&mut dev, &Command::get_display_info()),
        Response::OkDisplayInfo { .. }
    ));
    let r = drv.roundtrip(&mut dev, &Command::get_edid(0));
    assert_eq!(r.error(), Some(ErrorCode::Unspec), "{r:?}");
    let wr = drv.chain(CONTROLQ, 0, &Command::get_edid(0).encode(), 1056);
    drv.kick(&mut dev, CONTROLQ);
    let used = drv.used(CONTROLQ);
    assert_eq!(used, [(0, 1056)]);
    assert!(matches!(drv.response(wr, 1056), Response::OkEdid { .. }));

    // The cursor queue: UPDATE_CURSOR of the 64×64 resource, then a MOVE, each returned
    // used with length 0 (no response), then one of the wrong size, refused.
    drv.enable(&mut dev, CURSORQ, 8, false);
    let up = Command::update_cursor(0, (10, 20), 6, (1, 2)).encode();
    let c = drv.alloc(&up, up.len() as u32);
    drv.desc(CURSORQ, 0, c, up.len() as u32, 0, 0);
    drv.offer(CURSORQ, 0);
    let mv = Command::move_cursor(0, (30, 40)).encode();
    let m = drv.alloc(&mv, mv.len() as u32);
    drv.desc(CURSORQ, 1, m, mv.len() as u32, 0, 0);
    drv.offer(CURSORQ, 1);
    drv.kick(&mut dev, CURSORQ);
    assert_eq!(drv.used(CURSORQ), [(0, 0), (1, 0)]);
    let cur = dev.gpu().display().cursor().clone();
    assert_eq!(
        (
            cur.resource_id,
            cur.x,
            cur.y,
            cur.hot_x,
            cur.updates,
            cur.moves
        ),
        (6, 30, 40, 1, 1, 1)
    );
    assert_eq!(cur.image.len(), 64 * 64 * 4);
    let bad = Command::update_cursor(0, (0, 0), 5, (0, 0)).encode();
    let x = drv.alloc(&bad, bad.len() as u32);
    drv.desc(CURSORQ, 2, x, bad.len() as u32, 0, 0);
    drv.offer(CURSORQ, 2);
    drv.kick(&mut dev, CURSORQ);
    assert_eq!(drv.used(CURSORQ), [(2, 0)]);
    assert_eq!(
        dev.gpu().display().cursor().resource_id,
        6,
        "a 32x16 cursor is refused"
    );
    assert_eq!(dev.gpu().display().stats().cursor_refusals, 1);
    // A reset drops the resources and the scanout.
    dev.reset();
    assert_eq!(dev.gpu().display().resources(), 0);
    assert_eq!(dev.gpu().display().scanout_resource(0), None);
}
