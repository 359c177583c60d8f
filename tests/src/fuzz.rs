//! Fuzz harnesses: one `fn(&[u8])` per parser that reads hostile input, plus a small seeded
//! mutation engine that runs them on stable Rust (cargo-fuzz/libFuzzer needs nightly).
//!
//! Targets (each must never panic, whatever the bytes):
//! * [`tube`]: the mapping tube's decoder: a real SOCK_SEQPACKET `Tube` receiving the bytes
//!   (with 0–7 fds attached), serde of `DeviceMsg`/`VmmMsg`/`Hello` and of the transport tube's
//!   `TransportMsg`/`TransportReply`.
//! * [`wire`]: the device's virtio-gpu command and response parsers and the shm command
//!   stream of `SUBMIT_3D` (STORE_CHECKSUM included, with its range checks); whatever
//!   parses must encode and parse back to the same value.
//! * [`display`]: the device's display commands run by a real command handler (shm
//!   backend, 1 MiB of guest RAM, a hostmem window beside it): the bytes are a sequence of
//!   commands, each `len: u16 LE` then its bytes, an odd `len` sending it on the cursor
//!   queue; every response must parse, the display's books must balance (its bytes within
//!   its budget, scanouts only showing live resources) and a reset empties it.
//! * [`policy`]: the minijail policy parser, then the BPF compiler and the interpreter on
//!   what compiled.
//! * [`validator`]: the VMM's placement-event validator (`Hostmem`): the bytes are a program
//!   of aim/check/map/unmap/reset operations with real memfds; after each input the window
//!   in `/proc/self/maps` must equal the placement table, and nothing that `check_map`
//!   accepted may break invariant 1.
//!
//! [`Fuzzer`] mutates seed corpora (`tests/corpus/<target>/`) with a seeded generator; the
//! test suite runs it bounded (`tests/tests/fuzz.rs`), and `HOSTMEM_FUZZ_ITERS` /
//! `HOSTMEM_FUZZ_SEED` make long runs.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use hostmem_base::shm::{FileFacts, SharedMemory};
use hostmem_device::backend::shm::{decode_stream, encode_stream};
use hostmem_device::wire::{Command, Response};
use hostmem_ipc::protocol::{DeviceMsg, Hello, TransportMsg, TransportReply, VmmMsg};
use hostmem_ipc::Message;
use hostmem_ipc::Tube;
use hostmem_jail::compiler::{compile, CompileOptions};
use hostmem_jail::interp::{run as bpf_run, SeccompData};
use hostmem_jail::policy::{parse_str, ParseOptions};
use hostmem_vmm::hostmem::{Hostmem, Limits, MapEvent, Mode, DEFAULT_WINDOW_GPA};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

/// A fuzz target.
pub type Target = fn(&[u8]);

/// The targets by name (the name is also the corpus directory).
pub const TARGETS: &[(&str, Target)] = &[
    ("tube", tube),
    ("wire", wire),
    ("display", display),
    ("policy", policy),
    ("validator", validator),
];

