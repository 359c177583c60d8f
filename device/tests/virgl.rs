//! The command handler over the real virglrenderer (feature `virgl`), in one process: a
//! venus SHM blob filled through the renderer's own mapping, placed into a real window
//! (by the renderer's `virgl_renderer_resource_map_fixed` when the library has it, else by
//! the window's MAP_FIXED of the exported fd) and mapped as the VMM would, all views
//! sharing pages both ways, background again after unmap; a vrend pointer-only blob
//! answered with `ERR_UNSPEC`; unknown resource ids refused by the backend before they
//! reach the library.
//!
//! `tools/test` runs it on Debian 12's 0.10.4 (no map_fixed) and, through
//! `tools/virgl-next`, on Debian's 1.3.0 with `HOSTMEM_VIRGL_EXPECT_MAP_FIXED` set.
//!
//! virglrenderer is one global renderer per process, so everything runs in one `#[test]`.
#![cfg(feature = "virgl")]

use std::os::fd::{AsFd, AsRawFd};

use hostmem_base::mmap::{MemoryMapping, Prot};
use hostmem_base::shm::SharedMemory;
use hostmem_base::window::{MappedBy, Window};
use hostmem_device::backend::shm::{checksum, encode_stream, pattern_bytes, ShmOp};
use hostmem_device::backend::virgl::{VirglBackend, VirglOptions, TEST_CAPSET_ID};
use hostmem_device::backend::{Backend, BackendError, ExportedBlob};
use hostmem_device::display::{FrameInfo, FramePixels, FrameSink};
use hostmem_device::gpu::{Gpu, MapRequest, PlaceError, Placer};
use hostmem_device::wire::*;

const WINDOW: u64 = 16 << 20;
const VENUS: u32 = 1;
const TEST: u32 = 2;
const VREND: u32 = 3;

/// Places like the device's mirror (a real [`Window`], through `place_with`, so the
/// renderer's own `map_fixed` maps the blob when the library has it) and also maps every
/// placed fd on its own: what the VMM would see.
#[derive(Debug)]
struct WindowPlacer {
    window: Window,
    maps: Vec<(u32, MemoryMapping)>,
    map_infos: Vec<u32>,
    /// Who mapped each placement into the window, and the placed file's inode.
    placed_by: Vec<(u32, MappedBy, u64)>,
}

impl WindowPlacer {
    fn new() -> Self {
        WindowPlacer {
            window: Window::new(WINDOW).expect("window"),
            maps: Vec::new(),
            map_infos: Vec::new(),
            placed_by: Vec::new(),
        }
    }
}

impl Placer for WindowPlacer {
    fn map(&mut self, req: &MapRequest<'_>) -> Result<(), PlaceError> {
        let by = req
            .place_in(&self.window)
            .map_err(|e| PlaceError::Unspec(e.to_string()))?;
        let m = MemoryMapping::from_fd(
            req.blob.fd.as_fd(),
            req.blob.fd_offset,
            req.len as usize,
            Prot::READ_WRITE,
        )
        .map_err(|e| PlaceError::Unspec(e.to_string()))?;
        let ino = nix::sys::stat::fstat(req.blob.fd.as_raw_fd())
            .unwrap()
            .st_ino;
        self.maps.push((req.resource_id, m));
        self.map_infos.push(req.map_info);
        self.placed_by.push((req.resource_id, by, ino));
        Ok(())
    }
    fn unmap(&mut self, resource_id: u32, offset: u64, len: u64) -> Result<(), PlaceError> {
        self.window
            .restore(offset, len)
            .map_err(|e| PlaceError::Unspec(e.to_string()))?;
        self.maps.retain(|(r, _)| *r != resource_id);
        Ok(())
    }
    fn window_size(&self) -> u64 {
        WINDOW
    }
}

/// The inodes of the mappings over `offset..offset+len` of the window.
fn window_inodes(w: &Window, offset: u64, len: u64) -> Vec<u64> {
    let (start, _) = w.host_range();
    let (a, b) = (start + offset as usize, start + (offset + len) as usize);
    let maps = hostmem_base::procfs::maps_in_range(a, b).unwrap();
    assert!(
        maps.first().is_some_and(|m| m.start <= a) && maps.last().is_some_and(|m| m.end >= b),
        "the range is fully mapped: {maps:?}"
    );
    maps.iter().map(|m| m.inode).collect()
}

