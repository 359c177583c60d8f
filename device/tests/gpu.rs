//! The command handler with the shm backend and a recording fake placer: the happy path,
//! every refusal (and that the handler keeps serving after it), and a seeded random-input
//! loop that must never panic.

use std::os::fd::{AsFd, OwnedFd};

use hostmem_base::mmap::{page_size, MemoryMapping, Prot};
use hostmem_device::backend::shm::{
    checksum, decode_stream, encode_stream, pattern_bytes, pattern_qword, ShmBackend, ShmOp,
    SHM_CAPSET_ID, SHM_CAPSET_SIZE,
};
use hostmem_device::gpu::{Gpu, MapRequest, PlaceError, Placer};
use hostmem_device::wire::*;

const WINDOW: u64 = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Call {
    Map {
        resource_id: u32,
        offset: u64,
        len: u64,
        prot: Prot,
        map_info: u32,
        fd_offset: u64,
    },
    Unmap {
        resource_id: u32,
        offset: u64,
        len: u64,
    },
}

#[derive(Debug, Default)]
struct FakePlacer {
    calls: Vec<Call>,
    refuse_map: Option<PlaceError>,
    refuse_unmap: Option<PlaceError>,
    /// Dups of the fds of accepted placements, by resource id.
    fds: Vec<(u32, OwnedFd)>,
}

impl Placer for FakePlacer {
    fn map(&mut self, req: &MapRequest<'_>) -> Result<(), PlaceError> {
        if let Some(e) = self.refuse_map.clone() {
            return Err(e);
        }
        self.calls.push(Call::Map {
            resource_id: req.resource_id,
            offset: req.offset,
            len: req.len,
            prot: req.prot,
            map_info: req.map_info,
            fd_offset: req.blob.fd_offset,
        });
        self.fds
            .push((req.resource_id, req.blob.fd.try_clone().expect("dup")));
        Ok(())
    }
    fn unmap(&mut self, resource_id: u32, offset: u64, len: u64) -> Result<(), PlaceError> {
        if let Some(e) = self.refuse_unmap.clone() {
            return Err(e);
        }
        self.calls.push(Call::Unmap {
            resource_id,
            offset,
            len,
        });
        Ok(())
    }
    fn window_size(&self) -> u64 {
        WINDOW
    }
}

type TestGpu = Gpu<FakePlacer, ShmBackend>;

fn gpu() -> TestGpu {
    Gpu::new(Box::new(ShmBackend::new()), FakePlacer::default())
}

fn send(g: &mut TestGpu, cmd: &Command) -> Response {
    send_raw(g, &cmd.encode())
}

fn send_raw(g: &mut TestGpu, bytes: &[u8]) -> Response {
    let out = g.handle(bytes);
    Response::parse(&out).expect("handler output must parse")
}

fn assert_ok(r: &Response) {
    assert!(
        matches!(r, Response::OkNoData { .. }),
        "expected OK_NODATA, got {r:?}"
    );
}

fn assert_err(r: &Response, code: ErrorCode) {
    assert_eq!(r.error(), Some(code), "response {r:?}");
}

const MAPPABLE: u32 = VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE;

fn ps() -> u64 {
    page_size()
}

/// ctx 1 with a mappable HOST3D blob `id` of `pages` pages.
fn setup(g: &mut TestGpu, id: u32, pages: u64) {
    if !g.contexts().any(|c| c == 1) {
        assert_ok(&send(g, &Command::ctx_create(1, 0, b"test")));
    }
    assert_ok(&send(
        g,
        &Command::create_blob(1, id, VIRTIO_GPU_BLOB_MEM_HOST3D, MAPPABLE, 0, pages * ps()),
    ));
}

/// Still serving: a fresh context/blob/map/unmap/unref cycle works.
fn assert_serving(g: &mut TestGpu) {
    let id = 0xfeed;
    let ctx = 0xcafe;
    assert_ok(&send(g, &Command::ctx_create(ctx, 0, b"probe")));
    assert_ok(&send(
        g,
        &Command::create_blob(ctx, id, VIRTIO_GPU_BLOB_MEM_HOST3D, MAPPABLE, 0, ps()),
    ));
    // The first free page of the window.
    let off = (0..WINDOW / ps())
        .map(|i| i * ps())
        .find(|&o| g.mapped().all(|(_, m, l)| o + ps() <= m || m + l <= o))
        .expect("a free page");
    assert!(matches!(
        send(g, &Command::map_blob(ctx, id, off)),
        Response::OkMapInfo { .. }
    ));
    assert_ok(&send(g, &Command::unmap_blob(ctx, id)));
    assert_ok(&send(g, &Command::unref(id)));
    assert_ok(&send(g, &Command::ctx_destroy(ctx)));
}

#[test]
fn create_map_fill_checksum_unmap_unref() {
    let mut g = gpu();
    let size = 4 * ps();
    setup(&mut g, 7, 4);
    let off = 16 * ps();
    match send(&mut g, &Command::map_blob(1, 7, off)) {
        Response::OkMapInfo { map_info, .. } => assert_eq!(map_info, VIRTIO_GPU_MAP_CACHE_CACHED),
        other => panic!("map: {other:?}"),
    }
    assert_eq!(
        g.placer().calls,
        vec![Call::Map {
            resource_id: 7,
            offset: off,
            len: size,
            prot: Prot::READ_WRITE,
            map_info: VIRTIO_GPU_MAP_CACHE_CACHED,
            fd_offset: 0,
        }]
    );
    assert_eq!(g.mapped().collect::<Vec<_>>(), vec![(7, off, size)]);

    // Fill one page + a bit at an unaligned offset, then checksum it and the whole blob.
    let (f_off, f_len, seed) = (100u64, ps() + 52, 0x5eed);
    let stream = encode_stream(&[
        ShmOp::Fill {
            resource_id: 7,
            offset: f_off,
            len: f_len,
            seed,
        },
        ShmOp::Checksum {
            resource_id: 7,
            offset: f_off,
            len: f_len,
        },
        ShmOp::Checksum {
            resource_id: 7,
            offset: 0,
            len: size,
        },
    ]);
    let reply = match send(&mut g, &Command::submit_3d(1, stream)) {
        Response::OkNoData { reply, .. } => reply,
        other => panic!("submit: {other:?}"),
    };
    let expected = pattern_bytes(seed, f_off, f_len as usize);
    let mut whole = vec![0u8; size as usize];
    whole[f_off as usize..(f_off + f_len) as usize].copy_from_slice(&expected);
    assert_eq!(reply.len(), 16);
    assert_eq!(reply[..8], checksum(&expected).to_le_bytes());
    assert_eq!(reply[8..], checksum(&whole).to_le_bytes());

    // The exported fd shows the pattern: qword i of the blob = pattern_qword(seed, i).
    let fd = &g.placer().fds[0].1;
    let map = MemoryMapping::from_fd(fd.as_fd(), 0, size as usize, Prot::READ).unwrap();
    let mut got = vec![0u8; size as usize];
    map.read_slice(0, &mut got).unwrap();
    assert_eq!(got, whole);
    // Independently of pattern_bytes: every whole qword inside the fill.
    for q in f_off.div_ceil(8)..(f_off + f_len) / 8 {
        let at = q as usize * 8;
        assert_eq!(
            got[at..at + 8],
            pattern_qword(seed, q).to_le_bytes(),
            "qword {q}"
        );
    }

    // WRITE lands too.
    let stream = encode_stream(&[ShmOp::Write {
        resource_id: 7,
        offset: 3,
        data: b"hostmem".to_vec(),
    }]);
    assert_ok(&send(&mut g, &Command::submit_3d(1, stream)));
    let mut w = [0u8; 7];
    map.read_slice(3, &mut w).unwrap();
    assert_eq!(&w, b"hostmem");

    assert_ok(&send(&mut g, &Command::unmap_blob(1, 7)));
    assert_eq!(
        g.placer().calls.last(),
        Some(&Call::Unmap {
            resource_id: 7,
            offset: off,
            len: size
        })
    );
    assert_eq!(g.mapped().count(), 0);
    assert_ok(&send(&mut g, &Command::unref(7)));
    assert!(g.blob(7).is_none());
    assert_eq!(g.backend().blob_count(), 0);
    assert_eq!(g.placer().calls.len(), 2);
}

