//! The command handler over the real virglrenderer (feature `virgl`), in one process: a
//! venus SHM blob filled through the renderer's own mapping, placed (a placer that really
//! maps the exported fd), both views sharing pages both ways; a vrend pointer-only blob
//! answered with `ERR_UNSPEC`; unknown resource ids refused by the backend before they
//! reach the library.
//!
//! virglrenderer is one global renderer per process, so everything runs in one `#[test]`.
#![cfg(feature = "virgl")]

use std::os::fd::AsFd;

use hostmem_base::mmap::{MemoryMapping, Prot};
use hostmem_device::backend::shm::{checksum, encode_stream, pattern_bytes, ShmOp};
use hostmem_device::backend::virgl::{VirglBackend, TEST_CAPSET_ID};
use hostmem_device::backend::{Backend, BackendError};
use hostmem_device::gpu::{Gpu, MapRequest, PlaceError, Placer};
use hostmem_device::wire::*;

const WINDOW: u64 = 16 << 20;
const VENUS: u32 = 1;
const TEST: u32 = 2;
const VREND: u32 = 3;

/// Maps every placed fd on its own (no window): what the VMM would see.
#[derive(Debug, Default)]
struct MappingPlacer {
    maps: Vec<(u32, MemoryMapping)>,
    map_infos: Vec<u32>,
}

impl Placer for MappingPlacer {
    fn map(&mut self, req: &MapRequest<'_>) -> Result<(), PlaceError> {
        let m = MemoryMapping::from_fd(
            req.blob.fd.as_fd(),
            req.blob.fd_offset,
            req.len as usize,
            Prot::READ_WRITE,
        )
        .map_err(|e| PlaceError::Unspec(e.to_string()))?;
        self.maps.push((req.resource_id, m));
        self.map_infos.push(req.map_info);
        Ok(())
    }
    fn unmap(&mut self, resource_id: u32, _offset: u64, _len: u64) -> Result<(), PlaceError> {
        self.maps.retain(|(r, _)| *r != resource_id);
        Ok(())
    }
    fn window_size(&self) -> u64 {
        WINDOW
    }
}

fn send(g: &mut Gpu<MappingPlacer, VirglBackend>, cmd: Command) -> Response {
    Response::parse(&g.handle(&cmd.encode())).expect("response parses")
}

fn err_code(r: &Response) -> Option<ErrorCode> {
    match r {
        Response::Err { code, .. } => Some(*code),
        _ => None,
    }
}

fn ok(r: &Response, what: &str) {
    assert!(err_code(r).is_none(), "{what}: {r:?}");
}

/// The vrend stream that makes a MAP_PERSISTENT|MAP_COHERENT buffer named by `blob_id`:
/// `VIRGL_CCMD_PIPE_RESOURCE_CREATE` (48), 11 dwords.
fn pipe_resource_create(blob_id: u32, size: u32) -> Vec<u8> {
    const CCMD_PIPE_RESOURCE_CREATE: u32 = 48;
    const LEN: u32 = 11;
    const FORMAT_R8_UNORM: u32 = 64;
    const BIND_VERTEX_BUFFER: u32 = 1 << 4;
    const FLAG_MAP_PERSISTENT: u32 = 1 << 1;
    const FLAG_MAP_COHERENT: u32 = 1 << 2;
    let dwords = [
        CCMD_PIPE_RESOURCE_CREATE | (LEN << 16),
        0, // target: PIPE_BUFFER
        FORMAT_R8_UNORM,
        BIND_VERTEX_BUFFER,
        size,
        1,
        1,
        1,
        0,
        0,
        FLAG_MAP_PERSISTENT | FLAG_MAP_COHERENT,
        blob_id,
    ];
    dwords.iter().flat_map(|d| d.to_le_bytes()).collect()
}