fn send(g: &mut Gpu<WindowPlacer, VirglBackend>, cmd: Command) -> Response {
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

/// Frames a sink saw, with their bytes (a 2D resource's, or the blob read through its fd).
#[derive(Debug, Default, Clone)]
struct Frames(std::sync::Arc<std::sync::Mutex<Vec<Frame>>>);

/// A frame's description and bytes.
type Frame = (FrameInfo, Vec<u8>);

impl FrameSink for Frames {
    fn frame(&mut self, info: &FrameInfo, pixels: FramePixels<'_>) {
        let bytes = pixels.copy_out().expect("the frame's bytes");
        self.0.lock().unwrap().push((*info, bytes));
    }
}

#[test]
fn virgl_venus_shm_blob_vrend_pointer_only_and_unknown_ids() {
    // Debian 12's 0.10.4 runs venus in-process; a library that builds venus only into its
    // render server (Debian's 1.3.0, see tools/virgl-next) needs one: start it, as the VMM
    // does, and hand the renderer a socket to it.
    let mut server = None;
    let render_server = std::env::var_os("HOSTMEM_VIRGL_RENDER_SERVER").map(|program| {
        let (ours, theirs) = hostmem_ipc::Tube::pair().unwrap();
        server = Some(
            hostmem_jail::launch::spawn(hostmem_jail::launch::JailConfig {
                program: program.into(),
                args: vec!["--socket-fd".into(), "3".into()],
                keep_fds: vec![(theirs.into_fd(), 3)],
                ..Default::default()
            })
            .expect("render server starts"),
        );
        ours.into_fd()
    });
    let opts = VirglOptions {
        test_ops: true,
        render_server,
    };
    let backend = VirglBackend::with_options(opts).expect("virglrenderer initializes headless");
    let map_fixed = backend.has_map_fixed();
    eprintln!(
        "virgl: renderer up; map_fixed {}",
        if map_fixed { "present" } else { "absent" }
    );
    if std::env::var_os("HOSTMEM_VIRGL_EXPECT_MAP_FIXED").is_some() {
        assert!(
            map_fixed,
            "this run is for a library with virgl_renderer_resource_map_fixed"
        );
    }
    let mut g = Gpu::new(Box::new(backend), WindowPlacer::new());

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
        hostmem_base::virgl::last_context_fence(VENUS, 0) >= 7,
        "the venus context fences signalled"
    );
    // Pipelined, fenced on ring 0 (a raw context has no queue bound to the other rings:
    // vkr makes a fence on one fatal for the context): each response goes out when the
    // renderer retires its fence, seen through the context's poll fd (or by polling).
    for n in 1..=3u64 {
        let mut b = Command::submit_3d(VENUS, vec![]).fenced(100 + n).encode();
        let flags = u32::from_le_bytes(b[4..8].try_into().unwrap()) | VIRTIO_GPU_FLAG_INFO_RING_IDX;
        b[4..8].copy_from_slice(&flags.to_le_bytes());
        b[20] = 0;
        g.submit(n, &b);
    }
    let mut done: Vec<u64> = g.take_ready().into_iter().map(|(t, _)| t).collect();
    let at_once = done.len();
    let (mut with_fd, deadline) = (
        false,
        std::time::Instant::now() + std::time::Duration::from_secs(10),
    );
    while done.len() < 3 && std::time::Instant::now() < deadline {
        let fds = g.fence_fds();
        with_fd |= !fds.is_empty();
        let mut p: Vec<nix::poll::PollFd<'_>> = fds
            .iter()
            .map(|fd| nix::poll::PollFd::new(*fd, nix::poll::PollFlags::POLLIN))
            .collect();
        let _ = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(10u8));
        drop(p);
        drop(fds);
        g.poll_fences();
        done.extend(g.take_ready().into_iter().map(|(t, _)| t));
    }
    done.sort_unstable();
    assert_eq!(done, [1, 2, 3], "pipelined fenced venus submits completed");
    println!(
        "venus context fences: {at_once} of 3 signalled at once, the rest retired {} the \
         context's poll fd",
        if with_fd { "through" } else { "without" }
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

    // map_fixed of an id the backend did not create never reaches the library: the window
    // maps the fd itself.
    let stray = SharedMemory::new("stray", 2 * 4096).unwrap();
    let exported = ExportedBlob {
        fd: stray.as_fd().try_clone_to_owned().unwrap(),
        fd_offset: 0,
        size: 2 * 4096,
        map_info: 0,
    };
    let by = g
        .placer()
        .window
        .place_with(0, 2 * 4096, stray.as_fd(), 0, Prot::READ_WRITE, |t| {
            g.backend().map_fixed(99, &exported, t)
        })
        .unwrap();
    assert_eq!(
        by,
        MappedBy::Window,
        "unknown id: not mapped by the renderer"
    );
    g.placer().window.restore(0, 2 * 4096).unwrap();

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
    const AT: u64 = 0x10000;
    let r = send(&mut g, Command::map_blob(VENUS, 1, AT));
    assert!(matches!(r, Response::OkMapInfo { .. }), "map: {r:?}");
    // The mirror: mapped by the renderer itself when the library can, else by the window;
    // either way the window's range is the blob's file, as the kernel sees it.
    let (res, by, ino) = g.placer().placed_by[0];
    assert_eq!(res, 1);
    let want = if map_fixed {
        MappedBy::Caller
    } else {
        MappedBy::Window
    };
    assert_eq!(by, want, "who mapped the mirror");
    assert!(
        window_inodes(&g.placer().window, AT, size)
            .iter()
            .all(|&i| i == ino),
        "the window range maps the blob's file"
    );
    g.placer()
        .window
        .audit()
        .expect("window agrees with its table");
    eprintln!("virgl: venus SHM blob mapped into the window by {by:?}");
    let placed = &g.placer().maps[0].1;
    let mut seen = vec![0u8; size as usize];
    placed.read_slice(0, &mut seen).unwrap();
    assert!(
        seen == pattern_bytes(42, 0, size as usize),
        "placed fd shows the renderer's writes"
    );
    let mut mirror = vec![0u8; size as usize];
    g.placer().window.read(AT, &mut mirror).unwrap();
    assert!(mirror == seen, "the mirror shows the renderer's writes");
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
    // Unmapped: the window is background again, and the renderer's later writes (through
    // its own mapping, which map_fixed did not replace) no longer reach it.
    let fill = encode_stream(&[ShmOp::Fill {
        resource_id: 1,
        offset: 0,
        len: size,
        seed: 43,
    }]);
    ok(
        &send(&mut g, Command::submit_3d(TEST, fill)),
        "fill after unmap",
    );
    g.placer().window.read(AT, &mut mirror).unwrap();
    assert!(mirror.iter().all(|&b| b == 0), "window reads zeros");
    g.placer().window.audit().expect("window is all background");

    // The display with the virgl backend: the venus blob as a scanout (the sink reads it
    // through the backend's export), and a 2D frame from guest RAM (2D resources live in
    // the device core, never in the renderer).
    let frames = Frames::default();
    g.set_frame_sink(Box::new(frames.clone()));
    let ram = SharedMemory::new("virgl-ram", 1 << 20).unwrap();
    let region = hostmem_ipc::protocol::GuestRegion {
        gpa: 0x10_0000,
        size: 1 << 20,
        fd_offset: 0,
    };
    let mem =
        hostmem_device::virtio::guest_memory(&[region], vec![ram.try_clone_fd().unwrap()]).unwrap();
    g.set_guest_memory(Some(mem.clone()));
    ok(
        &send(
            &mut g,
            Command::set_scanout_blob(0, 1, VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM, (64, 64), 256, 0),
        ),
        "scanout of the venus blob",
    );
    ok(
        &send(&mut g, Command::resource_flush(1, Rect::new(0, 0, 64, 64))),
        "flush of the venus blob",
    );
    {
        let f = frames.0.lock().unwrap();
        assert_eq!(f.len(), 1);
        assert!(
            f[0].1 == pattern_bytes(43, 0, size as usize),
            "the sink saw the renderer's writes"
        );
    }
    let img: Vec<u8> = (0..32 * 32 * 4).map(|i| (i % 251) as u8).collect();
    vm_memory::Bytes::write_slice(&mem, &img, vm_memory::GuestAddress(0x10_0000)).unwrap();
    ok(&send(&mut g, Command::create_2d(40, 2, 32, 32)), "2D");
    ok(
        &send(
            &mut g,
            Command::attach_backing(40, &[(0x10_0000, 32 * 32 * 4)]),
        ),
        "backing",
    );
    let full = Rect::new(0, 0, 32, 32);
    ok(
        &send(&mut g, Command::transfer_to_host_2d(40, full, 0)),
        "transfer",
    );
    ok(
        &send(&mut g, Command::set_scanout(0, 40, full)),
        "scanout of the 2D resource",
    );
    ok(&send(&mut g, Command::resource_flush(40, full)), "flush");
    assert!(frames.0.lock().unwrap()[1].1 == img, "the 2D frame's bytes");
    // A 2D id is unknown to the renderer: a stream naming it is refused by the backend.
    let stray = encode_stream(&[ShmOp::Checksum {
        resource_id: 40,
        offset: 0,
        len: 8,
    }]);
    assert!(err_code(&send(&mut g, Command::submit_3d(TEST, stray))).is_some());
    ok(&send(&mut g, Command::unref(40)), "unref 2D");
    eprintln!("virgl: a blob scanout and a 2D frame reached the sink");

    ok(&send(&mut g, Command::unref(1)), "unref");
    // The library freed the blob without touching the window (map_fixed's mapping is not
    // one it tracks): no hole where it was placed.
    g.placer()
        .window
        .audit()
        .expect("window still whole after unref");
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
    // A pointer-only blob cannot be a scanout either: the backend's refusal.
    let r = send(
        &mut g,
        Command::set_scanout_blob(0, 2, VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM, (64, 64), 256, 0),
    );
    assert_eq!(err_code(&r), Some(ErrorCode::Unspec), "{r:?}");
    ok(&send(&mut g, Command::unref(2)), "unref vrend blob");
    for c in [VENUS, TEST, VREND] {
        ok(&send(&mut g, Command::ctx_destroy(c)), "ctx destroy");
    }
    eprintln!("virgl: vrend pointer-only blob refused with ERR_UNSPEC");
    drop(g);
    if let Some(mut server) = server {
        // The renderer is gone (cleanup closed its socket): the server ends on its own.
        let end = server
            .wait_timeout(std::time::Duration::from_secs(5))
            .unwrap();
        eprintln!("virgl: render server ended: {end:?}");
        assert!(end.is_some(), "the render server ends with its client");
    }
}