#[test]
fn unref_of_mapped_blob_unmaps_first() {
    let mut g = gpu();
    setup(&mut g, 3, 2);
    assert!(matches!(
        send(&mut g, &Command::map_blob(1, 3, 0)),
        Response::OkMapInfo { .. }
    ));
    assert_ok(&send(&mut g, &Command::unref(3)));
    assert_eq!(
        g.placer().calls[1],
        Call::Unmap {
            resource_id: 3,
            offset: 0,
            len: 2 * ps()
        }
    );
    assert!(g.blob(3).is_none());
    assert_eq!(g.backend().blob_count(), 0);

    // If that unmap is refused, nothing is unref'd.
    setup(&mut g, 4, 1);
    assert!(matches!(
        send(&mut g, &Command::map_blob(1, 4, 0)),
        Response::OkMapInfo { .. }
    ));
    g.placer_mut().refuse_unmap = Some(PlaceError::Unspec("tube gone".into()));
    assert_err(&send(&mut g, &Command::unref(4)), ErrorCode::Unspec);
    assert_eq!(g.blob(4).unwrap().mapped_at, Some(0));
    assert_eq!(g.backend().blob_count(), 1);
    g.placer_mut().refuse_unmap = None;
    assert_ok(&send(&mut g, &Command::unref(4)));
    assert_serving(&mut g);
}

#[test]
fn bad_creates_are_refused() {
    let mut g = gpu();
    setup(&mut g, 1, 1);
    let host3d = VIRTIO_GPU_BLOB_MEM_HOST3D;
    let cases: Vec<(Command, ErrorCode)> = vec![
        (
            Command::create_blob(1, 0, host3d, MAPPABLE, 0, ps()),
            ErrorCode::InvalidResourceId,
        ),
        (
            Command::create_blob(1, 1, host3d, MAPPABLE, 0, ps()),
            ErrorCode::InvalidResourceId,
        ),
        (
            Command::create_blob(1, 2, host3d, MAPPABLE, 0, 0),
            ErrorCode::InvalidParameter,
        ),
        (
            Command::create_blob(1, 2, host3d, MAPPABLE, 0, ps() + 1),
            ErrorCode::InvalidParameter,
        ),
        (
            Command::create_blob(1, 2, host3d, MAPPABLE, 0, 100),
            ErrorCode::InvalidParameter,
        ),
        (
            Command::create_blob(1, 2, host3d, MAPPABLE, 0, WINDOW + ps()),
            ErrorCode::InvalidParameter,
        ),
        (
            Command::create_blob(1, 2, host3d, MAPPABLE, 0, u64::MAX - ps() + 1),
            ErrorCode::InvalidParameter,
        ),
        (
            Command::create_blob(1, 2, 0, MAPPABLE, 0, ps()),
            ErrorCode::InvalidParameter,
        ),
        (
            Command::create_blob(1, 2, VIRTIO_GPU_BLOB_MEM_HOST3D_GUEST, MAPPABLE, 0, ps()),
            ErrorCode::InvalidParameter,
        ),
        (
            Command::create_blob(1, 2, 99, MAPPABLE, 0, ps()),
            ErrorCode::InvalidParameter,
        ),
        (
            Command::create_blob(1, 2, host3d, 8, 0, ps()),
            ErrorCode::InvalidParameter,
        ),
        (
            Command::create_blob(1, 2, host3d, MAPPABLE | 0x100, 0, ps()),
            ErrorCode::InvalidParameter,
        ),
        // HOST3D needs a context; a named context must exist.
        (
            Command::create_blob(0, 2, host3d, MAPPABLE, 0, ps()),
            ErrorCode::InvalidContextId,
        ),
        (
            Command::create_blob(9, 2, host3d, MAPPABLE, 0, ps()),
            ErrorCode::InvalidContextId,
        ),
        (
            Command::create_blob(9, 2, VIRTIO_GPU_BLOB_MEM_GUEST, MAPPABLE, 0, ps()),
            ErrorCode::InvalidContextId,
        ),
    ];
    for (cmd, code) in &cases {
        assert_err(&send(&mut g, cmd), *code);
    }
    // HOST3D with mem entries.
    let mut with_entries = Command::create_blob(1, 2, host3d, MAPPABLE, 0, ps());
    if let Command::ResourceCreateBlob(c) = &mut with_entries {
        c.entries.push(MemEntry {
            addr: 0x1000,
            length: 4096,
            padding: 0,
        });
    }
    assert_err(&send(&mut g, &with_entries), ErrorCode::InvalidParameter);
    assert_eq!(g.blobs().count(), 1);
    assert_eq!(g.backend().blob_count(), 1);

    // GUEST blobs: entries are ignored, ctx 0 is fine, all flags are fine.
    let mut guest = Command::create_blob(
        0,
        2,
        VIRTIO_GPU_BLOB_MEM_GUEST,
        VIRTIO_GPU_BLOB_FLAGS_ALL,
        0,
        ps(),
    );
    if let Command::ResourceCreateBlob(c) = &mut guest {
        c.entries = vec![MemEntry::default(); 3];
    }
    assert_ok(&send(&mut g, &guest));
    assert_eq!(g.blob(2).unwrap().ctx_id, 0);
    // The whole window is the largest blob.
    assert_ok(&send(
        &mut g,
        &Command::create_blob(1, 3, host3d, MAPPABLE, 0, WINDOW),
    ));
    assert_serving(&mut g);
}

#[test]
fn nr_entries_beyond_the_message_is_refused() {
    let mut g = gpu();
    let mut b = Command::create_blob(0, 5, VIRTIO_GPU_BLOB_MEM_GUEST, MAPPABLE, 0, ps()).encode();
    for n in [1u32, 2, 1000, u32::MAX] {
        b[36..40].copy_from_slice(&n.to_le_bytes());
        assert_err(&send_raw(&mut g, &b), ErrorCode::InvalidParameter);
    }
    // Exactly as many as there are: fine.
    b[36..40].copy_from_slice(&2u32.to_le_bytes());
    b.extend_from_slice(&[0u8; 32]);
    assert_ok(&send_raw(&mut g, &b));
    assert!(g.blob(5).is_some());
}

