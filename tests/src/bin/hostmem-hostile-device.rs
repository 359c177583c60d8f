//! A hostile GPU device: the real device's command handler and mirror, but a placer and a
//! command loop that attack the VMM once, in the way `--scenario` names, and behave
//! otherwise. The real VMM starts it in place of `hostmem-gpu-device` (unjailed: several
//! attacks need a socket, a pipe or `/dev/zero`, which the jail forbids; what is under test
//! is what the VMM accepts, not the jail).
//!
//! Arguments: `--scenario NAME` (see [`Scenario`]), `--attack-on N` (attack the N-th
//! MAP_BLOB, default 1), `--once PATH` (attack only if PATH can be created, so that a
//! restarted device behaves), plus the VMM's `--transport-fd 3 --mapping-fd 4 --backend shm`.
//! Parsed with clap: `--help` lists the flags and every scenario.
//!
//! The attack happens on a guest MAP_BLOB, so that the event looks like a real one and the
//! VMM's field checks are the ones that must refuse it.
//!
//! The virtqueues are the real device's ([`VirtioGpu`]), with one twist for the attacks on
//! the guest side: the device core writes the control queue's used ring into a private
//! shadow region of guest memory that the driver never sees, and this loop copies each used
//! element into the driver's real used ring, tampering with the attacked one (dropped, a
//! head that is not in flight, garbage in its response, held back behind the next one).

#![forbid(unsafe_code)]

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use anyhow::{bail, Context};
use hostmem_base::shm::SharedMemory;
use hostmem_base::window::Window;
use hostmem_device::gpu::{Gpu, MapRequest, PlaceError, Placer};
use hostmem_device::process::handle_transport;
use hostmem_device::virtio::VirtioGpu;
use hostmem_ipc::protocol::{handshake, DeviceMsg, Outcome, RefuseCode, Role};
use hostmem_ipc::protocol::{GuestRegion, QueueSetup, TransportMsg};
use hostmem_ipc::protocol::{Hello, VmmMsg};
use hostmem_ipc::{Error as TubeError, Tube};
use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

const PAGE: u64 = 4096;

/// Every attack the device knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Scenario {
    /// Behave (the restarted device, and the control run).
    None,
    // Bad placements, each with the real blob fd: the VMM must refuse with a reply.
    OutsideWindow,
    EndPastWindow,
    Overflow,
    Misaligned,
    ZeroLength,
    Overlap,
    Exec,
    Unrequested,
    SameResourceTwice,
    // Bad fds with a correct placement: refused with a reply.
    Socket,
    Directory,
    Pipe,
    DevZero,
    ShortMemfd,
    UnsealedTruncate,
    // Messages that are not valid events: a protocol error (no reply), then the good event.
    NoFd,
    TwoFds,
    Malformed,
    Oversized,
    Unexpected,
    // 5,000 bogus events, replies read in batches, then the good event.
    Flood,
    // Bogus events without reading a reply until the tube is full, then silence.
    FloodUnread,
    // The guest side (the control queue's used ring).
    NoReply,
    UnknownTag,
    Untagged,
    GarbageResponse,
    Reorder,
    // The handshake: the VMM must give up on the device quickly and cleanly.
    ExitBeforeHello,
    /// Never says hello.
    Silent,
    /// Says hello, takes the window, never says `Ready`.
    NoReady,
    BadVersion,
    VmmRole,
    NotReady,
    // The device goes away at a bad moment.
    ExitAfterPlace,
    CloseMidMessage,
    ForkHold,
    // Attacker code on the fds the VMM gave it (issue 14): the window memfd, guest RAM, the
    // kick/call eventfds, and blob fds of its own making.
    /// Every operation the policy allows on the shared fds (seals, truncation, writes,
    /// mappings, eventfd writes and reads, closing dups): each must fail or be harmless;
    /// the attack then behaves, and fails the guest's command if one of the operations
    /// that must fail succeeded.
    FdShared,
    /// A write seal on the window memfd (F_SEAL_FUTURE_WRITE): the policy kills it.
    FdWriteSealWindow,
    /// fallocate on the window, even the harmless PUNCH_HOLE|KEEP_SIZE: the device needs no
    /// fallocate, the policy kills it.
    FdFallocate,
    /// memfd_create(MFD_HUGETLB): the policy kills it.
    MemfdHugetlb,
    /// Lies about its own death (issue 22 item 8): writes a forged record claiming `ptrace`
    /// to its SIGSYS report pipe, closes the pipe (so that its real handler's record cannot
    /// follow), then makes a call the policy kills (`fcntl(F_ADD_SEALS,
    /// F_SEAL_FUTURE_WRITE)` on the window). The VMM must name `fcntl`, from the kernel's
    /// record, and show `ptrace` only as the device's claim.
    ForgeSigsys,
    /// Run-time code: write `mov eax, 42; ret` into a memfd, map it READ|EXEC as the loader
    /// maps libraries, call it (the run-time filter must kill the device at the mmap).
    RunCode,
    /// Under a policy that allows every fcntl and fallocate: every seal of every kind and
    /// every fallocate mode on the window and guest RAM; seals must fail (F_SEAL_SEAL).
    FdAnySeal,
    /// A blob with F_SEAL_FUTURE_WRITE for a read/write placement (needs the loose policy).
    WriteSealedBlob,
    /// A read-only placement (a guest write there would fault).
    ReadOnly,
    // Fds the VMM gave the device, sent back as the blob (issue 22): refused by identity.
    /// Guest RAM's memfd as the blob (it would alias guest RAM in the window).
    GuestRamAsBlob,
    /// The window's own memfd as the blob (its background through an alias).
    WindowAsBlob,
    /// Forged `DeviceMsg::Frame`s on the mapping tube, then a normal placement (issue 26):
    /// guest RAM's memfd as the frame, an unsealed memfd, a memfd shorter than the frame,
    /// width 0, and a stride whose end overflows. The VMM refuses each before reading a
    /// byte and counts it (`display.refused`).
    ForgedFrames,
    // Fds that mmap would refuse, refused before it (issue 22): the blob reopened
    // through /proc (unjailed only: the jail has no open).
    /// The blob reopened O_RDONLY.
    ReadOnlyReopen,
    /// The blob reopened O_PATH.
    PathReopen,
    // A device busy across the guest's reset (issue 22 item 2).
    /// On the first Reset, places a blob of its own at window offset 0 (filled with 0xA5:
    /// a placement it does not drop) and never answers: the VMM must not report the reset
    /// done, must kill it and restore the window, and the guest must read
    /// DEVICE_NEEDS_RESET.
    StallReset,
    /// Allocate heap without end.
    Oom,
    /// Allocate memfd pages without end (what blobs are made of).
    OomMemfd,
}

