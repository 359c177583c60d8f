//! A hostile GPU device: the real device's command handler and mirror, but a placer and a
//! command loop that attack the VMM once, in the way `--scenario` names, and behave
//! otherwise. The real VMM starts it in place of `hostmem-gpu-device` (unjailed: several
//! attacks need a socket, a pipe or `/dev/zero`, which the jail forbids; what is under test
//! is what the VMM accepts, not the jail).
//!
//! Arguments: `--scenario NAME` (see [`Scenario`]), `--attack-on N` (attack the N-th
//! MAP_BLOB, default 1), `--once PATH` (attack only if PATH can be created, so that a
//! restarted device behaves), plus the VMM's `--control-fd 3 --mapping-fd 4 --backend shm`.
//!
//! The attack happens on a guest MAP_BLOB, so that a placement of that resource is really in
//! flight and the VMM's other checks are the ones that must refuse it.

#![forbid(unsafe_code)]

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use anyhow::{bail, Context};
use hostmem_base::shm::SharedMemory;
use hostmem_base::window::Window;
use hostmem_device::gpu::{Gpu, MapRequest, PlaceError, Placer};
use hostmem_ipc::protocol::{frame, handshake, unframe, DeviceMsg, Outcome, RefuseCode, Role};
use hostmem_ipc::protocol::{Hello, VmmMsg};
use hostmem_ipc::{Error as TubeError, Tube};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

const PAGE: u64 = 4096;

/// Every attack the device knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    // The guest side (control queue).
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
}

impl Scenario {
    const ALL: &'static [(&'static str, Scenario)] = &[
        ("none", Scenario::None),
        ("outside-window", Scenario::OutsideWindow),
        ("end-past-window", Scenario::EndPastWindow),
        ("overflow", Scenario::Overflow),
        ("misaligned", Scenario::Misaligned),
        ("zero-length", Scenario::ZeroLength),
        ("overlap", Scenario::Overlap),
        ("exec", Scenario::Exec),
        ("unrequested", Scenario::Unrequested),
        ("socket", Scenario::Socket),
        ("directory", Scenario::Directory),
        ("pipe", Scenario::Pipe),
        ("dev-zero", Scenario::DevZero),
        ("short-memfd", Scenario::ShortMemfd),
        ("unsealed-truncate", Scenario::UnsealedTruncate),
        ("no-fd", Scenario::NoFd),
        ("two-fds", Scenario::TwoFds),
        ("malformed", Scenario::Malformed),
        ("oversized", Scenario::Oversized),
        ("unexpected", Scenario::Unexpected),
        ("flood", Scenario::Flood),
        ("flood-unread", Scenario::FloodUnread),
        ("no-reply", Scenario::NoReply),
        ("unknown-tag", Scenario::UnknownTag),
        ("untagged", Scenario::Untagged),
        ("garbage-response", Scenario::GarbageResponse),
        ("reorder", Scenario::Reorder),
        ("exit-before-hello", Scenario::ExitBeforeHello),
        ("silent", Scenario::Silent),
        ("no-ready", Scenario::NoReady),
        ("bad-version", Scenario::BadVersion),
        ("vmm-role", Scenario::VmmRole),
        ("not-ready", Scenario::NotReady),
        ("exit-after-place", Scenario::ExitAfterPlace),
        ("close-mid-message", Scenario::CloseMidMessage),
        ("fork-hold", Scenario::ForkHold),
    ];

    fn parse(s: &str) -> anyhow::Result<Scenario> {
        Scenario::ALL
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, v)| *v)
            .with_context(|| format!("unknown scenario {s}"))
    }
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
        log::warn!("hostile device: attack {:?}", self.scenario);
        match self.scenario {
            Scenario::None
            | Scenario::ExitBeforeHello
            | Scenario::Silent
            | Scenario::NoReady
            | Scenario::BadVersion
            | Scenario::VmmRole
            | Scenario::NotReady => self.honest(req),
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
                *resource_id = resource_id.wrapping_add(1000);
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

struct Args {
    control_fd: i32,
    mapping_fd: i32,
    backend: String,
    scenario: Scenario,
    attack_on: u32,
    once: Option<std::path::PathBuf>,
    seccomp_fd: Option<i32>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        control_fd: -1,
        mapping_fd: -1,
        backend: "shm".into(),
        scenario: Scenario::None,
        attack_on: 1,
        once: None,
        seccomp_fd: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--control-fd" => a.control_fd = val.parse()?,
            "--mapping-fd" => a.mapping_fd = val.parse()?,
            "--backend" => a.backend = val,
            "--scenario" => a.scenario = Scenario::parse(&val)?,
            "--attack-on" => a.attack_on = val.parse()?,
            "--once" => a.once = Some(val.into()),
            "--seccomp-fd" => a.seccomp_fd = Some(val.parse()?),
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    hostmem_device::process::init_logging();
    let args = parse_args()?;
    // Jailed like the real device: the filter first, before any input is read.
    if let Some(fd) = args.seccomp_fd {
        hostmem_jail::launch::child_install_seccomp(fd)?;
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
    let control = Tube::from_fd(take(args.control_fd)?)?;
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
    let mirror = Window::from_memfd(SharedMemory::from_fd(memfd, size)?)?;
    let backend = hostmem_device::process::make_backend(&args.backend)?;
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
    mapping.send(
        &DeviceMsg::Ready {
            backend: args.backend.clone(),
        },
        &[],
    )?;
    log::info!(
        "hostile device ready: scenario {:?} on map {} ({})",
        args.scenario,
        args.attack_on,
        if armed { "armed" } else { "disarmed" }
    );
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
    let mut held: Option<Vec<u8>> = None;
    loop {
        let (bytes, _fds) = match control.recv_bytes() {
            Ok(m) => m,
            Err(TubeError::Hangup) => return Ok(()),
            Err(e) => {
                log::warn!("control queue: {e}");
                continue;
            }
        };
        let Some((tag, cmd)) = unframe(&bytes) else {
            continue;
        };
        let response = gpu.handle(cmd);
        let out = match gpu.placer_mut().control_attack.take() {
            None => frame(tag, &response),
            Some(ControlAttack::NoReply) => hang(),
            Some(ControlAttack::UnknownTag) => frame(tag.wrapping_add(1_000_000), &response),
            Some(ControlAttack::Untagged) => vec![1, 2, 3],
            Some(ControlAttack::Garbage) => frame(tag, b"\xff\xffnot a virtio-gpu response"),
            Some(ControlAttack::Reorder) => {
                // Held back until the next command's response has gone out.
                held = Some(frame(tag, &response));
                continue;
            }
        };
        control.send_bytes(&out, &[])?;
        if let Some(h) = held.take() {
            control.send_bytes(&h, &[])?;
        }
    }
}