#[test]
fn virgl_venus_shm_blob_vrend_pointer_only_and_unknown_ids() {
    let backend = VirglBackend::new(true).expect("virglrenderer initializes headless (0x59)");
    eprintln!(
        "virgl: renderer up; map_fixed {}",
        if backend.has_map_fixed() {
            "present"
        } else {
            "absent"
        }
    );
    let mut g = Gpu::new(Box::new(backend), MappingPlacer::default());

    // Capsets: venus and the test capset are offered.
    let caps = g.backend().capsets();
    assert!(
        caps.iter().any(|c| c.id == VIRTIO_GPU_CAPSET_VENUS),
        "{caps:?}"
    );
    let venus = caps
        .iter()
        .find(|c| c.id == VIRTIO_GPU_CAPSET_VENUS)
        .unwrap();
    let r = send(
        &mut g,
        Command::get_capset(VIRTIO_GPU_CAPSET_VENUS, venus.max_version),
    );
    assert!(
        matches!(r, Response::OkCapset { ref data, .. } if !data.is_empty()),
        "{r:?}"
    );

    ok(
        &send(
            &mut g,
            Command::ctx_create(VENUS, VIRTIO_GPU_CAPSET_VENUS, b"venus"),
        ),
        "venus ctx",
    );
    ok(
        &send(&mut g, Command::ctx_create(TEST, TEST_CAPSET_ID, b"test")),
        "test ctx",
    );
    // SUBMIT_3D on the venus context completes only when its context fence (ring 0)
    // signalled; a fence that never signals would answer ERR_UNSPEC.
    for _ in 0..3 {
        ok(
            &send(&mut g, Command::submit_3d(VENUS, vec![]).fenced(7)),
            "venus submit, fenced",
        );
    }
    assert!(
        hostmem_base::virgl::last_context_fence(VENUS, 0) >= 3,
        "the venus context fences signalled"
    );

    // Unknown ids: refused by the handler and by the backend itself, never by the library
    // (which would answer EINVAL -> Unspec).
    for cmd in [
        Command::map_blob(VENUS, 99, 0),
        Command::unref(99),
        Command::unmap_blob(VENUS, 99),
    ] {
        assert_eq!(
            err_code(&send(&mut g, cmd)),
            Some(ErrorCode::InvalidResourceId)
        );
    }
    assert!(matches!(
        g.backend_mut().export_blob(99),
        Err(BackendError::InvalidId(_))
    ));
    assert!(matches!(
        g.backend_mut().unref(99),
        Err(BackendError::InvalidId(_))
    ));
    let bad = encode_stream(&[ShmOp::Checksum {
        resource_id: 99,
        offset: 0,
        len: 8,
    }]);
    assert_eq!(
        err_code(&send(&mut g, Command::submit_3d(TEST, bad))),
        Some(ErrorCode::InvalidParameter)
    );

    // A venus SHM blob: blob_id 0, flags exactly MAPPABLE.
    let size = 256 << 10;
    ok(
        &send(
            &mut g,
            Command::create_blob(
                VENUS,
                1,
                VIRTIO_GPU_BLOB_MEM_HOST3D,
                VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
                0,
                size,
            ),
        ),
        "venus blob",
    );
    // The renderer writes through its own mapping.
    let fill = encode_stream(&[ShmOp::Fill {
        resource_id: 1,
        offset: 0,
        len: size,
        seed: 42,
    }]);
    ok(&send(&mut g, Command::submit_3d(TEST, fill)), "fill");
    let r = send(&mut g, Command::map_blob(VENUS, 1, 0x10000));
    assert!(matches!(r, Response::OkMapInfo { .. }), "map: {r:?}");
    let placed = &g.placer().maps[0].1;
    let mut seen = vec![0u8; size as usize];
    placed.read_slice(0, &mut seen).unwrap();
    assert!(
        seen == pattern_bytes(42, 0, size as usize),
        "placed fd shows the renderer's writes"
    );
    // The "guest" writes through the placed fd; the renderer reads it back.
    placed.write_slice(4096, b"from the guest").unwrap();
    let mut expected = pattern_bytes(42, 0, size as usize);
    expected[4096..4096 + 14].copy_from_slice(b"from the guest");
    let q = encode_stream(&[ShmOp::Checksum {
        resource_id: 1,
        offset: 0,
        len: size,
    }]);
    let r = send(&mut g, Command::submit_3d(TEST, q));
    let Response::OkNoData { reply, .. } = r else {
        panic!("checksum: {r:?}")
    };
    assert_eq!(
        reply,
        checksum(&expected).to_le_bytes().to_vec(),
        "renderer sees the write"
    );
    ok(&send(&mut g, Command::unmap_blob(VENUS, 1)), "unmap");
    ok(&send(&mut g, Command::unref(1)), "unref");
    assert_eq!(g.backend().blob_count(), 0);
    eprintln!(
        "virgl: venus SHM blob placed, shared both ways, map_info {:?}",
        g.placer().map_infos
    );

    // A vrend HOST3D blob is pointer-only: MAP_BLOB answers ERR_UNSPEC.
    ok(
        &send(
            &mut g,
            Command::ctx_create(VREND, VIRTIO_GPU_CAPSET_VIRGL2, b"vrend"),
        ),
        "vrend ctx",
    );
    ok(
        &send(
            &mut g,
            Command::submit_3d(VREND, pipe_resource_create(7, 64 << 10)),
        ),
        "pipe res",
    );
    ok(
        &send(
            &mut g,
            Command::create_blob(
                VREND,
                2,
                VIRTIO_GPU_BLOB_MEM_HOST3D,
                VIRTIO_GPU_BLOB_FLAG_USE_MAPPABLE,
                7,
                64 << 10,
            ),
        ),
        "vrend blob",
    );
    let r = send(&mut g, Command::map_blob(VREND, 2, 0));
    assert_eq!(
        err_code(&r),
        Some(ErrorCode::Unspec),
        "pointer-only blob: {r:?}"
    );
    assert!(
        g.placer().maps.is_empty(),
        "nothing placed for the pointer-only blob"
    );
    match g.backend_mut().export_blob(2) {
        Err(BackendError::Unspec(why)) if why.contains("pointer-only") => {
            eprintln!("virgl: backend says: {why}")
        }
        other => panic!("export of the vrend blob: {other:?}"),
    }
    ok(&send(&mut g, Command::unref(2)), "unref vrend blob");
    for c in [VENUS, TEST, VREND] {
        ok(&send(&mut g, Command::ctx_destroy(c)), "ctx destroy");
    }
    eprintln!("virgl: vrend pointer-only blob refused with ERR_UNSPEC");
}
