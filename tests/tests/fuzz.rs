//! Bounded fuzzing in the normal test suite: every harness of `hostmem_tests::fuzz` over its
//! seed corpus (`tests/corpus/<target>/`) plus seeded mutations. Deterministic by default
//! (fixed seed), so a failure reproduces; a finding is saved under
//! `target/fuzz-findings/` and fails the test with the input.
//!
//! Long runs: `HOSTMEM_FUZZ_ITERS=2000000 HOSTMEM_FUZZ_SEED=$RANDOM cargo test --release -p
//! hostmem-tests --test fuzz -- --nocapture` (the seed is printed; `HOSTMEM_FUZZ_SEED=random`
//! picks one from the clock).

use std::path::{Path, PathBuf};
use std::time::Instant;

use hostmem_tests::fuzz::{load_corpus, Fuzzer, TARGETS};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus")
}

fn seed() -> u64 {
    match std::env::var("HOSTMEM_FUZZ_SEED").ok().as_deref() {
        None => 0x5eed_0001,
        Some("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        Some(s) => s.parse().expect("HOSTMEM_FUZZ_SEED: a number or `random`"),
    }
}

/// Default executions per target: enough to matter, the whole file under ~30 s on 2 cores in
/// a debug build.
fn iters(default: u64) -> u64 {
    std::env::var("HOSTMEM_FUZZ_ITERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn fuzz(name: &str, default_iters: u64) {
    let target = TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .unwrap();
    let corpus = load_corpus(&corpus_dir(), name);
    assert!(corpus.len() > 1, "seed corpus of {name} is missing");
    let seed = seed();
    let n = iters(default_iters);
    let save = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("fuzz-findings");
    let mut f = Fuzzer::new(name, target, corpus.clone(), seed);
    let t = Instant::now();
    let res = f.run(n, Some(&save));
    let secs = t.elapsed().as_secs_f64();
    println!(
        "fuzz {name}: {} executions ({} seeds + {n} mutants, seed {seed:#x}) in {secs:.1} s, {:.0}/s",
        f.execs,
        corpus.len(),
        f.execs as f64 / secs.max(1e-9)
    );
    if let Err(finding) = res {
        panic!(
            "fuzz {name}: execution {} panicked: {}\ninput ({} bytes, saved as {:?}): {:?}",
            finding.exec,
            finding.message,
            finding.input.len(),
            finding.saved,
            String::from_utf8_lossy(&finding.input)
        );
    }
}

#[test]
fn fuzz_tube_decoder() {
    fuzz("tube", 100_000);
}

#[test]
fn fuzz_virtio_gpu_wire() {
    fuzz("wire", 600_000);
}

#[test]
fn fuzz_display_commands() {
    fuzz("display", 40_000);
}

#[test]
fn fuzz_policy_parser() {
    fuzz("policy", 100_000);
}

#[test]
fn fuzz_event_validator() {
    fuzz("validator", 20_000);
}

/// Writes the seed corpora (run once with `--ignored` after a protocol change; the files
/// are committed).
#[test]
#[ignore]
fn write_seed_corpora() {
    use hostmem_device::backend::shm::{encode_stream, ShmOp};
    use hostmem_device::wire::{
        Command, CtrlHdr, ErrorCode, Rect, Response, VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
        VIRTIO_GPU_BLOB_MEM_GUEST, VIRTIO_GPU_BLOB_MEM_HOST3D,
    };
    use hostmem_ipc::protocol::{
        DeviceMsg, GuestRegion, Hello, Outcome, QueueSetup, RefuseCode, Role, TransportMsg, VmmMsg,
    };

    let dir = corpus_dir();
    let write = |target: &str, name: &str, bytes: &[u8]| {
        let d = dir.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join(name), bytes).unwrap();
    };
    // tube: first byte = number of fds attached, then the message.
    let msgs: Vec<(&str, u8, Vec<u8>)> = vec![
        (
            "map",
            1,
            serde_json::to_vec(&DeviceMsg::Map {
                seq: 7,
                resource_id: 3,
                offset: 0x10000,
                len: 0x4000,
                fd_offset: 0,
                prot: 3,
                map_info: 1,
            })
            .unwrap(),
        ),
        (
            "unmap",
            0,
            serde_json::to_vec(&DeviceMsg::Unmap {
                seq: 8,
                resource_id: 3,
                offset: 0x10000,
                len: 0x4000,
            })
            .unwrap(),
        ),
        (
            "ready",
            0,
            serde_json::to_vec(&DeviceMsg::Ready {
                backend: "shm".into(),
                num_capsets: 1,
                num_scanouts: 1,
            })
            .unwrap(),
        ),
        (
            "hello",
            0,
            serde_json::to_vec(&DeviceMsg::Hello(Hello::new(Role::Device))).unwrap(),
        ),
        (
            "reply-refused",
            0,
            serde_json::to_vec(&VmmMsg::Reply {
                seq: 9,
                outcome: Outcome::Refused {
                    code: RefuseCode::OutOfMemory,
                    reason: "limit".into(),
                },
            })
            .unwrap(),
        ),
        (
            "hostmem",
            1,
            serde_json::to_vec(&VmmMsg::Hostmem { size: 1 << 28 }).unwrap(),
        ),
        ("shutdown", 0, serde_json::to_vec(&VmmMsg::Shutdown).unwrap()),
        (
            "map-two-fds",
            2,
            br#"{"Map":{"seq":1,"resource_id":1,"offset":0,"len":4096,"fd_offset":0,"prot":7,"map_info":0}}"#.to_vec(),
        ),
        (
            "guest-memory",
            1,
            serde_json::to_vec(&TransportMsg::GuestMemory {
                seq: 1,
                regions: vec![GuestRegion {
                    gpa: 0,
                    size: 0x4000,
                    fd_offset: 0,
                }],
            })
            .unwrap(),
        ),
        (
            "queue-enable",
            2,
            serde_json::to_vec(&TransportMsg::QueueEnable {
                seq: 2,
                queue: QueueSetup {
                    index: 0,
                    size: 256,
                    desc: 0x1000,
                    avail: 0x2000,
                    used: 0x3000,
                    event_idx: true,
                },
            })
            .unwrap(),
        ),
    ];
    for (name, fds, body) in msgs {
        let mut v = vec![fds];
        v.extend(body);
        write("tube", name, &v);
    }
    // wire: commands and responses in their wire layout, and shm streams.
    let cmds: Vec<(&str, Command)> = vec![
        ("ctx-create", Command::ctx_create(1, 0, b"hostmem")),
        ("ctx-destroy", Command::ctx_destroy(1)),
        (
            "create-blob-host3d",
            Command::create_blob(
                1,
                5,
                VIRTIO_GPU_BLOB_MEM_HOST3D,
                VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
                9,
                0x4000,
            ),
        ),
        (
            "create-blob-guest",
            Command::create_blob(1, 6, VIRTIO_GPU_BLOB_MEM_GUEST, 0, 0, 0x1000),
        ),
        ("map-blob", Command::map_blob(1, 5, 0x10000)),
        ("unmap-blob", Command::unmap_blob(1, 5)),
        ("unref", Command::unref(5)),
        (
            "submit-3d",
            Command::submit_3d(
                1,
                encode_stream(&[ShmOp::Fill {
                    resource_id: 5,
                    offset: 0,
                    len: 0x4000,
                    seed: 3,
                }]),
            ),
        ),
        ("capset-info", Command::get_capset_info(0)),
        ("capset", Command::get_capset(4, 0)),
        ("map-blob-fenced", Command::map_blob(1, 5, 0).fenced(77)),
        ("get-display-info", Command::get_display_info()),
        ("ctx-attach-resource", Command::ctx_attach_resource(1, 5)),
        ("ctx-detach-resource", Command::ctx_detach_resource(1, 5)),
        ("create-2d", Command::create_2d(2, 2, 1024, 768)),
        (
            "attach-backing",
            Command::attach_backing(2, &[(0x10_0000, 0x1000), (0x20_0000, 0x2f_f000)]),
        ),
        ("detach-backing", Command::detach_backing(2)),
        (
            "transfer-to-host-2d",
            Command::transfer_to_host_2d(2, Rect::new(8, 4, 16, 8), 4 * 4096 + 32),
        ),
        (
            "set-scanout",
            Command::set_scanout(0, 2, Rect::new(0, 0, 1024, 768)),
        ),
        (
            "set-scanout-blob",
            Command::set_scanout_blob(0, 5, 1, (1024, 768), 4096, 0),
        ),
        (
            "resource-flush",
            Command::resource_flush(2, Rect::new(0, 0, 1024, 768)),
        ),
        ("get-edid", Command::get_edid(0)),
        ("assign-uuid", Command::assign_uuid(2)),
        (
            "update-cursor",
            Command::update_cursor(0, (100, 200), 3, (1, 1)),
        ),
        ("move-cursor", Command::move_cursor(0, (300, 400))),
    ];
    for (name, c) in cmds {
        write("wire", &format!("cmd-{name}"), &c.encode());
    }
    let hdr = CtrlHdr::with_ctx(0x0209, 1);
    write(
        "wire",
        "resp-ok",
        &Response::ok_for(&hdr, b"reply".to_vec()).encode(),
    );
    write(
        "wire",
        "resp-err",
        &Response::error_for(&hdr, ErrorCode::InvalidParameter).encode(),
    );
    // display: sequences of commands, each `len: u16 LE` then its bytes; an odd `len` goes
    // to the cursor queue, so a (56-byte) cursor command gets one pad byte, which the
    // parser ignores as it ignores any tail.
    let frame = |cmds: &[(bool, Command)]| {
        let mut v = Vec::new();
        for (cursor, c) in cmds {
            let mut b = c.encode();
            if *cursor {
                b.push(0);
            }
            v.extend_from_slice(&(b.len() as u16).to_le_bytes());
            v.extend_from_slice(&b);
        }
        v
    };
    let full = Rect::new(0, 0, 64, 64);
    let seqs: Vec<(&str, Vec<(bool, Command)>)> = vec![
        (
            "frame",
            vec![
                (false, Command::create_2d(1, 2, 64, 64)),
                (
                    false,
                    Command::attach_backing(1, &[(0x10_0000, 64 * 64 * 4)]),
                ),
                (false, Command::transfer_to_host_2d(1, full, 0)),
                (false, Command::set_scanout(0, 1, full)),
                (false, Command::resource_flush(1, full)),
                (true, Command::update_cursor(0, (5, 5), 1, (0, 0))),
                (true, Command::move_cursor(1, (9, 9))),
                (false, Command::assign_uuid(1)),
                (false, Command::unref(1)),
            ],
        ),
        (
            "blob-scanout",
            vec![
                (false, Command::ctx_create(1, 0, b"f")),
                (
                    false,
                    Command::create_blob(1, 2, VIRTIO_GPU_BLOB_MEM_HOST3D, 0, 0, 0x10000),
                ),
                (
                    false,
                    Command::set_scanout_blob(1, 2, 2, (32, 32), 128, 4096),
                ),
                (false, Command::resource_flush(2, Rect::new(0, 0, 32, 32))),
                (false, Command::get_edid(1)),
                (false, Command::get_display_info()),
                (false, Command::unref(2)),
            ],
        ),
        (
            "partial-transfer",
            vec![
                (false, Command::create_2d(3, 67, 16, 16)),
                (
                    false,
                    Command::attach_backing(3, &[(0x10_0000, 512), (0x18_0000, 512)]),
                ),
                (
                    false,
                    Command::transfer_to_host_2d(3, Rect::new(2, 3, 4, 5), 3 * 64 + 8),
                ),
                (false, Command::detach_backing(3)),
                (false, Command::transfer_to_host_2d(3, full, 0)),
            ],
        ),
    ];
    for (name, cmds) in seqs {
        write("display", name, &frame(&cmds));
    }
    write(
        "wire",
        "resp-edid",
        &Response::OkEdid {
            hdr: CtrlHdr::new(0x1104),
            edid: hostmem_device::edid::edid(1024, 768, 1).to_vec(),
        }
        .encode(),
    );
    write(
        "wire",
        "resp-resource-uuid",
        &Response::OkResourceUuid {
            hdr: CtrlHdr::new(0x1105),
            uuid: [0x42; 16],
        }
        .encode(),
    );
    write(
        "wire",
        "resp-display-info",
        &Response::OkDisplayInfo {
            hdr: CtrlHdr::new(0x1101),
            modes: Vec::new(),
        }
        .encode(),
    );
    write(
        "wire",
        "stream-store-checksum",
        &encode_stream(&[ShmOp::StoreChecksum {
            resource_id: 1,
            offset: 0,
            len: 4088,
            dst_offset: 4088,
        }]),
    );
    write(
        "wire",
        "stream-fill-checksum",
        &encode_stream(&[
            ShmOp::Fill {
                resource_id: 1,
                offset: 4096,
                len: 8192,
                seed: 1,
            },
            ShmOp::Checksum {
                resource_id: 1,
                offset: 0,
                len: 16384,
            },
        ]),
    );
    // policy: our policies and small snippets of every construct.
    let pol = Path::new(env!("CARGO_MANIFEST_DIR")).join("../jail-policies/x86_64");
    for f in ["common_device.policy", "gpu_device_shm.policy"] {
        let text = std::fs::read_to_string(pol.join(f)).unwrap();
        write("policy", f, text.as_bytes());
    }
    let snippets: &[(&str, &str)] = &[
        ("allow", "read: 1\nwrite: 1\n"),
        (
            "args",
            "mmap: arg2 in ~PROT_EXEC\nmprotect: arg2 & PROT_EXEC == 0 || arg0 == 0\n",
        ),
        (
            "return",
            "openat: return ENOENT\nioctl: arg1 == 0x5401; return ENOTTY\n",
        ),
        (
            "actions",
            "@default log\nkill: kill-process\nptrace: trap\nsocket: user-notify\n",
        ),
        (
            "lists",
            "{read, write, close}: 1\n@frequency ./x.frequency\nfutex: arg1 == 0 && \\\n arg2 != 3\n",
        ),
        ("denylist", "@denylist\nexecve: kill\n"),
        ("consts", "clone: arg0 & (CLONE_THREAD|CLONE_VM) == 0x10100\n"),
    ];
    for (name, text) in snippets {
        write("policy", name, text.as_bytes());
    }
    // validator: op programs (res, op, fields...), see `fuzz::validator`.
    let progs: &[(&str, &[u8])] = &[
        // expect map res 1 at page 4 len 4 pages, then map it with the sealed memfd.
        (
            "map-ok",
            &[1, 0, 0, 4, 0, 4, 1, 5, 0, 4, 0, 4, 0, 0, 3, 0, 0, 0, 0],
        ),
        (
            "map-unmap",
            &[
                1, 0, 0, 4, 0, 4, 1, 5, 0, 4, 0, 4, 0, 0, 3, 0, 0, 0, 0, 1, 2, 1, 7, 1, 0, 4, 0, 4,
            ],
        ),
        (
            "check",
            &[2, 4, 0, 8, 0, 2, 0, 0, 3, 0, 0, 0, 0, 16, 1, 1, 1, 0, 0, 0],
        ),
        (
            "unsealed",
            &[3, 0, 0, 1, 0, 4, 3, 5, 0, 1, 0, 4, 0, 0, 3, 0, 0, 0, 2],
        ),
        ("reset", &[0, 7, 0]),
    ];
    for (name, p) in progs {
        write("validator", name, p);
    }
    // Hand-made programs that reach deep states (kept as files, not generated):
    // `overlap-attempt` places resource 1 at 4 pages, then checks resource 2 asked for at 6
    // pages, overlapping it; `map-then-unmap-asked` maps and unmaps through the guest's path.
}