/// Dups of the fds the transport handed the device (guest RAM, kick and call eventfds),
/// kept for the fd attacks.
#[derive(Default)]
struct Held {
    ram: Vec<OwnedFd>,
    kicks: Vec<OwnedFd>,
    calls: Vec<OwnedFd>,
}

static HELD: std::sync::Mutex<Held> = std::sync::Mutex::new(Held {
    ram: Vec::new(),
    kicks: Vec::new(),
    calls: Vec::new(),
});

fn held() -> std::sync::MutexGuard<'static, Held> {
    HELD.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the command loop must do to the response of the attacked command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ControlAttack {
    NoReply,
    UnknownTag,
    Untagged,
    Garbage,
    Reorder,
}

struct HostilePlacer {
    window: Window,
    tube: Tube,
    seq: u64,
    scenario: Scenario,
    attack_on: u32,
    maps: u32,
    armed: bool,
    /// Last placement that the VMM accepted (the overlap attack aims at it).
    last_placed: Option<u64>,
    /// Set by an attack that the command loop carries out on the response.
    control_attack: Option<ControlAttack>,
    /// Where to append the VMM's refusal of the attack (the `--once` file), so that the test
    /// can tell which of the VMM's checks refused it.
    report: Option<std::path::PathBuf>,
}

fn refusal(code: RefuseCode, reason: String) -> PlaceError {
    match code {
        RefuseCode::OutOfMemory => PlaceError::OutOfMemory(reason),
        RefuseCode::InvalidParameter => PlaceError::InvalidParameter(reason),
        RefuseCode::Unspec => PlaceError::Unspec(reason),
    }
}

/// Blocks until the VMM kills us: a device that stopped answering. `park` waits on a futex,
/// which the jail's policy allows (`nanosleep` it does not).
fn hang() -> ! {
    loop {
        std::thread::park();
    }
}

impl HostilePlacer {
    /// [`Scenario::StallReset`]: a placement of our own at offset 0 that the reset does
    /// not drop, then silence.
    fn stall_reset(&mut self) -> anyhow::Result<()> {
        let blob = SharedMemory::new("hostile-stall", PAGE)?;
        hostmem_base::mmap::MemoryMapping::from_fd(
            blob.as_fd(),
            0,
            PAGE as usize,
            hostmem_base::mmap::Prot::READ_WRITE,
        )?
        .write_slice(0, &[0xa5; PAGE as usize])?;
        blob.seal_size()?;
        self.window.place(
            0,
            PAGE,
            blob.as_fd(),
            0,
            hostmem_base::mmap::Prot::READ_WRITE,
        )?;
        self.seq += 1;
        let msg = DeviceMsg::Map {
            seq: self.seq,
            resource_id: 999,
            offset: 0,
            len: PAGE,
            fd_offset: 0,
            prot: hostmem_base::mmap::Prot::READ_WRITE.bits(),
            map_info: 1,
        };
        self.send_msg(&msg, &[blob.as_fd()])
            .and_then(|()| self.reply(self.seq))
            .map_err(|e| anyhow::anyhow!("placing the stall blob: {e:?}"))?;
        log::warn!("hostile device: a blob at offset 0, and the Reset is never answered");
        hang()
    }

    fn map_msg(&mut self, req: &MapRequest<'_>) -> DeviceMsg {
        self.seq += 1;
        DeviceMsg::Map {
            seq: self.seq,
            resource_id: req.resource_id,
            offset: req.offset,
            len: req.len,
            fd_offset: req.blob.fd_offset,
            prot: req.prot.bits(),
            map_info: req.map_info,
        }
    }

    /// Sends raw bytes with any fds (the tube's typed send would refuse wrong fd counts).
    fn send_raw(&self, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), PlaceError> {
        self.tube
            .send_bytes(bytes, fds)
            .map_err(|e| PlaceError::Unspec(format!("send: {e}")))
    }