#[test]
fn bad_maps_are_refused() {
    let mut g = gpu();
    setup(&mut g, 1, 2);
    assert_ok(&send(
        &mut g,
        &Command::create_blob(1, 2, VIRTIO_GPU_BLOB_MEM_HOST3D, 0, 0, ps()),
    ));
    let cases: Vec<(Command, ErrorCode)> = vec![
        (Command::map_blob(1, 99, 0), ErrorCode::InvalidResourceId),
        (Command::map_blob(1, 0, 0), ErrorCode::InvalidResourceId),
        // Not MAPPABLE.
        (Command::map_blob(1, 2, 0), ErrorCode::InvalidParameter),
        (Command::map_blob(1, 1, 1), ErrorCode::InvalidParameter),
        (
            Command::map_blob(1, 1, ps() / 2),
            ErrorCode::InvalidParameter,
        ),
        // Ends one page past the window.
        (
            Command::map_blob(1, 1, WINDOW - ps()),
            ErrorCode::InvalidParameter,
        ),
        (Command::map_blob(1, 1, WINDOW), ErrorCode::InvalidParameter),
        // offset + size overflows u64.
        (
            Command::map_blob(1, 1, u64::MAX - ps() + 1),
            ErrorCode::InvalidParameter,
        ),
        (
            Command::map_blob(1, 1, (u64::MAX / ps()) * ps()),
            ErrorCode::InvalidParameter,
        ),
    ];
    for (cmd, code) in &cases {
        assert_err(&send(&mut g, cmd), *code);
    }
    assert!(
        g.placer().calls.is_empty(),
        "no refused map reached the placer"
    );

    // The last two pages of the window: fine.
    assert!(matches!(
        send(&mut g, &Command::map_blob(1, 1, WINDOW - 2 * ps())),
        Response::OkMapInfo { .. }
    ));
    // Double map, at the same or another offset.
    assert_err(
        &send(&mut g, &Command::map_blob(1, 1, WINDOW - 2 * ps())),
        ErrorCode::InvalidParameter,
    );
    assert_err(
        &send(&mut g, &Command::map_blob(1, 1, 0)),
        ErrorCode::InvalidParameter,
    );
    // Overlap with a live placement.
    setup(&mut g, 3, 2);
    assert_err(
        &send(&mut g, &Command::map_blob(1, 3, WINDOW - 3 * ps())),
        ErrorCode::InvalidParameter,
    );
    assert!(matches!(
        send(&mut g, &Command::map_blob(1, 3, WINDOW - 4 * ps())),
        Response::OkMapInfo { .. }
    ));
    assert_eq!(g.placer().calls.len(), 2);
    assert_serving(&mut g);
}

#[test]
fn unmap_and_unref_refusals() {
    let mut g = gpu();
    setup(&mut g, 1, 1);
    assert_err(
        &send(&mut g, &Command::unmap_blob(1, 1)),
        ErrorCode::InvalidParameter,
    );
    assert_err(
        &send(&mut g, &Command::unmap_blob(1, 2)),
        ErrorCode::InvalidResourceId,
    );
    assert_err(
        &send(&mut g, &Command::unref(2)),
        ErrorCode::InvalidResourceId,
    );
    assert_err(
        &send(&mut g, &Command::unref(0)),
        ErrorCode::InvalidResourceId,
    );
    assert_ok(&send(&mut g, &Command::unref(1)));
    assert_err(
        &send(&mut g, &Command::unref(1)),
        ErrorCode::InvalidResourceId,
    );
    assert!(g.placer().calls.is_empty());
    // A refused unmap keeps the blob mapped.
    setup(&mut g, 5, 1);
    assert!(matches!(
        send(&mut g, &Command::map_blob(1, 5, 0)),
        Response::OkMapInfo { .. }
    ));
    g.placer_mut().refuse_unmap = Some(PlaceError::OutOfMemory("no VMAs".into()));
    assert_err(
        &send(&mut g, &Command::unmap_blob(1, 5)),
        ErrorCode::OutOfMemory,
    );
    assert_eq!(g.mapped().collect::<Vec<_>>(), vec![(5, 0, ps())]);
    g.placer_mut().refuse_unmap = None;
    assert_ok(&send(&mut g, &Command::unmap_blob(1, 5)));
    assert_serving(&mut g);
}

#[test]
fn placer_refusal_maps_to_error_and_changes_nothing() {
    let mut g = gpu();
    setup(&mut g, 1, 1);
    for (e, code) in [
        (
            PlaceError::OutOfMemory("headroom".into()),
            ErrorCode::OutOfMemory,
        ),
        (
            PlaceError::InvalidParameter("overlap".into()),
            ErrorCode::InvalidParameter,
        ),
        (PlaceError::Unspec("tube".into()), ErrorCode::Unspec),
    ] {
        g.placer_mut().refuse_map = Some(e);
        assert_err(&send(&mut g, &Command::map_blob(1, 1, 0)), code);
        assert_eq!(g.mapped().count(), 0);
        assert_eq!(g.blob(1).unwrap().mapped_at, None);
    }
    assert!(g.placer().calls.is_empty());
    g.placer_mut().refuse_map = None;
    assert!(matches!(
        send(&mut g, &Command::map_blob(1, 1, 0)),
        Response::OkMapInfo { .. }
    ));
    assert_eq!(g.mapped().count(), 1);
}

#[test]
fn truncated_commands_of_every_type() {
    let mut g = gpu();
    let cmds = [
        Command::create_blob(1, 1, VIRTIO_GPU_BLOB_MEM_HOST3D, MAPPABLE, 0, ps()),
        Command::map_blob(1, 1, 0),
        Command::unmap_blob(1, 1),
        Command::unref(1),
        Command::ctx_create(1, 0, b"name"),
        Command::submit_3d(1, vec![]),
        Command::get_capset_info(0),
        Command::get_capset(SHM_CAPSET_ID, 1),
    ];
    for cmd in &cmds {
        let full = cmd.encode();
        for len in 0..full.len() {
            let r = send_raw(&mut g, &full[..len]);
            assert_err(&r, ErrorCode::Unspec);
            if len >= CTRL_HDR_SIZE {
                assert_eq!(r.hdr().ctx_id, cmd.hdr().ctx_id);
            }
        }
    }
    // Nothing was created by any of them.
    assert_eq!(g.blobs().count(), 0);
    assert_eq!(g.contexts().count(), 0);
    assert_serving(&mut g);
}

#[test]
fn unknown_and_unsupported_types() {
    let mut g = gpu();
    for t in [
        0u32,
        0x010e,
        // A cursor command belongs on the cursor queue.
        0x0300,
        0x0301,
        0xdead,
        VIRTIO_GPU_RESP_OK_NODATA,
        u32::MAX,
    ] {
        let mut b = Vec::new();
        CtrlHdr::new(t).encode_into(&mut b);
        b.extend_from_slice(&[0u8; 64]);
        assert_err(&send_raw(&mut g, &b), ErrorCode::Unspec);
    }
    assert_serving(&mut g);
}