/// The mapping tube's decoder, over a real socket pair.
pub fn tube(data: &[u8]) {
    struct Pair {
        tx: Tube,
        rx: Tube,
        fd: SharedMemory,
    }
    thread_local! {
        static PAIR: Pair = {
            let (tx, rx) = Tube::pair().expect("socketpair");
            let fd = SharedMemory::new("fuzz-tube", 4096).expect("memfd");
            Pair { tx, rx, fd }
        };
    }
    // The first byte chooses how many fds travel with the rest (the message).
    let Some((&nfds, body)) = data.split_first() else {
        return;
    };
    let nfds = usize::from(nfds & 7);
    // Pure decoders first: nothing may panic, and what decodes must round-trip.
    if let Ok(m) = serde_json::from_slice::<DeviceMsg>(body) {
        let again: DeviceMsg = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(again, m, "DeviceMsg round trip");
    }
    if let Ok(m) = serde_json::from_slice::<VmmMsg>(body) {
        let again: VmmMsg = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(again, m, "VmmMsg round trip");
    }
    if let Ok(m) = serde_json::from_slice::<TransportMsg>(body) {
        let again: TransportMsg = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(again, m, "TransportMsg round trip");
    }
    if let Ok(m) = serde_json::from_slice::<TransportReply>(body) {
        let again: TransportReply =
            serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(again, m, "TransportReply round trip");
    }
    let _ = serde_json::from_slice::<Hello>(body);
    // The real receive path.
    PAIR.with(|p| {
        let raw: Vec<i32> = vec![p.fd.as_fd().as_raw_fd(); nfds];
        let cmsg = [ControlMessage::ScmRights(&raw)];
        let cmsgs: &[ControlMessage<'_>] = if nfds == 0 { &[] } else { &cmsg };
        if body.is_empty() && nfds == 0 {
            return; // an empty datagram reads as a hang-up; not a message
        }
        sendmsg::<()>(
            p.tx.as_fd().as_raw_fd(),
            &[IoSlice::new(body)],
            cmsgs,
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .expect("send to our own tube");
        match p.rx.recv::<DeviceMsg>() {
            Ok((m, fds)) => assert_eq!(fds.len(), m.fd_count(), "fd count checked"),
            Err(hostmem_ipc::Error::Hangup) => panic!("a message read as a hang-up"),
            Err(_) => {}
        }
    });
}

/// The virtio-gpu command and response parsers and the shm command stream.
pub fn wire(data: &[u8]) {
    if let Ok(c) = Command::parse(data) {
        let bytes = c.encode();
        let again = Command::parse(&bytes).expect("an encoded command parses");
        assert_eq!(again, c, "command round trip");
        let _ = (c.type_(), c.hdr());
    }
    if let Ok(r) = Response::parse(data) {
        let again = Response::parse(&r.encode()).expect("an encoded response parses");
        assert_eq!(again, r, "response round trip");
        let _ = r.error();
    }
    if let Ok(ops) = decode_stream(data) {
        let again = decode_stream(&encode_stream(&ops)).expect("an encoded stream decodes");
        assert_eq!(again, ops, "stream round trip");
        // The range checks (STORE_CHECKSUM's destination included) use checked arithmetic.
        for op in &ops {
            let _ = op.check_within(u64::MAX);
            let _ = op.check_within(4096);
        }
    }
}

/// The display commands through the command handler (see the module docs).
pub fn display(data: &[u8]) {
    use hostmem_device::backend::shm::ShmBackend;
    use hostmem_device::gpu::{Gpu, MapRequest, PlaceError, Placer};
    use hostmem_device::virtio::guest_memory;
    use hostmem_ipc::protocol::GuestRegion;

    const RAM_GPA: u64 = 0x10_0000;
    const RAM: u64 = 1 << 20;
    const WINDOW_GPA: u64 = 1 << 32;
    const BUDGET: u64 = 4 << 20;

    struct NoPlace;
    impl Placer for NoPlace {
        fn map(&mut self, _req: &MapRequest<'_>) -> Result<(), PlaceError> {
            Ok(())
        }
        fn unmap(&mut self, _id: u32, _offset: u64, _len: u64) -> Result<(), PlaceError> {
            Ok(())
        }
        fn window_size(&self) -> u64 {
            16 << 20
        }
    }
    thread_local! {
        static GPU: std::cell::RefCell<Gpu<NoPlace, ShmBackend>> = {
            let memfd = SharedMemory::new("fuzz-display-ram", RAM).expect("memfd");
            let region = GuestRegion { gpa: RAM_GPA, size: RAM, fd_offset: 0 };
            let mem = guest_memory(&[region], vec![memfd.try_clone_fd().expect("dup")])
                .expect("guest memory");
            let mut g = Gpu::new(Box::new(ShmBackend::new()), NoPlace);
            g.set_guest_memory(Some(mem));
            g.set_backing_exclusions(vec![(WINDOW_GPA, 16 << 20)]);
            g.set_display(
                hostmem_device::display::DisplayConfig::parse("64x64,32x32").expect("config"),
            );
            g.display_mut().set_budget(BUDGET);
            std::cell::RefCell::new(g)
        };
    }
    GPU.with(|g| {
        let mut g = g.borrow_mut();
        let mut rest = data;
        while let Some((head, tail)) = rest.split_first_chunk::<2>() {
            let len = usize::from(u16::from_le_bytes(*head));
            let n = len.min(tail.len());
            let (cmd, after) = tail.split_at(n);
            rest = after;
            if len % 2 == 1 {
                g.cursor(cmd);
            } else {
                let out = g.handle(cmd);
                Response::parse(&out).expect("every answer parses");
            }
            let d = g.display();
            assert!(
                d.bytes() <= BUDGET,
                "2D bytes {} past the budget",
                d.bytes()
            );
            for s in 0..d.num_scanouts() {
                if let Some(id) = d.scanout_resource(s) {
                    assert!(
                        d.has_resource(id) || g.blob(id).is_some(),
                        "scanout {s} shows {id}, which is gone"
                    );
                }
            }
        }
        g.reset_all();
        assert_eq!(g.display().bytes(), 0);
        assert_eq!(g.display().resources(), 0);
        assert_eq!(g.blobs().count(), 0);
    });
}

/// The policy parser, compiler and interpreter.
pub fn policy(data: &[u8]) {
    // `@include` reads files relative to the current directory; a fuzzer must not make the
    // parser read /dev/zero or the home directory, so includes are neutralised here (the
    // suite tests them with real files).
    let text = String::from_utf8_lossy(data).replace("@include", "@inclu_e");
    let Ok(p) = parse_str(&text, &ParseOptions::default()) else {
        return;
    };
    for log in [false, true] {
        let opts = CompileOptions {
            parse: ParseOptions::default(),
            log_violations: log,
        };
        let Ok(prog) = compile(&p, &opts) else {
            continue;
        };
        // Run the program on a few syscalls with arguments taken from the input.
        let word = |i: usize| {
            let mut b = [0u8; 8];
            for (k, x) in b.iter_mut().enumerate() {
                *x = data
                    .get((i * 8 + k) % data.len().max(1))
                    .copied()
                    .unwrap_or(0);
            }
            u64::from_le_bytes(b)
        };
        for nr in [0u32, 1, 9, 10, 41, 59, 231, 319, 1000] {
            let args = [word(0), word(1), word(2), word(3), word(4), word(5)];
            let _ = bpf_run(&prog, &SeccompData::x86_64(nr, args));
        }
    }
}

const VPAGE: u64 = 4096;
/// The validator's window: small, so that random offsets often land inside.
const VWINDOW: u64 = 64 * VPAGE;

struct ValidatorState {
    hm: Arc<Hostmem>,
    /// Sealed 16 pages, sealed 1 page, unsealed 16 pages.
    fds: [SharedMemory; 3],
}

fn validator_state() -> &'static std::sync::Mutex<ValidatorState> {
    static S: OnceLock<std::sync::Mutex<ValidatorState>> = OnceLock::new();
    S.get_or_init(|| {
        let hm = Hostmem::new(
            VWINDOW,
            None,
            DEFAULT_WINDOW_GPA,
            Mode::Fixed,
            Limits {
                max_live: 6,
                ..Limits::default()
            },
        )
        .expect("window");
        let sealed = |n: u64| {
            let m = SharedMemory::new("fuzz-blob", n * VPAGE).expect("memfd");
            m.seal_size().expect("seal");
            m
        };
        let unsealed = SharedMemory::new("fuzz-unsealed", 16 * VPAGE).expect("memfd");
        std::sync::Mutex::new(ValidatorState {
            hm: Arc::new(hm),
            fds: [sealed(16), sealed(1), unsealed],
        })
    })
}

/// Reads the input as little-endian fields; past the end, zeros.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn u8(&mut self) -> u8 {
        let (b, rest) = self.0.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
        self.0 = rest;
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    /// A u64 that is often a small page multiple (so that checks past alignment are
    /// reached) and sometimes anything.
    fn off(&mut self) -> u64 {
        match self.u8() % 4 {
            0 => u64::from(self.u8() % 80) * VPAGE,
            1 => u64::from(self.u8() % 20) * VPAGE,
            2 => u64::from(self.u32()),
            _ => u64::from(self.u32()) << 32 | u64::from(self.u32()),
        }
    }
    fn done(&self) -> bool {
        self.0.is_empty()
    }
}