    fn send_msg(&self, msg: &DeviceMsg, fds: &[BorrowedFd<'_>]) -> Result<(), PlaceError> {
        let bytes = serde_json::to_vec(msg).map_err(|e| PlaceError::Unspec(e.to_string()))?;
        self.send_raw(&bytes, fds)
    }

    /// Waits for the reply to `seq` (the VMM answers in order).
    fn reply(&self, seq: u64) -> Result<(), PlaceError> {
        match self.tube.recv::<VmmMsg>() {
            Ok((VmmMsg::Reply { seq: s, outcome }, _)) if s == seq => match outcome {
                Outcome::Ok => Ok(()),
                Outcome::Refused { code, reason } => Err(refusal(code, reason)),
            },
            Ok((other, _)) => Err(PlaceError::Unspec(format!("unexpected {other:?}"))),
            Err(e) => Err(PlaceError::Unspec(format!("receive: {e}"))),
        }
    }

    /// The well-behaved placement: mirror first, then the event with the blob's fd.
    fn honest(&mut self, req: &MapRequest<'_>) -> Result<(), PlaceError> {
        self.window
            .place(
                req.offset,
                req.len,
                req.blob.fd.as_fd(),
                req.blob.fd_offset,
                req.prot,
            )
            .map_err(|e| PlaceError::OutOfMemory(e.to_string()))?;
        let msg = self.map_msg(req);
        let res = self
            .send_msg(&msg, &[req.blob.fd.as_fd()])
            .and_then(|()| self.reply(self.seq));
        match res {
            Ok(()) => {
                self.last_placed = Some(req.offset);
                Ok(())
            }
            Err(e) => {
                let _ = self.window.restore(req.offset, req.len);
                Err(e)
            }
        }
    }

    /// Sends `msg` with `fd` and reports what the VMM answered. If the VMM accepted a bad
    /// event we say OK to the guest too: the test then sees the acceptance.
    fn bad_event(&mut self, msg: DeviceMsg, fd: BorrowedFd<'_>) -> Result<(), PlaceError> {
        let seq = match &msg {
            DeviceMsg::Map { seq, .. } => *seq,
            _ => self.seq,
        };
        self.send_msg(&msg, &[fd])?;
        self.reply(seq)
    }

    /// [`Scenario::ForgedFrames`]: five frames the VMM must refuse.
    fn forged_frames(&self) -> Result<(), String> {
        use hostmem_ipc::protocol::FrameMsg;
        let e = |e: hostmem_base::Error| e.to_string();
        let good = FrameMsg {
            scanout_id: 0,
            resource_id: 1,
            width: 16,
            height: 16,
            stride: 64,
            format: 2,
            offset: 0,
            rect: [0, 0, 16, 16],
            seq: 1,
            blob: false,
        };
        let ram = held()
            .ram
            .first()
            .ok_or("no guest RAM held")?
            .try_clone()
            .map_err(|e| e.to_string())?;
        let unsealed = SharedMemory::new("hostile-frame-unsealed", PAGE).map_err(e)?;
        let short = SharedMemory::frozen_copy("hostile-frame-short", &[0x5a; 512]).map_err(e)?;
        let frozen = SharedMemory::frozen_copy("hostile-frame", &[0x5a; 1024]).map_err(e)?;
        let forged = [
            (good, ram.as_fd()),
            (good, unsealed.as_fd()),
            (good, short.as_fd()),
            (FrameMsg { width: 0, ..good }, frozen.as_fd()),
            (
                FrameMsg {
                    stride: u32::MAX,
                    offset: u64::MAX - 8,
                    ..good
                },
                frozen.as_fd(),
            ),
        ];
        for (msg, fd) in forged {
            self.send_msg(&DeviceMsg::Frame(msg), &[fd])
                .map_err(|e| format!("{e:?}"))?;
        }
        Ok(())
    }

    fn attack(&mut self, req: &MapRequest<'_>) -> Result<(), PlaceError> {
        let fd = req.blob.fd.as_fd();
        let size = self.window.size();
        let mut msg = self.map_msg(req);
        let DeviceMsg::Map {
            resource_id,
            offset,
            len,
            prot,
            ..
        } = &mut msg
        else {
            return Err(PlaceError::Unspec("unreachable".into()));
        };
        // The control scenario attacks nothing: nothing to warn about.
        let level = if self.scenario == Scenario::None {
            log::Level::Info
        } else {
            log::Level::Warn
        };
        log::log!(level, "hostile device: attack {:?}", self.scenario);
        match self.scenario {
            Scenario::None
            | Scenario::ExitBeforeHello
            | Scenario::Silent
            | Scenario::NoReady
            | Scenario::BadVersion
            | Scenario::VmmRole
            | Scenario::NotReady
            // Its attack is on the Reset, not on a map.
            | Scenario::StallReset => self.honest(req),
            Scenario::OutsideWindow => {
                *offset = size;
                self.bad_event(msg, fd)
            }
            Scenario::EndPastWindow => {
                *offset = size - PAGE;
                self.bad_event(msg, fd)
            }
            Scenario::Overflow => {
                *offset = u64::MAX - PAGE + 1;
                self.bad_event(msg, fd)
            }
            Scenario::Misaligned => {
                *offset += 100;
                self.bad_event(msg, fd)
            }
            Scenario::ZeroLength => {
                *len = 0;
                self.bad_event(msg, fd)
            }
            Scenario::Overlap => {
                *offset = self.last_placed.unwrap_or(0);
                self.bad_event(msg, fd)
            }
            Scenario::Exec => {
                *prot = (libc::PROT_READ | libc::PROT_EXEC) as u32;
                self.bad_event(msg, fd)
            }
            Scenario::Unrequested => {
                // No MAP_BLOB of this resource exists: a valid placement the VMM cannot tell
                // from a requested one. Accepted, the guest sees the blob's bytes.
                *resource_id = resource_id.wrapping_add(1000);
                self.bad_event(msg, fd)
            }
            Scenario::SameResourceTwice => {
                // The live first blob's id again, at the free offset the guest asked for.
                *resource_id = 1;
                self.bad_event(msg, fd)
            }
            Scenario::Socket => {
                let (a, _b) = Tube::pair().map_err(|e| PlaceError::Unspec(e.to_string()))?;
                self.bad_event(msg, a.as_fd())
            }
            Scenario::Directory => {
                let d = std::fs::File::open("/").map_err(|e| PlaceError::Unspec(e.to_string()))?;
                self.bad_event(msg, d.as_fd())
            }
            Scenario::Pipe => {
                let (r, _w) = nix::unistd::pipe().map_err(|e| PlaceError::Unspec(e.to_string()))?;
                self.bad_event(msg, r.as_fd())
            }
            Scenario::DevZero => {
                let z = std::fs::File::open("/dev/zero")
                    .map_err(|e| PlaceError::Unspec(e.to_string()))?;
                self.bad_event(msg, z.as_fd())
            }
            Scenario::ShortMemfd => {
                let short = SharedMemory::new("hostile-short", PAGE)
                    .map_err(|e| PlaceError::Unspec(e.to_string()))?;
                short
                    .seal_size()
                    .map_err(|e| PlaceError::Unspec(e.to_string()))?;
                self.bad_event(msg, short.as_fd())
            }
            Scenario::UnsealedTruncate => {
                // A copy of the blob the VMM could map, then shrink under its mapping: if the
                // VMM accepted it, the guest's next access would fault.
                let m = SharedMemory::new("hostile-unsealed", req.len)
                    .map_err(|e| PlaceError::Unspec(e.to_string()))?;
                let res = self.bad_event(msg, m.as_fd());
                let _ = nix::unistd::ftruncate(m.as_fd(), 0);
                res
            }
            Scenario::NoFd => {
                self.send_msg(&msg, &[])?;
                self.honest(req)
            }
            Scenario::TwoFds => {
                self.send_msg(&msg, &[fd, fd])?;
                self.honest(req)
            }
            Scenario::Malformed => {
                self.send_raw(br#"{"Map": {"seq": nonsense"#, &[fd])?;
                self.honest(req)
            }
            Scenario::Oversized => {
                // Larger than the tube's limit: the VMM sees MSG_TRUNC.
                let big = vec![b' '; 70_000];
                sendmsg::<()>(
                    self.tube.as_fd().as_raw_fd(),
                    &[IoSlice::new(&big)],
                    &[ControlMessage::ScmRights(&[fd.as_raw_fd()])],
                    MsgFlags::empty(),
                    None,
                )
                .map_err(|e| PlaceError::Unspec(e.to_string()))?;
                self.honest(req)
            }
            Scenario::Unexpected => {
                self.send_msg(&DeviceMsg::Hello(Hello::new(Role::Device)), &[])?;
                self.send_msg(
                    &DeviceMsg::Ready {
                        backend: "again".into(),
                        num_capsets: 1,
                        num_scanouts: 1,
                    },
                    &[],
                )?;
                self.honest(req)
            }
            Scenario::Flood => {
                for batch in 0..50u64 {
                    let first = self.seq + 1;
                    for i in 0..100u64 {
                        self.seq += 1;
                        let bogus = DeviceMsg::Unmap {
                            seq: self.seq,
                            resource_id: 0xdead_0000 | (batch * 100 + i) as u32,
                            offset: 0,
                            len: PAGE,
                        };
                        self.send_msg(&bogus, &[])?;
                    }
                    for seq in first..=self.seq {
                        match self.reply(seq) {
                            Err(PlaceError::InvalidParameter(_)) => {}
                            other => {
                                return Err(PlaceError::Unspec(format!(
                                    "flood event {seq} answered {other:?}"
                                )))
                            }
                        }
                    }
                }
                self.honest(req)
            }
            Scenario::FloodUnread => {
                let _ = self.tube.set_send_timeout(Some(Duration::from_secs(2)));
                for i in 0..1_000_000u64 {
                    self.seq += 1;
                    let bogus = DeviceMsg::Unmap {
                        seq: self.seq,
                        resource_id: 0xbad0_0000 | (i as u32 & 0xffff),
                        offset: 0,
                        len: PAGE,
                    };
                    if self.send_msg(&bogus, &[]).is_err() {
                        log::warn!("hostile device: tube full after {i} unread events");
                        break;
                    }
                }
                hang()
            }
            Scenario::NoReply => {
                self.control_attack = Some(ControlAttack::NoReply);
                self.honest(req)
            }
            Scenario::UnknownTag => {
                self.control_attack = Some(ControlAttack::UnknownTag);
                self.honest(req)
            }
            Scenario::Untagged => {
                self.control_attack = Some(ControlAttack::Untagged);
                self.honest(req)
            }
            Scenario::GarbageResponse => {
                self.control_attack = Some(ControlAttack::Garbage);
                self.honest(req)
            }
            Scenario::Reorder => {
                self.control_attack = Some(ControlAttack::Reorder);
                self.honest(req)
            }
            Scenario::ExitAfterPlace => {
                // The event goes out; we die before the VMM's reply (the VMM has placed it,
                // or is placing it).
                self.window
                    .place(req.offset, req.len, fd, req.blob.fd_offset, req.prot)
                    .map_err(|e| PlaceError::Unspec(e.to_string()))?;
                self.send_msg(&msg, &[fd])?;
                std::process::exit(1)
            }
            Scenario::CloseMidMessage => {
                // SOCK_SEQPACKET delivers whole messages, so "mid-message" is the first half of
                // the event's JSON (with its fd), then the tube closes as we exit.
                let bytes =
                    serde_json::to_vec(&msg).map_err(|e| PlaceError::Unspec(e.to_string()))?;
                self.send_raw(&bytes[..bytes.len() / 2], &[fd])?;
                std::process::exit(1)
            }
            Scenario::FdShared => {
                fd_shared(&self.window).map_err(PlaceError::Unspec)?;
                self.honest(req)
            }
            Scenario::FdWriteSealWindow => {
                let r = fcntl(
                    self.window.memfd().as_fd().as_raw_fd(),
                    FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_FUTURE_WRITE),
                );
                // Only reached if the policy let the call through.
                Err(PlaceError::Unspec(format!(
                    "F_SEAL_FUTURE_WRITE on the window: {r:?}"
                )))
            }
            Scenario::ForgeSigsys => {
                forge_sigsys_claim().map_err(PlaceError::Unspec)?;
                let r = fcntl(
                    self.window.memfd().as_fd().as_raw_fd(),
                    FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_FUTURE_WRITE),
                );
                // Only reached if the policy let the call through.
                Err(PlaceError::Unspec(format!(
                    "F_SEAL_FUTURE_WRITE on the window after the forged claim: {r:?}"
                )))
            }
            Scenario::FdFallocate => {
                let r = fallocate(
                    self.window.memfd().as_fd().as_raw_fd(),
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    0,
                    size as i64,
                );
                Err(PlaceError::Unspec(format!("fallocate PUNCH_HOLE: {r:?}")))
            }
            Scenario::MemfdHugetlb => {
                let r = memfd_create(
                    c"hostile-huge",
                    MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_HUGETLB,
                );
                Err(PlaceError::Unspec(format!(
                    "memfd_create(MFD_HUGETLB): {r:?}"
                )))
            }
            Scenario::RunCode => {
                let code = SharedMemory::new("hostile-code", PAGE)
                    .map_err(|e| PlaceError::Unspec(e.to_string()))?;
                let mut page = vec![0xccu8; PAGE as usize];
                page[..6].copy_from_slice(&[0xb8, 42, 0, 0, 0, 0xc3]);
                nix::unistd::write(code.as_fd(), &page)
                    .map_err(|e| PlaceError::Unspec(format!("writing the code: {e}")))?;
                let r = hostmem_base::attack::run_code_from_fd(code.as_fd(), PAGE as usize);
                // Still alive: the filters let new code in (a failed test says so).
                log::error!("hostile device: run-time code from a memfd: {r:?}");
                Err(PlaceError::Unspec(format!("run-time code ran: {r:?}")))
            }
            Scenario::FdAnySeal => {
                fd_any_seal(&self.window).map_err(PlaceError::Unspec)?;
                self.honest(req)
            }
            Scenario::WriteSealedBlob => {
                // A copy of the blob, sealed like a good one and against future writes.
                let m = SharedMemory::new("hostile-write-sealed", req.len)
                    .map_err(|e| PlaceError::Unspec(e.to_string()))?;
                m.seal_size()
                    .map_err(|e| PlaceError::Unspec(e.to_string()))?;
                fcntl(
                    m.as_fd().as_raw_fd(),
                    FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_FUTURE_WRITE),
                )
                .map_err(|e| PlaceError::Unspec(format!("F_SEAL_FUTURE_WRITE: {e}")))?;
                self.bad_event(msg, m.as_fd())
            }
            Scenario::ReadOnly => {
                *prot = libc::PROT_READ as u32;
                self.bad_event(msg, fd)
            }
            Scenario::GuestRamAsBlob => {
                let ram = held()
                    .ram
                    .first()
                    .ok_or_else(|| PlaceError::Unspec("no guest RAM held".into()))?
                    .try_clone()
                    .map_err(|e| PlaceError::Unspec(e.to_string()))?;
                self.bad_event(msg, ram.as_fd())
            }
            Scenario::ForgedFrames => {
                self.forged_frames().map_err(PlaceError::Unspec)?;
                self.honest(req)
            }
            Scenario::WindowAsBlob => {
                let w = self
                    .window
                    .memfd()
                    .try_clone_fd()
                    .map_err(|e| PlaceError::Unspec(e.to_string()))?;
                self.bad_event(msg, w.as_fd())
            }
            Scenario::ReadOnlyReopen | Scenario::PathReopen => {
                use std::os::unix::fs::OpenOptionsExt;
                let flags = if self.scenario == Scenario::PathReopen {
                    libc::O_PATH
                } else {
                    0
                };
                let f = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(flags)
                    .open(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                    .map_err(|e| PlaceError::Unspec(format!("reopen: {e}")))?;
                self.bad_event(msg, f.as_fd())
            }
            Scenario::Oom => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    // Touched, so every page is really charged.
                    hoard.push(vec![0x5a; 16 << 20]);
                    if hoard.len().is_multiple_of(64) {
                        log::warn!("hostile device: {} MiB allocated", hoard.len() * 16);
                    }
                }
            }
            Scenario::OomMemfd => {
                let mut hoard = Vec::new();
                loop {
                    let m = SharedMemory::new("hostile-hoard", 16 << 20)
                        .map_err(|e| PlaceError::Unspec(e.to_string()))?;
                    hostmem_base::mmap::MemoryMapping::from_fd(
                        m.as_fd(),
                        0,
                        16 << 20,
                        hostmem_base::mmap::Prot::READ_WRITE,
                    )
                    .and_then(|map| map.fill(0, 16 << 20, 0x5a))
                    .map_err(|e| PlaceError::Unspec(e.to_string()))?;
                    hoard.push(m);
                }
            }
            Scenario::ForkHold => {
                // A child inherits both tubes and outlives us; we hang. Killing us must be
                // enough for the VMM to recover (its service thread must not wait for an EOF
                // that the child prevents).
                let honest = self.honest(req);
                // dup() clears FD_CLOEXEC, so the holder inherits the tube.
                let held = nix::unistd::dup(self.tube.as_fd().as_raw_fd());
                match std::process::Command::new("/bin/sleep").arg("30").spawn() {
                    Ok(child) => log::warn!(
                        "hostile device: holder pid {} keeps the mapping tube ({held:?}, {honest:?})",
                        child.id()
                    ),
                    Err(e) => log::error!("hostile device: spawning the holder failed: {e}"),
                }
                hang()
            }
        }
    }
}