#[test]
fn submit_3d_refusals() {
    let mut g = gpu();
    setup(&mut g, 1, 1);
    assert_ok(&send(&mut g, &Command::ctx_create(2, 0, b"other")));
    assert_ok(&send(
        &mut g,
        &Command::create_blob(2, 2, VIRTIO_GPU_BLOB_MEM_HOST3D, MAPPABLE, 0, ps()),
    ));
    let ck_stream = || {
        encode_stream(&[ShmOp::Checksum {
            resource_id: 1,
            offset: 0,
            len: ps(),
        }])
    };
    let sum = |g: &mut TestGpu| match send(g, &Command::submit_3d(1, ck_stream())) {
        Response::OkNoData { reply, .. } => reply,
        other => panic!("{other:?}"),
    };
    let before = sum(&mut g);
    assert_eq!(before, checksum(&vec![0u8; ps() as usize]).to_le_bytes());

    let fill = ShmOp::Fill {
        resource_id: 1,
        offset: 0,
        len: ps(),
        seed: 1,
    };
    let bad_streams: Vec<Vec<u8>> = vec![
        // Unknown op.
        {
            let mut s = encode_stream(std::slice::from_ref(&fill));
            s[0] = 77;
            s
        },
        // Truncated head / FILL seed.
        encode_stream(std::slice::from_ref(&fill))[..20].to_vec(),
        encode_stream(std::slice::from_ref(&fill))[..28].to_vec(),
        // WRITE longer than the bytes that follow.
        {
            let mut s = encode_stream(&[ShmOp::Write {
                resource_id: 1,
                offset: 0,
                data: vec![1; 16],
            }]);
            s.truncate(s.len() - 1);
            s
        },
        {
            let mut s = encode_stream(&[ShmOp::Write {
                resource_id: 1,
                offset: 0,
                data: vec![],
            }]);
            s[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
            s
        },
        // Unknown resource, another context's resource.
        encode_stream(&[ShmOp::Checksum {
            resource_id: 9,
            offset: 0,
            len: 1,
        }]),
        encode_stream(&[ShmOp::Checksum {
            resource_id: 2,
            offset: 0,
            len: 1,
        }]),
        // Ranges past the blob, overflowing.
        encode_stream(&[ShmOp::Checksum {
            resource_id: 1,
            offset: 0,
            len: ps() + 1,
        }]),
        encode_stream(&[ShmOp::Fill {
            resource_id: 1,
            offset: ps(),
            len: 1,
            seed: 0,
        }]),
        encode_stream(&[ShmOp::Fill {
            resource_id: 1,
            offset: u64::MAX,
            len: 2,
            seed: 0,
        }]),
        encode_stream(&[ShmOp::Write {
            resource_id: 1,
            offset: u64::MAX - 1,
            data: vec![1, 2, 3],
        }]),
        // A good FILL followed by a bad op: the whole stream is refused, nothing written.
        encode_stream(&[
            fill.clone(),
            ShmOp::Checksum {
                resource_id: 1,
                offset: 1,
                len: ps(),
            },
        ]),
    ];
    for s in bad_streams {
        assert_err(
            &send(&mut g, &Command::submit_3d(1, s.clone())),
            ErrorCode::InvalidParameter,
        );
    }
    assert_eq!(sum(&mut g), before, "refused streams wrote nothing");

    // size field larger than the payload.
    let mut b = Command::submit_3d(1, encode_stream(std::slice::from_ref(&fill))).encode();
    let size = u32::from_le_bytes(b[24..28].try_into().unwrap());
    b[24..28].copy_from_slice(&(size + 1).to_le_bytes());
    assert_err(&send_raw(&mut g, &b), ErrorCode::InvalidParameter);
    b[24..28].copy_from_slice(&u32::MAX.to_le_bytes());
    assert_err(&send_raw(&mut g, &b), ErrorCode::InvalidParameter);
    // A `size` smaller than the payload cuts the stream there (here: inside a FILL).
    b[24..28].copy_from_slice(&20u32.to_le_bytes());
    assert_err(&send_raw(&mut g, &b), ErrorCode::InvalidParameter);
    // Bytes after `size` are not part of the stream.
    let mut c = Command::submit_3d(1, ck_stream()).encode();
    c.extend_from_slice(&[0xff; 40]);
    match send_raw(&mut g, &c) {
        Response::OkNoData { reply, .. } => assert_eq!(reply, before),
        other => panic!("{other:?}"),
    }

    // Unknown / zero context.
    for ctx in [0, 3] {
        assert_err(
            &send(
                &mut g,
                &Command::submit_3d(ctx, encode_stream(std::slice::from_ref(&fill))),
            ),
            ErrorCode::InvalidContextId,
        );
    }
    // Empty stream: OK, empty reply.
    assert_eq!(
        send(&mut g, &Command::submit_3d(1, vec![])),
        Response::ok_for(&CtrlHdr::with_ctx(VIRTIO_GPU_CMD_SUBMIT_3D, 1), vec![])
    );
    assert_eq!(sum(&mut g), before);
    assert_serving(&mut g);
}

#[test]
fn contexts() {
    let mut g = gpu();
    assert_err(
        &send(&mut g, &Command::ctx_create(0, 0, b"")),
        ErrorCode::InvalidContextId,
    );
    assert_ok(&send(&mut g, &Command::ctx_create(1, 0, b"")));
    assert_err(
        &send(&mut g, &Command::ctx_create(1, 0, b"")),
        ErrorCode::InvalidContextId,
    );
    assert_err(
        &send(
            &mut g,
            &Command::ctx_create(2, VIRTIO_GPU_CAPSET_VENUS, b""),
        ),
        ErrorCode::InvalidParameter,
    );
    assert_ok(&send(
        &mut g,
        &Command::ctx_create(2, SHM_CAPSET_ID, &[b'x'; 64]),
    ));
    assert_err(
        &send(&mut g, &Command::ctx_destroy(3)),
        ErrorCode::InvalidContextId,
    );
    assert_err(
        &send(&mut g, &Command::ctx_destroy(0)),
        ErrorCode::InvalidContextId,
    );
    // nlen > 64.
    let mut b = Command::ctx_create(4, 0, b"abc").encode();
    b[24..28].copy_from_slice(&65u32.to_le_bytes());
    assert_err(&send_raw(&mut g, &b), ErrorCode::InvalidParameter);
    assert_eq!(g.contexts().collect::<Vec<_>>(), vec![1, 2]);

    // A global (ctx 0) GUEST blob is reachable from every context; a context's blob only
    // from its own.
    assert_ok(&send(
        &mut g,
        &Command::create_blob(0, 10, VIRTIO_GPU_BLOB_MEM_GUEST, MAPPABLE, 0, ps()),
    ));
    assert_ok(&send(
        &mut g,
        &Command::create_blob(2, 20, VIRTIO_GPU_BLOB_MEM_HOST3D, MAPPABLE, 0, ps()),
    ));
    let ck = |id| {
        encode_stream(&[ShmOp::Checksum {
            resource_id: id,
            offset: 0,
            len: 8,
        }])
    };
    for ctx in [1, 2] {
        assert_ok(&send(&mut g, &Command::submit_3d(ctx, ck(10))));
    }
    assert_ok(&send(&mut g, &Command::submit_3d(2, ck(20))));
    assert_err(
        &send(&mut g, &Command::submit_3d(1, ck(20))),
        ErrorCode::InvalidParameter,
    );

    // Destroying ctx 2 keeps its blob alive and mapped; no stream can touch it any more;
    // the guest can still unmap and unref it.
    assert!(matches!(
        send(&mut g, &Command::map_blob(2, 20, 0)),
        Response::OkMapInfo { .. }
    ));
    assert_ok(&send(&mut g, &Command::ctx_destroy(2)));
    assert_eq!(g.mapped().collect::<Vec<_>>(), vec![(20, 0, ps())]);
    assert_eq!(g.placer().calls.len(), 1, "ctx destroy does not unmap");
    assert_err(
        &send(&mut g, &Command::submit_3d(2, ck(20))),
        ErrorCode::InvalidContextId,
    );
    // Even a new context with the old id cannot reach the orphan.
    assert_ok(&send(&mut g, &Command::ctx_create(2, 0, b"again")));
    assert_err(
        &send(&mut g, &Command::submit_3d(2, ck(20))),
        ErrorCode::InvalidParameter,
    );
    assert_ok(&send(&mut g, &Command::unref(20)));
    assert_eq!(g.placer().calls.len(), 2);
    assert_serving(&mut g);
}

#[test]
fn capsets() {
    let mut g = gpu();
    match send(&mut g, &Command::get_capset_info(0)) {
        Response::OkCapsetInfo {
            capset_id,
            capset_max_version,
            capset_max_size,
            ..
        } => {
            assert_eq!(capset_id, SHM_CAPSET_ID);
            assert_eq!(capset_max_version, 1);
            assert_eq!(capset_max_size, SHM_CAPSET_SIZE);
        }
        other => panic!("{other:?}"),
    }
    assert_err(
        &send(&mut g, &Command::get_capset_info(1)),
        ErrorCode::InvalidParameter,
    );
    assert_err(
        &send(&mut g, &Command::get_capset_info(u32::MAX)),
        ErrorCode::InvalidParameter,
    );
    match send(&mut g, &Command::get_capset(SHM_CAPSET_ID, 1)) {
        Response::OkCapset { data, .. } => {
            assert_eq!(data.len(), SHM_CAPSET_SIZE as usize);
            assert_eq!(&data[..5], b"HMSHM");
        }
        other => panic!("{other:?}"),
    }
    assert_err(
        &send(&mut g, &Command::get_capset(SHM_CAPSET_ID, 2)),
        ErrorCode::InvalidParameter,
    );
    assert_err(
        &send(&mut g, &Command::get_capset(VIRTIO_GPU_CAPSET_VIRGL, 1)),
        ErrorCode::InvalidParameter,
    );
}

#[test]
fn fences_are_echoed() {
    let mut g = gpu();
    let r = send(&mut g, &Command::ctx_create(5, 0, b"f").fenced(0x1234));
    assert_eq!(r.type_(), VIRTIO_GPU_RESP_OK_NODATA);
    assert_eq!(r.hdr().flags & VIRTIO_GPU_FLAG_FENCE, VIRTIO_GPU_FLAG_FENCE);
    assert_eq!(r.hdr().fence_id, 0x1234);
    assert_eq!(r.hdr().ctx_id, 5);
    // Errors echo the fence too.
    let r = send(&mut g, &Command::unref(77).fenced(9));
    assert_err(&r, ErrorCode::InvalidResourceId);
    assert_eq!(r.hdr().fence_id, 9);
    // Unfenced: no fence id.
    let mut cmd = Command::ctx_destroy(5);
    if let Command::CtxDestroy(h) = &mut cmd {
        h.fence_id = 99;
    }
    let r = send(&mut g, &cmd);
    assert_ok(&r);
    assert_eq!((r.hdr().flags, r.hdr().fence_id), (0, 0));
}

#[test]
fn blob_limit_is_out_of_memory() {
    let mut g = gpu();
    g.set_max_blobs(2);
    setup(&mut g, 1, 1);
    setup(&mut g, 2, 1);
    assert_err(
        &send(
            &mut g,
            &Command::create_blob(1, 3, VIRTIO_GPU_BLOB_MEM_HOST3D, MAPPABLE, 0, ps()),
        ),
        ErrorCode::OutOfMemory,
    );
    assert_ok(&send(&mut g, &Command::unref(2)));
    setup(&mut g, 3, 1);
}

#[test]
fn reset_mappings_forgets_placements_only() {
    let mut g = gpu();
    setup(&mut g, 1, 1);
    setup(&mut g, 2, 1);
    for (id, off) in [(1, 0), (2, ps())] {
        assert!(matches!(
            send(&mut g, &Command::map_blob(1, id, off)),
            Response::OkMapInfo { .. }
        ));
    }
    assert_eq!(g.reset_mappings(), 2);
    assert_eq!(g.mapped().count(), 0);
    assert_eq!(g.placer().calls.len(), 2, "reset does not call the placer");
    assert_eq!(g.blobs().count(), 2);
    assert!(matches!(
        send(&mut g, &Command::map_blob(1, 1, 0)),
        Response::OkMapInfo { .. }
    ));
    // Unref of a blob whose placement was forgotten does not unmap.
    assert_ok(&send(&mut g, &Command::unref(2)));
    assert_eq!(g.placer().calls.len(), 3);
}

#[test]
fn wire_round_trips() {
    let mut blob = Command::create_blob(3, 4, VIRTIO_GPU_BLOB_MEM_GUEST, 7, 0xabcdef, 1 << 20);
    if let Command::ResourceCreateBlob(c) = &mut blob {
        c.entries = vec![
            MemEntry {
                addr: 0x1000,
                length: 4096,
                padding: 0,
            },
            MemEntry {
                addr: u64::MAX,
                length: u32::MAX,
                padding: 5,
            },
        ];
        c.hdr.ring_idx = 3;
        c.hdr.flags = VIRTIO_GPU_FLAG_FENCE | VIRTIO_GPU_FLAG_INFO_RING_IDX;
    }
    let cmds = vec![
        blob,
        Command::map_blob(1, 2, 0x40_0000).fenced(77),
        Command::unmap_blob(1, 2),
        Command::unref(9),
        Command::ctx_create(4, VIRTIO_GPU_CAPSET_VENUS, b"venus"),
        Command::ctx_destroy(4),
        Command::submit_3d(4, vec![9; 33]),
        Command::get_capset_info(2),
        Command::get_capset(4, 1),
    ];
    for c in &cmds {
        let bytes = c.encode();
        let mut back = Command::parse(&bytes).unwrap();
        // parse fills hdr.type_; the builders already set it.
        assert_eq!(&back, c);
        assert_eq!(back.encode(), bytes);
        // Trailing bytes are ignored (except as SUBMIT_3D / CREATE_BLOB payload).
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0xee; 16]);
        back = Command::parse(&longer).unwrap();
        assert_eq!(&back, c);
    }
    let h = CtrlHdr::with_ctx(0, 2);
    let resps = vec![
        Response::ok_for(&h, vec![]),
        Response::ok_for(&h, 42u64.to_le_bytes().to_vec()),
        Response::OkMapInfo {
            hdr: h.response(VIRTIO_GPU_RESP_OK_MAP_INFO),
            map_info: VIRTIO_GPU_MAP_CACHE_WC,
        },
        Response::OkCapsetInfo {
            hdr: h.response(VIRTIO_GPU_RESP_OK_CAPSET_INFO),
            capset_id: 4,
            capset_max_version: 1,
            capset_max_size: 160,
        },
        Response::OkCapset {
            hdr: h.response(VIRTIO_GPU_RESP_OK_CAPSET),
            data: vec![1, 2, 3],
        },
        Response::error_for(&h, ErrorCode::InvalidScanoutId),
        Response::error_for(&h, ErrorCode::OutOfMemory),
    ];
    for r in &resps {
        let bytes = r.encode();
        assert_eq!(&Response::parse(&bytes).unwrap(), r);
    }
    assert_eq!(resps[0].encode().len(), 24);
    assert_eq!(resps[2].encode().len(), 32);
    assert_eq!(resps[3].encode().len(), 40);
    assert!(Response::parse(&resps[2].encode()[..31]).is_err());
    assert!(Response::parse(&[0; 23]).is_err());
}