/// A placement event from the input: usually aimed at what the guest asked for (so that
/// the checks past the in-flight one are reached), sometimes anything.
fn event(r: &mut Reader<'_>, res: u32, asked: &HashMap<u32, (u64, u64)>) -> MapEvent {
    let (offset, len) = match (r.u8() % 4, asked.get(&res)) {
        (0..=2, Some(&(o, l))) => (o, l),
        _ => (r.off(), r.off()),
    };
    MapEvent {
        resource_id: res,
        offset,
        len,
        fd_offset: if r.u8().is_multiple_of(4) { r.off() } else { 0 },
        prot: if r.u8().is_multiple_of(4) {
            r.u32() & 0xf
        } else {
            (libc::PROT_READ | libc::PROT_WRITE) as u32
        },
    }
}

/// The VMM's event validator and placement table.
pub fn validator(data: &[u8]) {
    let st = validator_state().lock().unwrap_or_else(|p| p.into_inner());
    let hm = &st.hm;
    // Placements of the previous input stay: deeper states.
    let mut asked: HashMap<u32, (u64, u64)> = HashMap::new();
    let mut r = Reader(data);
    let mut ops = 0;
    while !r.done() && ops < 64 {
        ops += 1;
        let res = u32::from(r.u8() % 8);
        match r.u8() % 8 {
            0 | 1 => {
                let (offset, len) = (r.off(), r.off());
                asked.insert(res, (offset, len));
            }
            2 | 3 => {
                asked.remove(&res);
            }
            4 => {
                // The pure check, with file facts that are usually fine and sometimes not.
                let ev = event(&mut r, res, &asked);
                let facts = if r.u8().is_multiple_of(4) {
                    FileFacts {
                        size: r.off(),
                        mode: if r.u8().is_multiple_of(2) {
                            r.u32()
                        } else {
                            libc::S_IFREG | 0o600
                        },
                        seals: match r.u8() % 3 {
                            0 => None,
                            _ => Some(r.u32() as i32),
                        },
                        ..FileFacts::default()
                    }
                } else {
                    FileFacts {
                        size: 16 * VPAGE,
                        mode: libc::S_IFREG | 0o600,
                        seals: Some(libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL),
                        ..FileFacts::default()
                    }
                };
                if let Ok(prot) = hm.check_map(&ev, &facts) {
                    // Accepted: invariant 1 holds for it.
                    assert!(
                        ev.len > 0
                            && ev.offset.is_multiple_of(VPAGE)
                            && ev.len.is_multiple_of(VPAGE)
                    );
                    assert!(ev.fd_offset.is_multiple_of(VPAGE));
                    assert!(ev.offset.checked_add(ev.len).is_some_and(|e| e <= VWINDOW));
                    assert!(prot.bits() & !((libc::PROT_READ | libc::PROT_WRITE) as u32) == 0);
                    assert!(ev.prot & libc::PROT_EXEC as u32 == 0);
                    assert!(facts.is_regular());
                    assert!(facts.size >= ev.fd_offset + ev.len);
                    assert!(facts.seals.is_some_and(|s| s & libc::F_SEAL_SHRINK != 0));
                    for (o, l) in hm.live_ranges() {
                        assert!(ev.offset + ev.len <= o || o + l <= ev.offset, "overlap");
                    }
                }
            }
            5 | 6 => {
                // A real placement with one of our memfds (or none).
                let ev = event(&mut r, res, &asked);
                let fd = match r.u8() % 8 {
                    0 => Some(&st.fds[1]),
                    1 => Some(&st.fds[2]),
                    2 => None,
                    _ => Some(&st.fds[0]),
                }
                .map(|m| m.as_fd().try_clone_to_owned().expect("dup"));
                let before = hm.live_ranges();
                if hm.handle_map(&ev, fd) == hostmem_ipc::protocol::Outcome::Ok {
                    asked.remove(&res);
                    for (o, l) in before {
                        assert!(ev.offset + ev.len <= o || o + l <= ev.offset, "overlap");
                    }
                }
            }
            _ => {
                if r.u8().is_multiple_of(16) {
                    hm.reset().expect("reset");
                    asked.clear();
                } else {
                    let _ = hm.handle_unmap(res, r.off(), r.off());
                }
            }
        }
    }
    // The window in /proc/self/maps equals the placement table (compared as covered
    // ranges: the kernel merges adjacent placements of the same memfd at contiguous file
    // offsets into one VMA; libFuzzer found that a per-VMA comparison reports such a merge
    // as a mismatch).
    let live = hm.live_ranges();
    for (off, l) in &live {
        assert!(
            off.checked_add(*l).is_some_and(|e| e <= VWINDOW),
            "placement outside the window"
        );
    }
    if let Err(e) = hm.audit() {
        panic!("{e:#}");
    }
    // Start the next input from a clean table now and then, so the live limit does not
    // saturate forever.
    if live.len() >= 6 {
        hm.reset().expect("reset");
    }
}