/// Runs one fd operation of an attack; `must_fail` ones that succeed are a finding.
fn op<T: std::fmt::Debug, E: std::fmt::Debug>(
    findings: &mut Vec<String>,
    what: &str,
    must_fail: bool,
    r: Result<T, E>,
) {
    log::warn!("hostile device: {what}: {r:?}");
    if must_fail && r.is_ok() {
        findings.push(format!("{what} succeeded"));
    }
}

fn findings_to_result(findings: Vec<String>) -> Result<(), String> {
    if findings.is_empty() {
        Ok(())
    } else {
        Err(format!("attack findings: {}", findings.join("; ")))
    }
}

/// The shared memfds: the window and every guest RAM region.
fn shared_memfds(window: &Window) -> Vec<(String, OwnedFd)> {
    let mut v = vec![];
    if let Ok(w) = window.memfd().try_clone_fd() {
        v.push(("window".to_string(), w));
    }
    for (i, r) in held().ram.iter().enumerate() {
        if let Ok(fd) = r.try_clone() {
            v.push((format!("guest RAM {i}"), fd));
        }
    }
    v
}

/// Everything the real shm policy allows on the shared fds (see [`Scenario::FdShared`]).
fn fd_shared(window: &Window) -> Result<(), String> {
    let mut f = Vec::new();
    for (name, fd) in shared_memfds(window) {
        let raw = fd.as_raw_fd();
        let size = nix::sys::stat::fstat(raw).map_or(0, |s| s.st_size);
        let shrink_grow = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW;
        op(
            &mut f,
            &format!("{name}: F_ADD_SEALS(SHRINK|GROW)"),
            true,
            fcntl(raw, FcntlArg::F_ADD_SEALS(shrink_grow)),
        );
        op(
            &mut f,
            &format!("{name}: ftruncate(0)"),
            true,
            nix::unistd::ftruncate(&fd, 0),
        );
        op(
            &mut f,
            &format!("{name}: ftruncate(size / 2)"),
            true,
            nix::unistd::ftruncate(&fd, size / 2),
        );
        op(
            &mut f,
            &format!("{name}: ftruncate(size + 1 page)"),
            true,
            nix::unistd::ftruncate(&fd, size + PAGE as i64),
        );
        op(
            &mut f,
            &format!("{name}: F_GET_SEALS"),
            false,
            fcntl(raw, FcntlArg::F_GET_SEALS),
        );
        op(
            &mut f,
            &format!("{name}: F_DUPFD_CLOEXEC"),
            false,
            fcntl(raw, FcntlArg::F_DUPFD_CLOEXEC(0)).map(|d| {
                let _ = nix::unistd::close(d);
            }),
        );
        if name == "window" {
            // write(2) at offset 0 (under blob 1 in the VMM's window: not visible).
            op(
                &mut f,
                "window: write 8 bytes at 0",
                false,
                nix::unistd::write(&fd, b"hostile!"),
            );
        }
        // Mappings of our own: shared read/write and read-only, touched (read only: guest RAM
        // holds the rings, which the device may write anyway).
        for prot in [
            hostmem_base::mmap::Prot::READ_WRITE,
            hostmem_base::mmap::Prot::READ,
        ] {
            let m = hostmem_base::mmap::MemoryMapping::from_fd(fd.as_fd(), 0, PAGE as usize, prot);
            let read = m.and_then(|m| {
                let mut b = [0u8; 8];
                m.read_slice(0, &mut b).map(|()| b)
            });
            op(
                &mut f,
                &format!("{name}: mmap {prot:?} + read"),
                false,
                read,
            );
        }
    }
    let h = held();
    for (i, k) in h.kicks.iter().enumerate() {
        // A spurious kick: the device wakes itself.
        op(
            &mut f,
            &format!("kick {i}: write 1"),
            false,
            nix::unistd::write(k, &1u64.to_ne_bytes()),
        );
    }
    for (i, c) in h.calls.iter().enumerate() {
        // A spurious interrupt, then stealing it: the driver polls its used ring anyway.
        op(
            &mut f,
            &format!("call {i}: write 1"),
            false,
            nix::unistd::write(c, &1u64.to_ne_bytes()),
        );
        let mut b = [0u8; 8];
        op(
            &mut f,
            &format!("call {i}: read"),
            false,
            nix::unistd::read(c.as_raw_fd(), &mut b),
        );
    }
    drop(h);
    // Closing our dups of everything (the originals the device core holds stay open).
    let mut h = held();
    op(
        &mut f,
        "close the dups",
        false,
        Ok::<usize, ()>(h.kicks.len() + h.calls.len()),
    );
    h.kicks.clear();
    h.calls.clear();
    findings_to_result(f)
}