#[test]
fn random_input_never_panics() {
    let mut rng = hostmem_base::rng::SplitMix64::new(0x9e37_79b9_7f4a_7c15);
    let mut g = gpu();
    let known = [
        VIRTIO_GPU_CMD_RESOURCE_CREATE_BLOB,
        VIRTIO_GPU_CMD_RESOURCE_MAP_BLOB,
        VIRTIO_GPU_CMD_RESOURCE_UNMAP_BLOB,
        VIRTIO_GPU_CMD_RESOURCE_UNREF,
        VIRTIO_GPU_CMD_CTX_CREATE,
        VIRTIO_GPU_CMD_CTX_DESTROY,
        VIRTIO_GPU_CMD_SUBMIT_3D,
        VIRTIO_GPU_CMD_GET_CAPSET_INFO,
        VIRTIO_GPU_CMD_GET_CAPSET,
    ];
    let seeds = [
        Command::create_blob(1, 1, VIRTIO_GPU_BLOB_MEM_HOST3D, MAPPABLE, 0, ps()).encode(),
        Command::create_blob(0, 2, VIRTIO_GPU_BLOB_MEM_GUEST, MAPPABLE, 0, 2 * ps()).encode(),
        Command::map_blob(1, 1, 0).encode(),
        Command::unmap_blob(1, 1).encode(),
        Command::unref(1).encode(),
        Command::ctx_create(1, 0, b"fuzz").encode(),
        Command::ctx_destroy(1).encode(),
        Command::submit_3d(
            1,
            encode_stream(&[
                ShmOp::Fill {
                    resource_id: 1,
                    offset: 0,
                    len: 64,
                    seed: 1,
                },
                ShmOp::Checksum {
                    resource_id: 2,
                    offset: 8,
                    len: 64,
                },
            ]),
        )
        .encode(),
    ];
    let mut ok = 0usize;
    for i in 0..6000 {
        let mut b: Vec<u8> = match i % 3 {
            // Pure noise.
            0 => (0..rng.below(160)).map(|_| rng.next_u64() as u8).collect(),
            // A known type with noise after it.
            1 => {
                let mut v = Vec::new();
                CtrlHdr::with_ctx(known[rng.below(known.len() as u64) as usize], 1)
                    .encode_into(&mut v);
                v.extend((0..rng.below(140)).map(|_| rng.next_u64() as u8));
                v
            }
            // A valid command with a few bytes mutated and maybe cut.
            _ => {
                let mut v = seeds[rng.below(seeds.len() as u64) as usize].clone();
                for _ in 0..rng.below(4) {
                    let at = rng.below(v.len() as u64) as usize;
                    v[at] = match rng.below(3) {
                        0 => 0,
                        1 => 0xff,
                        _ => rng.next_u64() as u8,
                    };
                }
                if rng.below(4) == 0 {
                    v.truncate(rng.below(v.len() as u64 + 1) as usize);
                }
                v
            }
        };
        if i % 500 == 0 {
            b.clear();
        }
        let _ = Command::parse(&b);
        let _ = Response::parse(&b);
        let _ = decode_stream(&b);
        let out = g.handle(&b);
        let r = Response::parse(&out).expect("every response parses");
        if r.error().is_none() {
            ok += 1;
        }
        // The handler's view and the placer's agree: every mapped blob was placed, and
        // mappings never overlap or leave the window.
        let mut m: Vec<_> = g.mapped().collect();
        m.sort_by_key(|&(_, off, _)| off);
        for w in m.windows(2) {
            assert!(w[0].1 + w[0].2 <= w[1].1, "overlap {m:?}");
        }
        for &(_, off, len) in &m {
            assert!(off.checked_add(len).is_some_and(|e| e <= WINDOW));
        }
    }
    assert!(ok > 10, "some random commands should succeed ({ok})");
    assert_serving(&mut g);
}