/// The workspace's seeded generator (splitmix64, `hostmem_base::rng`) over `usize` ranges.
#[derive(Debug, Clone)]
pub struct Rng(hostmem_base::rng::SplitMix64);

impl Rng {
    /// From a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(hostmem_base::rng::SplitMix64::new(seed))
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    /// Uniform in `0..n` (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            self.0.below(n as u64) as usize
        }
    }
}

/// Tokens spliced into inputs: the grammars' keywords, so that mutations reach deeper than
/// the first syntax error.
const DICT: &[&[u8]] = &[
    b"{\"Map\":{",
    b"\"Unmap\"",
    b"\"seq\":",
    b"\"resource_id\":",
    b"\"offset\":",
    b"\"len\":",
    b"\"fd_offset\":",
    b"\"prot\":",
    b"\"map_info\":",
    b"\"Hello\"",
    b"\"Shutdown\"",
    b"18446744073709551615",
    b"-1",
    b"1e999",
    b"null",
    b"\\u0000",
    b"arg0",
    b"arg5",
    b" == ",
    b" & ",
    b" in ",
    b" || ",
    b" && ",
    b"; return ",
    b"kill-process",
    b"trap",
    b"log",
    b"user-notify",
    b"@default ",
    b"@denylist",
    b"@frequency ",
    b"0xffffffffffffffff",
    b"PROT_EXEC|PROT_WRITE",
    b"~(",
    b"{read, write}",
    b"\\\n",
    b"mmap: ",
    b": 1\n",
];