/// Under a policy allowing every fcntl and fallocate ([`Scenario::FdAnySeal`]).
fn fd_any_seal(window: &Window) -> Result<(), String> {
    let mut f = Vec::new();
    for (name, fd) in shared_memfds(window) {
        let raw = fd.as_raw_fd();
        for seal in [
            SealFlag::F_SEAL_WRITE,
            SealFlag::F_SEAL_FUTURE_WRITE,
            SealFlag::F_SEAL_SEAL,
            SealFlag::F_SEAL_SHRINK,
            SealFlag::F_SEAL_GROW,
            SealFlag::from_bits_retain(0x20), // F_SEAL_EXEC
        ] {
            op(
                &mut f,
                &format!("{name}: F_ADD_SEALS({seal:?})"),
                true,
                fcntl(raw, FcntlArg::F_ADD_SEALS(seal)),
            );
        }
        if name == "window" {
            let size = nix::sys::stat::fstat(raw).map_or(0, |s| s.st_size);
            // Every mode: on shmem only allocation (inside the size: the window is
            // GROW-sealed) and punching work; none can resize or fault the window.
            for (mode, what) in [
                (
                    FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    "PUNCH_HOLE|KEEP_SIZE",
                ),
                (FallocateFlags::empty(), "allocate"),
                (
                    FallocateFlags::FALLOC_FL_KEEP_SIZE,
                    "KEEP_SIZE past the end",
                ),
                (FallocateFlags::FALLOC_FL_COLLAPSE_RANGE, "COLLAPSE_RANGE"),
                (FallocateFlags::FALLOC_FL_INSERT_RANGE, "INSERT_RANGE"),
                (FallocateFlags::FALLOC_FL_ZERO_RANGE, "ZERO_RANGE"),
                (FallocateFlags::FALLOC_FL_UNSHARE_RANGE, "UNSHARE_RANGE"),
            ] {
                let (off, len) = if what.contains("past") {
                    (size, size)
                } else {
                    (0, PAGE as i64)
                };
                let r = fallocate(raw, mode, off, len);
                // Growing it would be a finding; the rest is harmless either way.
                op(
                    &mut f,
                    &format!("window: fallocate {what}"),
                    what.contains("past"),
                    r,
                );
            }
            let now = nix::sys::stat::fstat(raw).map_or(0, |s| s.st_size);
            if now != size {
                f.push(format!("window resized {size} -> {now}"));
            }
        }
    }
    findings_to_result(f)
}