#[test]
fn store_checksum_writes_the_ranges_checksum_into_the_blob() {
    let mut g = gpu();
    let size = 2 * ps();
    setup(&mut g, 7, 2);
    assert!(matches!(
        send(&mut g, &Command::map_blob(1, 7, 0)),
        Response::OkMapInfo { .. }
    ));
    let body = size - 8;
    let stream = encode_stream(&[
        ShmOp::Fill {
            resource_id: 7,
            offset: 0,
            len: size,
            seed: 9,
        },
        ShmOp::StoreChecksum {
            resource_id: 7,
            offset: 0,
            len: body,
            dst_offset: body,
        },
    ]);
    let reply = match send(&mut g, &Command::submit_3d(1, stream)) {
        Response::OkNoData { reply, .. } => reply,
        other => panic!("submit: {other:?}"),
    };
    assert!(reply.is_empty(), "STORE_CHECKSUM adds nothing to the reply");
    let fd = &g.placer().fds[0].1;
    let map = MemoryMapping::from_fd(fd.as_fd(), 0, size as usize, Prot::READ).unwrap();
    let mut got = vec![0u8; size as usize];
    map.read_slice(0, &mut got).unwrap();
    let expected = pattern_bytes(9, 0, body as usize);
    assert_eq!(got[..body as usize], expected[..]);
    assert_eq!(got[body as usize..], checksum(&expected).to_le_bytes());
    // A destination inside the range, or past the blob, is refused and changes nothing.
    for (len, dst) in [(body, body - 4), (8, size - 7), (8, u64::MAX - 3)] {
        let bad = encode_stream(&[ShmOp::StoreChecksum {
            resource_id: 7,
            offset: 0,
            len,
            dst_offset: dst,
        }]);
        assert_err(
            &send(&mut g, &Command::submit_3d(1, bad)),
            ErrorCode::InvalidParameter,
        );
    }
    let mut again = vec![0u8; size as usize];
    map.read_slice(0, &mut again).unwrap();
    assert_eq!(again, got);
    // The capset offers op 4.
    match send(&mut g, &Command::get_capset(SHM_CAPSET_ID, 1)) {
        Response::OkCapset { data, .. } => {
            let ops = u32::from_le_bytes(data[12..16].try_into().unwrap());
            assert_eq!(ops, 0b1_1110, "FILL, WRITE, CHECKSUM, STORE_CHECKSUM");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn capset_ids_fit_linuxs_capset_mask() {
    // Linux 6.1 keeps capset ids < 64 and CONTEXT_INIT takes only ids < 32; 1..=6 are the
    // spec's.
    const { assert!(SHM_CAPSET_ID > 9 && SHM_CAPSET_ID < 31) };
    #[cfg(feature = "virgl")]
    {
        use hostmem_device::backend::virgl::TEST_CAPSET_ID;
        const { assert!(TEST_CAPSET_ID > 9 && TEST_CAPSET_ID < 31 && TEST_CAPSET_ID != SHM_CAPSET_ID) };
    }
    let mut g = gpu();
    assert_ok(&send(&mut g, &Command::ctx_create(1, SHM_CAPSET_ID, b"t")));
}

#[test]
fn display_info_reports_the_default_scanout() {
    let mut g = gpu();
    let out = g.handle(&Command::get_display_info().fenced(5).encode());
    assert_eq!(out.len(), 408, "virtio_gpu_resp_display_info");
    match Response::parse(&out).unwrap() {
        Response::OkDisplayInfo { hdr, modes } => {
            assert_eq!(hdr.type_, VIRTIO_GPU_RESP_OK_DISPLAY_INFO);
            assert_eq!(hdr.fence_id, 5);
            assert_eq!(modes.len(), 16);
            assert_eq!(
                modes[0],
                DisplayOne {
                    x: 0,
                    y: 0,
                    width: 1024,
                    height: 768,
                    enabled: 1,
                    flags: 0
                }
            );
            assert!(modes[1..].iter().all(|m| m.enabled == 0 && m.width == 0));
        }
        other => panic!("{other:?}"),
    }
    assert_serving(&mut g);
}

#[test]
fn ctx_attach_and_detach_resource() {
    let mut g = gpu();
    setup(&mut g, 7, 1);
    assert_ok(&send(&mut g, &Command::ctx_attach_resource(1, 7)));
    assert_ok(&send(&mut g, &Command::ctx_detach_resource(1, 7)));
    for cmd in [Command::ctx_attach_resource, Command::ctx_detach_resource] {
        // No such context, no such resource, context 0.
        assert_err(&send(&mut g, &cmd(9, 7)), ErrorCode::InvalidContextId);
        assert_err(&send(&mut g, &cmd(0, 7)), ErrorCode::InvalidContextId);
        assert_err(&send(&mut g, &cmd(1, 8)), ErrorCode::InvalidResourceId);
        // Truncated: ERR_UNSPEC.
        let b = cmd(1, 7).encode();
        assert_err(&send_raw(&mut g, &b[..31]), ErrorCode::Unspec);
    }
    // Nothing changed: the blob is still there and the context still serves.
    assert!(g.blob(7).is_some());
    assert_ok(&send(&mut g, &Command::unref(7)));
    assert_err(
        &send(&mut g, &Command::ctx_attach_resource(1, 7)),
        ErrorCode::InvalidResourceId,
    );
    assert_serving(&mut g);
}

/// A placer whose verdicts come only when the test releases them (as a vhost-user
/// frontend's acks arrive while the device's loop runs).
#[derive(Debug, Default)]
struct AsyncPlacer {
    started: Vec<(u64, &'static str, u32)>,
    next: u64,
    released: std::collections::VecDeque<(u64, Result<(), PlaceError>)>,
    /// Verdicts handed to the handler.
    given: usize,
}

impl Placer for AsyncPlacer {
    fn map(&mut self, _req: &MapRequest<'_>) -> Result<(), PlaceError> {
        panic!("an asynchronous placer is never asked to wait");
    }
    fn unmap(&mut self, _: u32, _: u64, _: u64) -> Result<(), PlaceError> {
        panic!("an asynchronous placer is never asked to wait");
    }
    fn window_size(&self) -> u64 {
        WINDOW
    }
    fn begin_map(&mut self, req: &MapRequest<'_>) -> Result<Option<u64>, PlaceError> {
        self.next += 1;
        self.started.push((self.next, "map", req.resource_id));
        Ok(Some(self.next))
    }
    fn begin_unmap(&mut self, id: u32, _: u64, _: u64) -> Result<Option<u64>, PlaceError> {
        self.next += 1;
        self.started.push((self.next, "unmap", id));
        Ok(Some(self.next))
    }
    fn finish_next(&mut self) -> Option<(u64, Result<(), PlaceError>)> {
        // Never blocks: the handler only asks when the loop saw a verdict.
        self.given += 1;
        Some(
            self.released
                .pop_front()
                .expect("asked for a verdict not released"),
        )
    }
    fn verdicts_async(&self) -> bool {
        true
    }
}

/// Releases the verdict of the oldest started operation without one, then lets the
/// handler settle it (as the device's loop does when an ack arrived).
fn release(g: &mut Gpu<AsyncPlacer, ShmBackend>, r: Result<(), PlaceError>) {
    let p = g.placer();
    let t = p.started[p.given + p.released.len()].0;
    g.placer_mut().released.push_back((t, r));
    g.finish_one();
}

#[test]
fn async_verdicts_defer_later_commands_in_order() {
    let mut g = Gpu::new(Box::new(ShmBackend::new()), AsyncPlacer::default());
    let run = |g: &mut Gpu<AsyncPlacer, ShmBackend>, t: u64, c: Command| g.submit(t, &c.encode());
    run(&mut g, 1, Command::ctx_create(1, 0, b"t"));
    for id in [7, 8] {
        run(
            &mut g,
            id.into(),
            Command::create_blob(1, id, VIRTIO_GPU_BLOB_MEM_HOST3D, MAPPABLE, 0, ps()),
        );
    }
    assert_eq!(g.take_ready().len(), 3);
    // A map starts; a SUBMIT_3D behind it waits (it must see the settled map); a second
    // map behind that waits too (order), and nothing is answered yet.
    run(&mut g, 10, Command::map_blob(1, 7, 0));
    run(&mut g, 11, Command::ctx_attach_resource(1, 7));
    run(&mut g, 12, Command::map_blob(1, 8, ps()));
    assert_eq!(g.in_flight(), 1);
    assert_eq!(g.deferred(), 2);
    assert_eq!(
        g.placer().started.len(),
        1,
        "the second map is not started yet"
    );
    assert!(g.take_ready().is_empty());
    // The verdict of the first map: it, and the attach, are answered; the second map starts.
    release(&mut g, Ok(()));
    let ready = g.take_ready();
    let tokens: Vec<u64> = ready.iter().map(|r| r.0).collect();
    assert_eq!(tokens, vec![10, 11]);
    assert!(matches!(
        Response::parse(&ready[0].1).unwrap(),
        Response::OkMapInfo { .. }
    ));
    assert!(matches!(
        Response::parse(&ready[1].1).unwrap(),
        Response::OkNoData { .. }
    ));
    assert_eq!(g.deferred(), 0);
    assert_eq!(g.placer().started.len(), 2);
    // A refused second map fails its command and leaves the blob unmapped.
    release(&mut g, Err(PlaceError::Unspec("frontend said no".into())));
    let ready = g.take_ready();
    assert_eq!(ready.len(), 1);
    assert_eq!(ready[0].0, 12);
    assert_eq!(
        Response::parse(&ready[0].1).unwrap().error(),
        Some(ErrorCode::Unspec)
    );
    assert_eq!(g.blob(8).unwrap().mapped_at, None);
    assert_eq!(g.blob(7).unwrap().mapped_at, Some(0));
    // UNREF of a mapped blob: the unmap is pipelined, the unref follows its verdict.
    run(&mut g, 20, Command::unref(7));
    assert_eq!(g.in_flight(), 1);
    assert!(
        g.blob(7).is_some(),
        "not unref'd before the unmap's verdict"
    );
    assert_eq!(g.placer().started.last(), Some(&(3, "unmap", 7)));
    release(&mut g, Ok(()));
    let ready = g.take_ready();
    assert_eq!(ready.len(), 1);
    assert!(matches!(
        Response::parse(&ready[0].1).unwrap(),
        Response::OkNoData { .. }
    ));
    assert!(g.blob(7).is_none());
    assert_eq!(g.backend().blob_count(), 1);
}

#[test]
fn reset_drops_deferred_commands() {
    let mut g = Gpu::new(Box::new(ShmBackend::new()), AsyncPlacer::default());
    let run = |g: &mut Gpu<AsyncPlacer, ShmBackend>, t: u64, c: Command| g.submit(t, &c.encode());
    run(&mut g, 1, Command::ctx_create(1, 0, b"t"));
    run(
        &mut g,
        2,
        Command::create_blob(1, 7, VIRTIO_GPU_BLOB_MEM_HOST3D, MAPPABLE, 0, ps()),
    );
    run(&mut g, 3, Command::map_blob(1, 7, 0));
    run(&mut g, 4, Command::ctx_destroy(1));
    assert_eq!(g.deferred(), 1);
    g.placer_mut()
        .released
        .push_back((1, Err(PlaceError::Unspec("reset".into()))));
    let sum = g.reset_all();
    assert_eq!(g.deferred(), 0);
    assert_eq!(g.in_flight(), 0);
    assert_eq!(sum.contexts, 1, "the deferred CTX_DESTROY never ran");
    assert!(sum.dropped_responses >= 1);
}

/// A placer that announces maps (as the device's mirror does): it records every call in
/// order, and its verdicts are all Ok, given when asked.
#[derive(Debug, Default)]
struct AnnouncingPlacer {
    log: Vec<String>,
    next: u64,
    started: std::collections::VecDeque<u64>,
    /// The verdicts already in (for `next_verdict_ready`).
    arrived: usize,
}

impl Placer for AnnouncingPlacer {
    fn map(&mut self, req: &MapRequest<'_>) -> Result<(), PlaceError> {
        self.log.push(format!("map {}", req.resource_id));
        Ok(())
    }
    fn unmap(&mut self, id: u32, _: u64, _: u64) -> Result<(), PlaceError> {
        self.log.push(format!("unmap {id}"));
        Ok(())
    }
    fn window_size(&self) -> u64 {
        WINDOW
    }
    fn announces(&self) -> bool {
        true
    }
    fn announce_map(&mut self, req: &MapRequest<'_>) -> Result<u64, PlaceError> {
        self.next += 1;
        self.started.push_back(self.next);
        self.log.push(format!("announce {}", req.resource_id));
        Ok(self.next)
    }
    fn place_announced(&mut self, ticket: u64, req: &MapRequest<'_>) {
        self.log
            .push(format!("place {} (ticket {ticket})", req.resource_id));
    }
    fn begin_unmap(&mut self, id: u32, _: u64, _: u64) -> Result<Option<u64>, PlaceError> {
        self.next += 1;
        self.started.push_back(self.next);
        self.log.push(format!("begin unmap {id}"));
        Ok(Some(self.next))
    }
    fn finish_next(&mut self) -> Option<(u64, Result<(), PlaceError>)> {
        let t = self.started.pop_front()?;
        self.log.push(format!("settle {t}"));
        self.arrived = self.arrived.saturating_sub(1);
        Some((t, Ok(())))
    }
    fn next_verdict_ready(&mut self) -> bool {
        self.arrived > 0 && !self.started.is_empty()
    }
}

#[test]
fn announced_maps_are_placed_after_the_run_and_before_anything_that_needs_them() {
    let mut g = Gpu::new(Box::new(ShmBackend::new()), AnnouncingPlacer::default());
    let run =
        |g: &mut Gpu<AnnouncingPlacer, ShmBackend>, t: u64, c: Command| g.submit(t, &c.encode());
    run(&mut g, 1, Command::ctx_create(1, 0, b"t"));
    for id in [7, 8, 9, 30] {
        run(
            &mut g,
            id.into(),
            Command::create_blob(1, id, VIRTIO_GPU_BLOB_MEM_HOST3D, MAPPABLE, 0, ps()),
        );
    }
    assert_eq!(g.take_ready().len(), 5);
    // A run of three maps: all announced, none placed yet.
    for (t, id) in [(10, 7), (11, 8), (12, 9)] {
        run(&mut g, t, Command::map_blob(1, id, u64::from(id) * ps()));
    }
    assert_eq!(
        g.placer().log,
        ["announce 7", "announce 8", "announce 9"],
        "the VMM hears of the whole run before the device places any of it"
    );
    assert_eq!(g.in_flight(), 3);
    // The run is done: the placements, in order.
    g.place_due();
    assert_eq!(
        &g.placer().log[3..],
        [
            "place 7 (ticket 1)",
            "place 8 (ticket 2)",
            "place 9 (ticket 3)"
        ]
    );
    // Nothing is due twice.
    g.place_due();
    assert_eq!(g.placer().log.len(), 6);
    // Two verdicts came together: one settle call settles both, the third stays.
    g.placer_mut().arrived = 2;
    g.finish_ready();
    assert_eq!(&g.placer().log[6..], ["settle 1", "settle 2"]);
    let tokens: Vec<u64> = g.take_ready().iter().map(|r| r.0).collect();
    assert_eq!(tokens, vec![10, 11]);
    assert_eq!(g.in_flight(), 1);
    g.finish_ready();
    assert_eq!(g.take_ready().len(), 1);

    // A map announced and an unmap of the same blob in one run: the map is placed before
    // it is settled, and both before the unmap's restore.
    g.placer_mut().log.clear();
    run(&mut g, 20, Command::map_blob(1, 30, 12 * ps()));
    run(&mut g, 21, Command::unmap_blob(1, 30));
    let log = g.placer().log.clone();
    let pos = |s: &str| {
        log.iter()
            .position(|l| l.starts_with(s))
            .unwrap_or_else(|| panic!("no {s:?} in {log:?}"))
    };
    assert!(pos("announce 30") < pos("place 30"), "{log:?}");
    assert!(pos("place 30") < pos("settle"), "{log:?}");
    assert!(pos("settle") < pos("unmap 30"), "{log:?}");
    while g.in_flight() > 0 {
        g.finish_one();
    }
    assert_eq!(g.take_ready().len(), 2);
}