/// A seeded mutation fuzzer over a corpus.
pub struct Fuzzer {
    name: String,
    target: Target,
    corpus: Vec<Vec<u8>>,
    pool: Vec<Vec<u8>>,
    rng: Rng,
    /// Executions so far.
    pub execs: u64,
}

/// A failing input.
#[derive(Debug)]
pub struct Finding {
    /// The target.
    pub target: String,
    /// The execution that failed.
    pub exec: u64,
    /// The input.
    pub input: Vec<u8>,
    /// The panic message.
    pub message: String,
    /// Where the input was saved.
    pub saved: Option<PathBuf>,
}

/// The seed corpus of `name` (every file in `dir/name`), with an empty input at least.
pub fn load_corpus(dir: &Path, name: &str) -> Vec<Vec<u8>> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir.join(name))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.path(), std::fs::read(e.path()).ok()?)))
        .collect();
    v.sort();
    let mut out: Vec<Vec<u8>> = v.into_iter().map(|(_, b)| b).collect();
    out.push(Vec::new());
    out
}

impl Fuzzer {
    /// A fuzzer for `target` over `corpus`, seeded.
    pub fn new(name: &str, target: Target, corpus: Vec<Vec<u8>>, seed: u64) -> Fuzzer {
        Fuzzer {
            name: name.into(),
            target,
            corpus,
            pool: Vec::new(),
            rng: Rng::new(seed),
            execs: 0,
        }
    }