impl Placer for HostilePlacer {
    fn map(&mut self, req: &MapRequest<'_>) -> Result<(), PlaceError> {
        self.maps += 1;
        if self.armed && self.maps == self.attack_on {
            self.armed = false;
            let res = self.attack(req);
            if let (Err(e), Some(p)) = (&res, &self.report) {
                let line = format!("{}\n", e.reason());
                let appended = std::fs::OpenOptions::new()
                    .append(true)
                    .open(p)
                    .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
                if let Err(w) = appended {
                    log::error!(
                        "hostile device: writing the refusal to {}: {w}",
                        p.display()
                    );
                }
            }
            return res;
        }
        self.honest(req)
    }

    fn unmap(&mut self, resource_id: u32, offset: u64, len: u64) -> Result<(), PlaceError> {
        self.window
            .restore(offset, len)
            .map_err(|e| PlaceError::Unspec(e.to_string()))?;
        self.seq += 1;
        let msg = DeviceMsg::Unmap {
            seq: self.seq,
            resource_id,
            offset,
            len,
        };
        self.send_msg(&msg, &[])?;
        self.reply(self.seq)
    }

    fn window_size(&self) -> u64 {
        self.window.size()
    }
}

/// [`Scenario::ForgeSigsys`]: a record claiming `ptrace` (with made-up arguments and ip) on
/// the SIGSYS report pipe the launcher named, then the pipe closed, so that the last (and
/// only) record the VMM reads from it is the lie.
fn forge_sigsys_claim() -> Result<(), String> {
    let fd: i32 = std::env::var(hostmem_jail::launch::SIGSYS_FD_ENV)
        .map_err(|e| format!("no SIGSYS report fd: {e}"))?
        .parse()
        .map_err(|e| format!("SIGSYS report fd: {e}"))?;
    let forged = hostmem_base::sandbox::SigsysRecord {
        nr: libc::SYS_ptrace as i32,
        arch: 0xc000_003e,
        args: [libc::PTRACE_ATTACH as u64, 1, 0, 0, 0, 0],
        ip: 0x4141_4141_4141,
    };
    let dup = hostmem_base::fd::dup_raw(fd).map_err(|e| format!("dup of fd {fd}: {e}"))?;
    let n = nix::unistd::write(&dup, &forged.to_bytes())
        .map_err(|e| format!("writing the forged record: {e}"))?;
    drop(dup);
    // The handler keeps writing to `fd` by number: closed, its true record goes nowhere.
    nix::unistd::close(fd).map_err(|e| format!("closing fd {fd}: {e}"))?;
    log::warn!("hostile device: forged a {n}-byte SIGSYS record claiming ptrace");
    Ok(())
}

/// A hostile GPU device for the VMM's tests (started by the VMM, not by hand).
#[derive(Debug, clap::Parser)]
#[command(name = "hostmem-hostile-device")]
struct Args {
    /// The transport tube's fd (the VMM passes 3).
    #[arg(long)]
    transport_fd: i32,
    /// The mapping tube's fd (the VMM passes 4).
    #[arg(long)]
    mapping_fd: i32,
    /// Backend name, as for `hostmem-gpu-device`.
    #[arg(long, value_enum, default_value_t = hostmem_device::backend::BackendKind::Shm)]
    backend: hostmem_device::backend::BackendKind,
    /// The attack.
    #[arg(long, value_enum, default_value = "none")]
    scenario: Scenario,
    /// Attack the N-th MAP_BLOB.
    #[arg(long, default_value_t = 1)]
    attack_on: u32,
    /// Attack only if this file can be created (a restarted device behaves).
    #[arg(long)]
    once: Option<std::path::PathBuf>,
    /// The seccomp program's fd, when jailed.
    #[arg(long)]
    seccomp_fd: Option<i32>,
    /// The blob memory budget, as for `hostmem-gpu-device`.
    #[arg(long, value_parser = hostmem_base::size::parse_size)]
    blob_budget: Option<u64>,
    /// The window's guest-physical address, as for `hostmem-gpu-device` (the VMM passes it).
    #[arg(long)]
    window_gpa: Option<u64>,
}