    fn mutate(&mut self, mut d: Vec<u8>) -> Vec<u8> {
        let rounds = 1 + self.rng.below(4);
        for _ in 0..rounds {
            let len = d.len();
            match self.rng.below(10) {
                0 if len > 0 => {
                    let i = self.rng.below(len);
                    d[i] ^= 1 << self.rng.below(8);
                }
                1 if len > 0 => {
                    let i = self.rng.below(len);
                    d[i] = self.rng.next_u64() as u8;
                }
                2 if len > 0 => {
                    // An interesting value over 1, 2, 4 or 8 bytes.
                    let w = [1usize, 2, 4, 8][self.rng.below(4)].min(len);
                    let i = self.rng.below(len - w + 1);
                    let v: u64 = [0, u64::MAX, 0x7f, 0x80, 0xffff, 0x8000_0000, 4096, 4095]
                        [self.rng.below(8)];
                    d[i..i + w].copy_from_slice(&v.to_le_bytes()[..w]);
                }
                3 => {
                    let i = self.rng.below(len + 1);
                    let n = 1 + self.rng.below(16);
                    let bytes: Vec<u8> = (0..n).map(|_| self.rng.next_u64() as u8).collect();
                    d.splice(i..i, bytes);
                }
                4 if len > 0 => {
                    let i = self.rng.below(len);
                    let n = 1 + self.rng.below((len - i).min(32));
                    d.drain(i..i + n);
                }
                5 if len > 0 => {
                    // Duplicate a chunk (repeats, long inputs).
                    let i = self.rng.below(len);
                    let n = 1 + self.rng.below((len - i).min(64));
                    let chunk = d[i..i + n].to_vec();
                    let at = self.rng.below(d.len() + 1);
                    d.splice(at..at, chunk);
                }
                6 => {
                    // Splice with another corpus entry.
                    let other = &self.corpus[self.rng.below(self.corpus.len())];
                    if !other.is_empty() {
                        let a = self.rng.below(other.len());
                        let b = a + self.rng.below(other.len() - a) + 1;
                        let at = self.rng.below(len + 1);
                        d.splice(at..at, other[a..b].iter().copied());
                    }
                }
                7 | 8 => {
                    let tok = DICT[self.rng.below(DICT.len())];
                    let at = self.rng.below(len + 1);
                    d.splice(at..at, tok.iter().copied());
                }
                _ if len > 1 => {
                    // Truncate.
                    d.truncate(self.rng.below(len));
                }
                _ => d.push(self.rng.next_u64() as u8),
            }
        }
        // Keep inputs within what a tube message may be.
        d.truncate(hostmem_ipc::MAX_MESSAGE);
        d
    }

    /// Runs one input; a panic is a finding (the input is saved under `save_dir`).
    pub fn exec(&mut self, input: &[u8], save_dir: Option<&Path>) -> Result<(), Finding> {
        self.execs += 1;
        let target = self.target;
        match catch_unwind(AssertUnwindSafe(|| target(input))) {
            Ok(()) => Ok(()),
            Err(e) => {
                let message = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                let saved = save_dir.and_then(|d| {
                    std::fs::create_dir_all(d).ok()?;
                    let p = d.join(format!("{}-crash-{}", self.name, self.execs));
                    std::fs::write(&p, input).ok()?;
                    Some(p)
                });
                Err(Finding {
                    target: self.name.clone(),
                    exec: self.execs,
                    input: input.to_vec(),
                    message,
                    saved,
                })
            }
        }
    }

    /// Runs every seed, then `iters` mutated inputs. Stops at the first finding.
    pub fn run(&mut self, iters: u64, save_dir: Option<&Path>) -> Result<(), Finding> {
        for seed in self.corpus.clone() {
            self.exec(&seed, save_dir)?;
        }
        for _ in 0..iters {
            let base = if !self.pool.is_empty() && self.rng.below(2) == 0 {
                self.pool[self.rng.below(self.pool.len())].clone()
            } else {
                self.corpus[self.rng.below(self.corpus.len())].clone()
            };
            let input = self.mutate(base);
            self.exec(&input, save_dir)?;
            // Without coverage feedback, keep a rolling pool of mutants so that mutations
            // stack up over time (deeper than 4 edits from a seed).
            if self.rng.below(8) == 0 {
                if self.pool.len() < 256 {
                    self.pool.push(input);
                } else {
                    let i = self.rng.below(256);
                    self.pool[i] = input;
                }
            }
        }
        Ok(())
    }
}