fn main() -> anyhow::Result<()> {
    hostmem_device::process::init_logging();
    let args = <Args as clap::Parser>::parse();
    log::debug!("hostile device: window at {:?}", args.window_gpa);
    // Jailed like the real device: the launcher installed the filter before the exec; the
    // SIGSYS reporter first, before any input is read.
    match args.seccomp_fd {
        Some(fd) => hostmem_jail::launch::child_install_seccomp(fd)?,
        None => hostmem_jail::launch::child_install_sigsys_reporter()?,
    }
    // With --once, only the first device of a test attacks; its restarted successor behaves.
    let armed = match &args.once {
        Some(p) => std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(p)
            .is_ok(),
        None => true,
    };
    let take = |fd| -> anyhow::Result<OwnedFd> { Ok(hostmem_base::fd::take_inherited(fd)?) };
    let transport = Tube::from_fd(take(args.transport_fd)?)?;
    let mapping = Tube::from_fd(take(args.mapping_fd)?)?;
    match args.scenario {
        Scenario::ExitBeforeHello => std::process::exit(1),
        Scenario::Silent => hang(),
        Scenario::BadVersion | Scenario::VmmRole => {
            let mut hello = Hello::new(Role::Device);
            if args.scenario == Scenario::BadVersion {
                hello.version = 99;
            } else {
                hello.role = Role::Vmm;
            }
            mapping.send(&DeviceMsg::Hello(hello), &[])?;
            hang()
        }
        _ => {}
    }
    handshake::<DeviceMsg, VmmMsg>(&mapping, Role::Device, Duration::from_secs(20))?;
    mapping.set_recv_timeout(Some(Duration::from_secs(20)))?;
    let (msg, mut fds) = mapping.recv::<VmmMsg>()?;
    let VmmMsg::Hostmem { size } = msg else {
        bail!("expected Hostmem, got {msg:?}");
    };
    let memfd = fds.pop().context("Hostmem without fd")?;
    // The VMM zeroes the background it shares with us after its own restores; our policy
    // has no fallocate.
    let mirror = Window::mirror_of(SharedMemory::from_fd(memfd, size)?)?;
    let backend = hostmem_device::process::make_backend(args.backend)?;
    // The real device's end of start-up: the run-time filter (no new code).
    hostmem_device::process::end_start_up()?;
    if args.scenario == Scenario::NoReady {
        hang()
    }
    if args.scenario == Scenario::NotReady {
        // Anything but Ready: an event before the VMM even serves events.
        let early = DeviceMsg::Unmap {
            seq: 1,
            resource_id: 1,
            offset: 0,
            len: PAGE,
        };
        mapping.send(&early, &[])?;
        hang()
    }
    let num_capsets = u32::try_from(backend.capsets().len()).unwrap_or(u32::MAX);
    mapping.send(
        &DeviceMsg::Ready {
            backend: args.backend.name().to_string(),
            num_capsets,
            num_scanouts: 1,
        },
        &[],
    )?;
    log::info!(
        "hostile device ready: scenario {:?} on map {} ({})",
        args.scenario,
        args.attack_on,
        if armed { "armed" } else { "disarmed" }
    );
    // Frames go to the VMM on the mapping tube, as the real device sends them (only the
    // placements are hostile here).
    let frames = Tube::from_fd(mapping.as_fd().try_clone_to_owned()?)?;
    let placer = HostilePlacer {
        window: mirror,
        tube: mapping,
        seq: 0,
        scenario: args.scenario,
        attack_on: args.attack_on,
        maps: 0,
        armed,
        last_placed: None,
        control_attack: None,
        report: args.once.clone(),
    };
    let mut gpu = Gpu::new(backend, placer);
    gpu.set_blob_budget(args.blob_budget);
    gpu.set_frame_sink(Box::new(hostmem_device::display::TubeSink::new(
        std::sync::Arc::new(frames),
    )));
    let mut dev = VirtioGpu::new(gpu);
    let end = serve(&transport, &mut dev);
    dev.gpu_mut()
        .display_mut()
        .flush_sink(Duration::from_millis(500));
    end
}

/// Guest-physical address of the private shadow used ring (far above any guest RAM).
const SHADOW_GPA: u64 = 1 << 40;
const SHADOW_SIZE: u64 = 4096;
const VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB: u32 = 0x0208;

/// The control queue as the driver set it up, and what was copied of the shadow used ring.
struct Shadow {
    shm: SharedMemory,
    /// The driver's controlq setup (real used ring) and its call eventfd.
    real: Option<(QueueSetup, std::fs::File)>,
    /// Shadow used index copied so far.
    seen: u16,
    /// Next index in the real used ring.
    real_idx: u16,
    /// A used element held back (reorder attack).
    held: Option<(u32, u32)>,
}

/// The device loop of `hostmem_device::process::serve`, with the shadow used ring.
fn serve(transport: &Tube, dev: &mut VirtioGpu<HostilePlacer>) -> anyhow::Result<()> {
    use nix::poll::PollTimeout;
    let mut shadow = Shadow {
        shm: SharedMemory::new("hostile-shadow", SHADOW_SIZE)?,
        real: None,
        seen: 0,
        real_idx: 0,
        held: None,
    };
    shadow.shm.seal_size()?;
    loop {
        let timeout = if dev.in_flight() > 0 || dev.busy() {
            PollTimeout::ZERO
        } else if dev.gpu().display().sink_pending() {
            // A frame waits for room in the tube, as in the real device's loop.
            PollTimeout::from(1u8)
        } else {
            PollTimeout::NONE
        };
        let (transport_ready, kicked) = match dev.wait(transport.as_fd(), timeout) {
            Ok(Some(r)) => r,
            Ok(None) => (false, vec![]),
            Err(e) => bail!("poll: {e}"),
        };
        if dev.gpu().display().sink_pending() {
            dev.gpu_mut().display_mut().retry_sink();
        }
        if dev.busy() {
            dev.process_busy();
        } else if !transport_ready && kicked.is_empty() {
            dev.finish_one();
        }
        for index in kicked {
            dev.kick(index);
        }
        if transport_ready {
            match transport.try_recv_bytes() {
                Ok(Some((bytes, fds))) => {
                    if let Some(reply) = transport_msg(dev, &mut shadow, &bytes, fds)? {
                        transport.send(&reply, &[])?;
                    }
                }
                Ok(None) => {}
                Err(TubeError::Hangup) => return Ok(()),
                Err(e) => log::warn!("transport tube: {e}"),
            }
        }
        forward(dev, &mut shadow)?;
    }
}

/// Hands a transport message to the device core, with the shadow region added to guest
/// memory and the controlq's used ring moved into it.
fn transport_msg(
    dev: &mut VirtioGpu<HostilePlacer>,
    shadow: &mut Shadow,
    bytes: &[u8],
    mut fds: Vec<OwnedFd>,
) -> anyhow::Result<Option<hostmem_ipc::protocol::TransportReply>> {
    let Ok(msg) = serde_json::from_slice::<TransportMsg>(bytes) else {
        return Ok(handle_transport(dev, bytes, fds));
    };
    // Dups for the fd attacks, before the core takes the originals.
    match &msg {
        TransportMsg::GuestMemory { .. } => {
            held().ram = fds.iter().filter_map(|f| f.try_clone().ok()).collect();
        }
        TransportMsg::QueueEnable { .. } if fds.len() == 2 => {
            let mut h = held();
            if let Ok(k) = fds[0].try_clone() {
                h.kicks.push(k);
            }
            if let Ok(c) = fds[1].try_clone() {
                h.calls.push(c);
            }
        }
        _ => {}
    }
    let msg = match msg {
        TransportMsg::GuestMemory { seq, mut regions } => {
            // A fresh shadow ring for fresh memory.
            let zeros = vec![0u8; SHADOW_SIZE as usize];
            hostmem_base::mmap::MemoryMapping::from_fd(
                shadow.shm.as_fd(),
                0,
                SHADOW_SIZE as usize,
                hostmem_base::mmap::Prot::READ_WRITE,
            )?
            .write_slice(0, &zeros)?;
            regions.push(GuestRegion {
                gpa: SHADOW_GPA,
                size: SHADOW_SIZE,
                fd_offset: 0,
            });
            fds.push(shadow.shm.try_clone_fd()?);
            TransportMsg::GuestMemory { seq, regions }
        }
        TransportMsg::QueueEnable { seq, mut queue } if queue.index == 0 && fds.len() == 2 => {
            let real_call = fds.pop().context("call fd")?;
            // The core signals a dup of the driver's call eventfd (a spurious wake-up before
            // we copy: the driver looks again); we signal once more after copying. No
            // eventfd of our own: the jail's policy has no eventfd2.
            fds.push(real_call.try_clone()?);
            shadow.real = Some((queue, std::fs::File::from(real_call)));
            shadow.seen = 0;
            shadow.real_idx = 0;
            shadow.held = None;
            queue.used = SHADOW_GPA;
            TransportMsg::QueueEnable { seq, queue }
        }
        TransportMsg::Reset { seq } => {
            let placer = dev.gpu_mut().placer_mut();
            if placer.scenario == Scenario::StallReset && placer.armed {
                placer.stall_reset()?;
            }
            shadow.real = None;
            TransportMsg::Reset { seq }
        }
        other => other,
    };
    let bytes = serde_json::to_vec(&msg)?;
    Ok(handle_transport(dev, &bytes, fds))
}

/// Copies new shadow used elements into the driver's used ring, carrying out an armed
/// attack on the attacked MAP_BLOB's element, and signals the driver.
fn forward(dev: &mut VirtioGpu<HostilePlacer>, shadow: &mut Shadow) -> anyhow::Result<()> {
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};
    let (Some(mem), Some((setup, call))) = (dev.memory().cloned(), shadow.real.as_ref()) else {
        return Ok(());
    };
    let setup = *setup;
    let size = setup.size.max(1);
    if setup.event_idx {
        // The core asks for kicks in the shadow ring (avail_event, after its last element);
        // the driver reads the real one. Copy it, then look at the avail index once more:
        // an entry the driver published before it saw the copy came without a kick. Taking
        // it moves avail_event again, so copy until the two agree: a stale copy left behind
        // when the loop goes to sleep would cost the driver's next kick.
        let tail = 4 + 8 * u64::from(size);
        loop {
            let asked: u16 = mem.load(GuestAddress(SHADOW_GPA + tail), Ordering::Acquire)?;
            mem.store(asked, GuestAddress(setup.used + tail), Ordering::Release)?;
            std::sync::atomic::fence(Ordering::SeqCst);
            let avail: u16 = mem.load(GuestAddress(setup.avail + 2), Ordering::Acquire)?;
            if avail == asked {
                break;
            }
            dev.process_queue(setup.index);
            let now: u16 = mem.load(GuestAddress(SHADOW_GPA + tail), Ordering::Acquire)?;
            if now == asked {
                // The core did not move it (its queue is broken or busy): the loop's next
                // round serves it.
                break;
            }
        }
    }
    let idx: u16 = mem.load(GuestAddress(SHADOW_GPA + 2), Ordering::Acquire)?;
    let mut out: Vec<(u32, u32)> = vec![];
    while shadow.seen != idx {
        let at = SHADOW_GPA + 4 + u64::from(shadow.seen % size) * 8;
        shadow.seen = shadow.seen.wrapping_add(1);
        let id: u32 = mem.read_obj(GuestAddress(at))?;
        let len: u32 = mem.read_obj(GuestAddress(at + 4))?;
        let attack = match dev.gpu().placer().control_attack {
            Some(a) if is_map_blob(&mem, &setup, id) => {
                dev.gpu_mut().placer_mut().control_attack = None;
                Some(a)
            }
            _ => None,
        };
        match attack {
            None => {
                out.push((id, len));
                if let Some(h) = shadow.held.take() {
                    out.push(h);
                }
            }
            Some(ControlAttack::NoReply) => {
                // A device that stops answering altogether: the VMM must kill it.
                log::warn!("hostile device: head {id} never used; hanging");
                hang()
            }
            Some(ControlAttack::UnknownTag) => out.push((id.wrapping_add(1), len)),
            Some(ControlAttack::Untagged) => out.push((u32::MAX, len)),
            Some(ControlAttack::Garbage) => {
                let garbage = b"\xff\xffnot a virtio-gpu response";
                let desc = setup.desc + u64::from(id) * 16;
                let next: u16 = mem.read_obj(GuestAddress(desc + 14))?;
                let resp: u64 = mem.read_obj(GuestAddress(setup.desc + u64::from(next) * 16))?;
                mem.write_slice(garbage, GuestAddress(resp))?;
                out.push((id, garbage.len() as u32));
            }
            Some(ControlAttack::Reorder) => shadow.held = Some((id, len)),
        }
    }
    if out.is_empty() {
        return Ok(());
    }
    for (id, len) in out {
        let at = setup.used + 4 + u64::from(shadow.real_idx % size) * 8;
        mem.write_obj(id, GuestAddress(at))?;
        mem.write_obj(len, GuestAddress(at + 4))?;
        shadow.real_idx = shadow.real_idx.wrapping_add(1);
    }
    mem.store(
        shadow.real_idx,
        GuestAddress(setup.used + 2),
        Ordering::Release,
    )?;
    std::io::Write::write_all(&mut &*call, &1u64.to_ne_bytes())?;
    Ok(())
}

/// True if the chain at `head` is a RESOURCE_MAP_BLOB request.
fn is_map_blob(mem: &vm_memory::GuestMemoryMmap, setup: &QueueSetup, head: u32) -> bool {
    use vm_memory::{Bytes, GuestAddress};
    let desc = setup.desc + u64::from(head) * 16;
    let Ok(addr) = mem.read_obj::<u64>(GuestAddress(desc)) else {
        return false;
    };
    mem.read_obj::<u32>(GuestAddress(addr))
        .is_ok_and(|t| t == VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB)
}
