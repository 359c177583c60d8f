//! The display half of the command handler (virtio 1.2 §5.7) with the shm backend, guest RAM
//! on a memfd and a recording frame sink: every command's success and its hostile cases
//! (overflowing rects, stride × height past the backing, backing in the hostmem window or
//! outside RAM, too many entries, unknown formats, zero sizes, scanout ids out of range,
//! flushes of resources on no scanout, cursors of the wrong size), and a pattern copied
//! from guest RAM through ATTACH_BACKING + TRANSFER_TO_HOST_2D + SET_SCANOUT +
//! RESOURCE_FLUSH that the sink must see byte for byte.

mod common;

use std::sync::{Arc, Mutex};

use hostmem_device::backend::shm::{encode_stream, pattern_bytes, ShmBackend, ShmOp};
use hostmem_device::display::{
    CursorInfo, DisplayConfig, Format, FrameInfo, FramePixels, FrameSink, CURSOR_SIZE,
    MAX_2D_DIMENSION, MAX_2D_RESOURCES, MAX_BACKING_ENTRIES,
};
use hostmem_device::edid;
use hostmem_device::gpu::{Gpu, MapRequest, PlaceError, Placer};
use hostmem_device::virtio::{guest_memory, GuestMemoryMmap};
use hostmem_device::wire::*;
use hostmem_ipc::protocol::GuestRegion;
use vm_memory::{Bytes, GuestAddress};

use common::RAM_GPA;

const WINDOW: u64 = 16 << 20;
/// Guest RAM: 4 MiB at [`RAM_GPA`].
const RAM_SIZE: u64 = 4 << 20;
/// Where the test puts the hostmem window (outside RAM, as the VMM's BAR).
const WINDOW_GPA: u64 = 1 << 32;
const XRGB: u32 = VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM;

#[derive(Debug, Default)]
struct NullPlacer;

impl Placer for NullPlacer {
    fn map(&mut self, _req: &MapRequest<'_>) -> Result<(), PlaceError> {
        Ok(())
    }
    fn unmap(&mut self, _id: u32, _offset: u64, _len: u64) -> Result<(), PlaceError> {
        Ok(())
    }
    fn window_size(&self) -> u64 {
        WINDOW
    }
}

/// A frame as the sink saw it: the description and a copy of the framebuffer's bytes.
#[derive(Debug, Clone)]
struct Seen {
    info: FrameInfo,
    bytes: Vec<u8>,
}

/// Records every frame (copying the pixels: a 2D resource's bytes, or the blob read
/// through its fd) and every cursor change.
#[derive(Debug, Default, Clone)]
struct Recorder {
    frames: Arc<Mutex<Vec<Seen>>>,
    cursors: Arc<Mutex<Vec<CursorInfo>>>,
}

impl FrameSink for Recorder {
    fn frame(&mut self, info: &FrameInfo, pixels: FramePixels<'_>) {
        let bytes = pixels.copy_out().expect("the frame's bytes");
        self.frames
            .lock()
            .unwrap()
            .push(Seen { info: *info, bytes });
    }
    fn cursor(&mut self, cursor: &CursorInfo) {
        self.cursors.lock().unwrap().push(cursor.clone());
    }
}

type TestGpu = Gpu<NullPlacer, ShmBackend>;

struct Rig {
    g: TestGpu,
    /// The driver's view of guest RAM (the same memfd).
    ram: GuestMemoryMmap,
    rec: Recorder,
}

fn rig() -> Rig {
    rig_with(DisplayConfig::default())
}

fn rig_with(config: DisplayConfig) -> Rig {
    let (memfd, ram) = common::ram("display-ram", RAM_SIZE);
    let dev_mem = guest_memory(
        &[common::region(RAM_SIZE)],
        vec![memfd.try_clone_fd().unwrap()],
    )
    .unwrap();
    let mut g = Gpu::new(Box::new(ShmBackend::new()), NullPlacer);
    g.set_guest_memory(Some(dev_mem));
    g.set_display(config);
    g.set_backing_exclusions(vec![(WINDOW_GPA, WINDOW)]);
    let rec = Recorder::default();
    g.set_frame_sink(Box::new(rec.clone()));
    Rig { g, ram, rec }
}

impl Rig {
    fn send(&mut self, cmd: &Command) -> Response {
        Response::parse(&self.g.handle(&cmd.encode())).expect("handler output parses")
    }
    fn ok(&mut self, cmd: &Command) {
        let r = self.send(cmd);
        assert!(matches!(r, Response::OkNoData { .. }), "{cmd:?}: {r:?}");
    }
    fn err(&mut self, cmd: &Command, code: ErrorCode) {
        let r = self.send(cmd);
        assert_eq!(r.error(), Some(code), "{cmd:?}: {r:?}");
    }
    fn frames(&self) -> Vec<Seen> {
        self.rec.frames.lock().unwrap().clone()
    }
    /// A 2D resource of `w`×`h` with `w*h*4` bytes of backing at `gpa` (one entry).
    fn backed(&mut self, id: u32, w: u32, h: u32, gpa: u64) {
        self.ok(&Command::create_2d(id, XRGB, w, h));
        self.ok(&Command::attach_backing(id, &[(gpa, w * h * 4)]));
    }
}

/// Bytes of a test pattern: byte i is a hash of (seed, i).
fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ seed)
        .collect()
}

#[test]
fn a_pattern_travels_from_guest_ram_to_the_sink_byte_for_byte() {
    let mut r = rig();
    let (w, h) = (64u32, 32u32);
    let stride = (w * 4) as usize;
    let len = stride * h as usize;
    // Backing in three pieces, out of order in RAM (as a scatter list is): bytes
    // 0..3000 at +0x30000, 3000..5000 at +0x10000, the rest at +0x20000.
    let img = pattern(0x5a, len);
    let pieces = [
        (RAM_GPA + 0x30000, 0usize, 3000usize),
        (RAM_GPA + 0x10000, 3000, 2000),
        (RAM_GPA + 0x20000, 5000, len - 5000),
    ];
    for (gpa, at, n) in pieces {
        r.ram
            .write_slice(&img[at..at + n], GuestAddress(gpa))
            .unwrap();
    }
    r.ok(&Command::create_2d(1, XRGB, w, h));
    let entries: Vec<(u64, u32)> = pieces.iter().map(|&(g, _, n)| (g, n as u32)).collect();
    r.ok(&Command::attach_backing(1, &entries));
    assert_eq!(r.g.display().backing_len(1), Some(len as u64));
    r.ok(&Command::transfer_to_host_2d(1, Rect::new(0, 0, w, h), 0));
    assert_eq!(r.g.display().resource_bytes(1), Some(&img[..]));
    r.ok(&Command::set_scanout(0, 1, Rect::new(0, 0, w, h)));
    assert_eq!(r.g.display().scanout_resource(0), Some(1));
    assert!(r.frames().is_empty(), "no frame before a flush");
    r.ok(&Command::resource_flush(1, Rect::new(0, 0, w, h)));
    let seen = r.frames();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].bytes, img, "the sink saw the exact bytes");
    let want = FrameInfo {
        scanout_id: 0,
        resource_id: 1,
        rect: Rect::new(0, 0, w, h),
        scanout_rect: Rect::new(0, 0, w, h),
        format: Format::B8G8R8X8,
        width: w,
        height: h,
        stride: w * 4,
        offset: 0,
        seq: 1,
    };
    assert_eq!(seen[0].info, want);
    assert_eq!(r.g.display().latest_frame(0), Some(want));

    // A partial update: the guest changes a 16×8 rect at (8, 4) in its copy; the transfer
    // of that rect (offset = y × stride + x × 4, as Linux computes it) changes only it.
    let mut img2 = img.clone();
    let new = pattern(0xc3, len);
    for y in 4..12usize {
        let a = y * stride + 8 * 4;
        img2[a..a + 16 * 4].copy_from_slice(&new[a..a + 16 * 4]);
    }
    for (gpa, at, n) in pieces {
        r.ram
            .write_slice(&img2[at..at + n], GuestAddress(gpa))
            .unwrap();
    }
    let rect = Rect::new(8, 4, 16, 8);
    r.ok(&Command::transfer_to_host_2d(
        1,
        rect,
        (4 * stride + 8 * 4) as u64,
    ));
    r.ok(&Command::resource_flush(1, rect));
    let seen = r.frames();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[1].bytes, img2, "only the rect changed");
    assert_eq!((seen[1].info.rect, seen[1].info.seq), (rect, 2));
    assert_eq!(r.g.display().frames(0), 2);
    let st = r.g.display().stats();
    assert_eq!((st.flushes, st.frames, st.transfers), (2, 2, 2));
    assert_eq!(st.transferred_bytes, len as u64 + 16 * 4 * 8);
}

#[test]
fn create_2d_refusals() {
    let mut r = rig();
    use ErrorCode::*;
    r.err(&Command::create_2d(0, XRGB, 4, 4), InvalidResourceId);
    for f in [0, 5, 66, 100, 134 + 1, u32::MAX] {
        r.err(&Command::create_2d(1, f, 4, 4), InvalidParameter);
    }
    for (w, h) in [
        (0, 4),
        (4, 0),
        (0, 0),
        (MAX_2D_DIMENSION + 1, 1),
        (1, u32::MAX),
    ] {
        r.err(&Command::create_2d(1, XRGB, w, h), InvalidParameter);
    }
    // Every format served is 4 bytes a pixel.
    for (i, f) in Format::ALL.iter().enumerate() {
        r.ok(&Command::create_2d(10 + i as u32, f.to_u32(), 3, 5));
    }
    assert_eq!(r.g.display().bytes(), 8 * 3 * 5 * 4);
    r.err(&Command::create_2d(10, XRGB, 4, 4), InvalidResourceId);
    // A blob's id is taken for 2D resources, and a 2D resource's for blobs.
    r.ok(&Command::ctx_create(1, 0, b"t"));
    r.ok(&Command::create_blob(
        1,
        50,
        VIRTIO_GPU_BLOB_MEM_HOST3D,
        0,
        0,
        4096,
    ));
    r.err(&Command::create_2d(50, XRGB, 4, 4), InvalidResourceId);
    r.err(
        &Command::create_blob(1, 10, VIRTIO_GPU_BLOB_MEM_HOST3D, 0, 0, 4096),
        InvalidResourceId,
    );
    // The largest resource is within the dimensions but past the default budget.
    r.err(
        &Command::create_2d(2, XRGB, MAX_2D_DIMENSION, MAX_2D_DIMENSION),
        OutOfMemory,
    );
    r.g.display_mut().set_budget(1 << 20);
    r.ok(&Command::create_2d(3, XRGB, 256, 1020));
    r.err(&Command::create_2d(4, XRGB, 256, 4), OutOfMemory);
    // The shared budget counts blobs and 2D resources together.
    r.g.display_mut().set_budget(1 << 30);
    let live = 4096 + r.g.display().bytes();
    r.g.set_blob_budget(Some(live + 4096));
    r.ok(&Command::create_2d(5, XRGB, 32, 32));
    r.err(&Command::create_2d(6, XRGB, 1, 1), OutOfMemory);
    r.err(
        &Command::create_blob(1, 51, VIRTIO_GPU_BLOB_MEM_HOST3D, 0, 0, 4096),
        OutOfMemory,
    );
    assert_eq!(r.g.blob_memory().refused, 2);
    assert!(r.g.display().stats().budget_refusals >= 3);
    // Unref gives the memory back.
    r.ok(&Command::unref(5));
    r.ok(&Command::create_2d(6, XRGB, 1, 1));
}

#[test]
fn the_number_of_2d_resources_is_bounded() {
    let mut r = rig();
    for id in 1..=MAX_2D_RESOURCES as u32 {
        r.ok(&Command::create_2d(id, XRGB, 1, 1));
    }
    r.err(
        &Command::create_2d(MAX_2D_RESOURCES as u32 + 1, XRGB, 1, 1),
        ErrorCode::OutOfMemory,
    );
    r.ok(&Command::unref(1));
    r.ok(&Command::create_2d(MAX_2D_RESOURCES as u32 + 1, XRGB, 1, 1));
}

#[test]
fn attach_backing_refusals() {
    let mut r = rig();
    use ErrorCode::*;
    let ram_end = RAM_GPA + RAM_SIZE;
    r.err(
        &Command::attach_backing(1, &[(RAM_GPA, 64)]),
        InvalidResourceId,
    );
    r.ok(&Command::create_2d(1, XRGB, 4, 4));
    let bad: &[(&str, Vec<(u64, u32)>)] = &[
        ("no entries", vec![]),
        ("length 0", vec![(RAM_GPA, 0)]),
        ("wraps", vec![(u64::MAX - 10, 64)]),
        ("below RAM", vec![(0, 4096)]),
        ("straddles RAM's start", vec![(RAM_GPA - 16, 64)]),
        ("straddles RAM's end", vec![(ram_end - 16, 64)]),
        ("past RAM", vec![(ram_end, 64)]),
        ("in the window", vec![(WINDOW_GPA + 4096, 64)]),
        (
            "a good entry, then one outside",
            vec![(RAM_GPA, 64), (1 << 40, 64)],
        ),
    ];
    for (why, entries) in bad {
        r.err(&Command::attach_backing(1, entries), InvalidParameter);
        assert_eq!(
            r.g.display().backing_len(1),
            None,
            "{why}: nothing attached"
        );
    }
    // Too many entries.
    let many = vec![(RAM_GPA, 4u32); MAX_BACKING_ENTRIES + 1];
    r.err(&Command::attach_backing(1, &many), InvalidParameter);
    // A total past the bound, from entries that are each fine (the same 4 MiB, repeated).
    let big = vec![(RAM_GPA, RAM_SIZE as u32); 257];
    r.err(&Command::attach_backing(1, &big), InvalidParameter);
    // nr_entries beyond the message: the parser's refusal.
    let mut b = Command::attach_backing(1, &[(RAM_GPA, 64)]).encode();
    b[28..32].copy_from_slice(&2u32.to_le_bytes());
    let resp = Response::parse(&r.g.handle(&b)).unwrap();
    assert_eq!(resp.error(), Some(InvalidParameter));
    // The good case, then again (already attached: ERR_UNSPEC, as QEMU).
    let good = vec![(RAM_GPA, 32u32), (ram_end - 32, 32)];
    r.ok(&Command::attach_backing(1, &good));
    assert_eq!(r.g.display().backing_len(1), Some(64));
    r.err(&Command::attach_backing(1, &good), Unspec);
    // Detach: unknown resource, then twice.
    r.err(&Command::detach_backing(99), InvalidResourceId);
    r.ok(&Command::detach_backing(1));
    r.err(&Command::detach_backing(1), Unspec);
    assert_eq!(r.g.display().backing_len(1), None);
    r.ok(&Command::attach_backing(1, &good));
    // A blob is not a 2D resource.
    r.ok(&Command::ctx_create(1, 0, b"t"));
    r.ok(&Command::create_blob(
        1,
        7,
        VIRTIO_GPU_BLOB_MEM_HOST3D,
        0,
        0,
        4096,
    ));
    r.err(
        &Command::attach_backing(7, &[(RAM_GPA, 64)]),
        InvalidResourceId,
    );
    // Without guest memory nothing can be attached.
    r.g.set_guest_memory(None);
    r.ok(&Command::create_2d(2, XRGB, 4, 4));
    r.err(&Command::attach_backing(2, &[(RAM_GPA, 64)]), Unspec);
}

#[test]
fn backing_in_the_window_is_refused_even_where_the_memory_map_covers_it() {
    // A frontend's memory table can hold the window's placements as regions (QEMU adds one
    // per SHMEM_MAP): the exclusion refuses them all the same.
    let memfd = hostmem_base::shm::SharedMemory::new("ram-and-window", 2 * RAM_SIZE).unwrap();
    let regions = [
        GuestRegion {
            gpa: RAM_GPA,
            size: RAM_SIZE,
            fd_offset: 0,
        },
        GuestRegion {
            gpa: WINDOW_GPA,
            size: RAM_SIZE,
            fd_offset: RAM_SIZE,
        },
    ];
    let fds = vec![memfd.try_clone_fd().unwrap(), memfd.try_clone_fd().unwrap()];
    let mem = guest_memory(&regions, fds).unwrap();
    let mut g: TestGpu = Gpu::new(Box::new(ShmBackend::new()), NullPlacer);
    g.set_guest_memory(Some(mem));
    let send = |g: &mut TestGpu, c: &Command| Response::parse(&g.handle(&c.encode())).unwrap();
    assert!(send(&mut g, &Command::create_2d(1, XRGB, 4, 4))
        .error()
        .is_none());
    // Without the exclusion the window's region reads as RAM...
    assert!(
        send(&mut g, &Command::attach_backing(1, &[(WINDOW_GPA, 64)]))
            .error()
            .is_none()
    );
    assert!(send(&mut g, &Command::detach_backing(1)).error().is_none());
    // ...with it, every entry touching the window is refused, at its first or last byte.
    g.set_backing_exclusions(vec![(WINDOW_GPA, WINDOW)]);
    for (addr, len) in [
        (WINDOW_GPA, 64u32),
        (WINDOW_GPA + WINDOW - 1, 1),
        (WINDOW_GPA - 4096 + 4096, 4096),
    ] {
        let r = send(&mut g, &Command::attach_backing(1, &[(addr, len)]));
        assert_eq!(r.error(), Some(ErrorCode::InvalidParameter), "{addr:#x}");
    }
    let r = send(&mut g, &Command::attach_backing(1, &[(RAM_GPA, 64)]));
    assert!(r.error().is_none(), "RAM is still fine: {r:?}");
}

#[test]
fn transfer_refusals() {
    let mut r = rig();
    use ErrorCode::*;
    let full = Rect::new(0, 0, 16, 16);
    r.err(&Command::transfer_to_host_2d(1, full, 0), InvalidResourceId);
    r.ok(&Command::create_2d(1, XRGB, 16, 16));
    // No backing yet.
    r.err(&Command::transfer_to_host_2d(1, full, 0), Unspec);
    // Backing of 16 rows of 64 bytes.
    r.ok(&Command::attach_backing(1, &[(RAM_GPA, 16 * 64)]));
    r.ok(&Command::transfer_to_host_2d(1, full, 0));
    for rect in [
        Rect::new(0, 0, 17, 16),
        Rect::new(0, 0, 16, 17),
        Rect::new(1, 0, 16, 1),
        Rect::new(16, 16, 1, 1),
        // x + width and y + height wrap u32.
        Rect::new(u32::MAX - 1, 0, 4, 1),
        Rect::new(0, u32::MAX, 1, 2),
        Rect::new(u32::MAX, u32::MAX, u32::MAX, u32::MAX),
    ] {
        r.err(&Command::transfer_to_host_2d(1, rect, 0), InvalidParameter);
    }
    // The source past the backing: a big offset, one that wraps u64, the last row one byte
    // too far.
    for (rect, offset) in [
        (full, 1u64),
        (full, u64::MAX),
        (Rect::new(0, 15, 16, 1), u64::MAX - 10),
        (Rect::new(0, 0, 1, 16), 15 * 64 + 61),
    ] {
        r.err(
            &Command::transfer_to_host_2d(1, rect, offset),
            InvalidParameter,
        );
    }
    // The last pixel of the backing is fine; an empty rect copies nothing.
    r.ok(&Command::transfer_to_host_2d(
        1,
        Rect::new(0, 0, 1, 16),
        15 * 64 + 60 - 15 * 64,
    ));
    r.ok(&Command::transfer_to_host_2d(
        1,
        Rect::new(3, 3, 0, 5),
        u64::MAX,
    ));
    // A blob is not a 2D resource.
    r.ok(&Command::ctx_create(1, 0, b"t"));
    r.ok(&Command::create_blob(
        1,
        7,
        VIRTIO_GPU_BLOB_MEM_HOST3D,
        0,
        0,
        4096,
    ));
    r.err(&Command::transfer_to_host_2d(7, full, 0), InvalidResourceId);
}

#[test]
fn set_scanout_refusals() {
    let mut r = rig();
    use ErrorCode::*;
    r.backed(1, 32, 32, RAM_GPA);
    let rect = Rect::new(0, 0, 32, 32);
    for s in [1u32, 16, u32::MAX] {
        r.err(&Command::set_scanout(s, 1, rect), InvalidScanoutId);
        r.err(&Command::set_scanout(s, 0, rect), InvalidScanoutId);
    }
    r.err(&Command::set_scanout(0, 2, rect), InvalidResourceId);
    for bad in [
        Rect::new(0, 0, 0, 32),
        Rect::new(0, 0, 32, 0),
        Rect::new(0, 0, 33, 32),
        Rect::new(16, 16, 17, 16),
        Rect::new(u32::MAX, 0, 2, 2),
    ] {
        r.err(&Command::set_scanout(0, 1, bad), InvalidParameter);
    }
    assert_eq!(r.g.display().scanout_resource(0), None, "nothing was set");
    // A blob goes through SET_SCANOUT_BLOB.
    r.ok(&Command::ctx_create(1, 0, b"t"));
    r.ok(&Command::create_blob(
        1,
        7,
        VIRTIO_GPU_BLOB_MEM_HOST3D,
        0,
        0,
        4096,
    ));
    r.err(
        &Command::set_scanout(0, 7, Rect::new(0, 0, 16, 16)),
        InvalidResourceId,
    );
    // A sub-rect, then resource 0 disables.
    r.ok(&Command::set_scanout(0, 1, Rect::new(8, 8, 16, 16)));
    assert_eq!(r.g.display().scanout_resource(0), Some(1));
    r.ok(&Command::set_scanout(0, 0, Rect::default()));
    assert_eq!(r.g.display().scanout_resource(0), None);
    r.ok(&Command::resource_flush(1, rect));
    assert!(r.frames().is_empty(), "a disabled scanout records nothing");
}

#[test]
fn flush_refusals_and_resources_on_no_scanout() {
    let mut r = rig();
    use ErrorCode::*;
    r.err(
        &Command::resource_flush(1, Rect::new(0, 0, 1, 1)),
        InvalidResourceId,
    );
    r.backed(1, 32, 32, RAM_GPA);
    r.backed(2, 32, 32, RAM_GPA + 0x10000);
    for bad in [
        Rect::new(0, 0, 33, 1),
        Rect::new(31, 31, 2, 1),
        Rect::new(u32::MAX, u32::MAX, 2, 2),
    ] {
        r.err(&Command::resource_flush(1, bad), InvalidParameter);
    }
    // Resource 2 is on no scanout: answered OK, nothing recorded, counted.
    r.ok(&Command::resource_flush(2, Rect::new(0, 0, 32, 32)));
    assert!(r.frames().is_empty());
    assert_eq!(r.g.display().stats().off_scanout_flushes, 1);
    // Resource 1 shows its bottom-right quarter: a flush of the top-left quarter does not
    // meet it; one across the middle is cut to what the scanout shows.
    r.ok(&Command::set_scanout(0, 1, Rect::new(16, 16, 16, 16)));
    r.ok(&Command::resource_flush(1, Rect::new(0, 0, 16, 16)));
    assert!(r.frames().is_empty());
    assert_eq!(r.g.display().stats().off_scanout_flushes, 2);
    r.ok(&Command::resource_flush(1, Rect::new(8, 8, 16, 16)));
    let seen = r.frames();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].info.rect, Rect::new(16, 16, 8, 8));
    assert_eq!(seen[0].info.scanout_rect, Rect::new(16, 16, 16, 16));
    // An empty flush records nothing either.
    r.ok(&Command::resource_flush(1, Rect::new(20, 20, 0, 0)));
    assert_eq!(r.frames().len(), 1);
}

#[test]
fn two_scanouts_each_record_their_frames() {
    let mut r = rig_with(DisplayConfig::parse("800x600,640x480").unwrap());
    r.backed(1, 16, 16, RAM_GPA);
    r.ok(&Command::set_scanout(0, 1, Rect::new(0, 0, 16, 16)));
    r.ok(&Command::set_scanout(1, 1, Rect::new(0, 0, 8, 8)));
    r.err(
        &Command::set_scanout(2, 1, Rect::new(0, 0, 8, 8)),
        ErrorCode::InvalidScanoutId,
    );
    r.ok(&Command::resource_flush(1, Rect::new(0, 0, 16, 16)));
    let seen = r.frames();
    assert_eq!(seen.len(), 2);
    assert_eq!((seen[0].info.scanout_id, seen[0].info.rect.width), (0, 16));
    assert_eq!((seen[1].info.scanout_id, seen[1].info.rect.width), (1, 8));
    match r.send(&Command::get_display_info()) {
        Response::OkDisplayInfo { modes, .. } => {
            assert_eq!(
                (modes[0].width, modes[0].height, modes[0].enabled),
                (800, 600, 1)
            );
            assert_eq!(
                (modes[1].width, modes[1].height, modes[1].enabled),
                (640, 480, 1)
            );
            assert!(modes[2..].iter().all(|m| m.enabled == 0));
        }
        other => panic!("{other:?}"),
    }
    for (s, (w, h)) in [(0u32, (800, 600)), (1, (640, 480))] {
        match r.send(&Command::get_edid(s)) {
            Response::OkEdid { edid: e, .. } => {
                assert!(edid::valid(&e));
                assert_eq!(edid::preferred_mode(&e).map(|m| (m.0, m.1)), Some((w, h)));
                assert_eq!(u32::from_le_bytes(e[12..16].try_into().unwrap()), s + 1);
            }
            other => panic!("{other:?}"),
        }
    }
    r.err(&Command::get_edid(2), ErrorCode::InvalidScanoutId);
}

#[test]
fn get_edid_answers_a_valid_block_for_the_scanout() {
    let mut r = rig();
    let out = r.g.handle(&Command::get_edid(0).fenced(9).encode());
    assert_eq!(out.len(), RESP_EDID_SIZE, "virtio_gpu_resp_edid");
    assert_eq!(&out[24..28], &128u32.to_le_bytes(), "size");
    assert!(out[32 + 128..].iter().all(|b| *b == 0));
    match Response::parse(&out).unwrap() {
        Response::OkEdid { hdr, edid: e } => {
            assert_eq!((hdr.type_, hdr.fence_id), (VIRTIO_GPU_RESP_OK_EDID, 9));
            assert_eq!(e.len(), 128);
            assert!(edid::valid(&e));
            assert_eq!(
                edid::preferred_mode(&e).map(|m| (m.0, m.1)),
                Some((1024, 768))
            );
        }
        other => panic!("{other:?}"),
    }
    for s in [1u32, 16, u32::MAX] {
        r.err(&Command::get_edid(s), ErrorCode::InvalidScanoutId);
    }
}

#[test]
fn set_scanout_blob_shows_a_blob_and_its_refusals() {
    let mut r = rig();
    use ErrorCode::*;
    let size = 16 * 4096u64;
    r.ok(&Command::ctx_create(1, 0, b"t"));
    r.ok(&Command::create_blob(
        1,
        7,
        VIRTIO_GPU_BLOB_MEM_HOST3D,
        0,
        0,
        size,
    ));
    r.ok(&Command::submit_3d(
        1,
        encode_stream(&[ShmOp::Fill {
            resource_id: 7,
            offset: 0,
            len: size,
            seed: 0xb10b,
        }]),
    ));
    // 100×50 at stride 512 from offset 4096: ends at 4096 + 512 × 49 + 400 ≤ 64 KiB.
    let (w, h, stride, off) = (100u32, 50u32, 512u32, 4096u32);
    let sb =
        |s, id, f, (w, h), stride, off| Command::set_scanout_blob(s, id, f, (w, h), stride, off);
    r.err(&sb(1, 7, XRGB, (w, h), stride, off), InvalidScanoutId);
    r.err(&sb(0, 8, XRGB, (w, h), stride, off), InvalidResourceId);
    r.backed(2, 8, 8, RAM_GPA);
    r.err(&sb(0, 2, XRGB, (8, 8), 32, 0), InvalidResourceId);
    r.err(&sb(0, 7, 999, (w, h), stride, off), InvalidParameter);
    r.err(&sb(0, 7, XRGB, (0, h), stride, off), InvalidParameter);
    r.err(&sb(0, 7, XRGB, (w, 0), stride, off), InvalidParameter);
    r.err(&sb(0, 7, XRGB, (w, h), w * 4 - 1, off), InvalidParameter);
    // Past the blob: one byte too many, a huge stride, a huge offset.
    let last = (size - u64::from(stride) * 49 - 400) as u32;
    r.err(&sb(0, 7, XRGB, (w, h), stride, last + 1), InvalidParameter);
    r.err(&sb(0, 7, XRGB, (w, h), u32::MAX, 0), InvalidParameter);
    r.err(&sb(0, 7, XRGB, (w, h), stride, u32::MAX), InvalidParameter);
    r.err(
        &sb(
            0,
            7,
            XRGB,
            (MAX_2D_DIMENSION, MAX_2D_DIMENSION),
            u32::MAX,
            u32::MAX,
        ),
        InvalidParameter,
    );
    // A rect outside the framebuffer.
    let mut c = sb(0, 7, XRGB, (w, h), stride, off);
    if let Command::SetScanoutBlob(s) = &mut c {
        s.r = Rect::new(1, 0, w, h);
    }
    r.err(&c, InvalidParameter);
    assert_eq!(r.g.display().scanout_resource(0), None);
    // The last byte of the blob is fine.
    r.ok(&sb(0, 7, XRGB, (w, h), stride, last));
    r.ok(&sb(0, 7, XRGB, (w, h), stride, off));
    assert_eq!(r.g.display().scanout_resource(0), Some(7));
    // Flush: a rect outside the framebuffer, then the whole of it.
    r.err(
        &Command::resource_flush(7, Rect::new(0, 0, w + 1, h)),
        InvalidParameter,
    );
    r.ok(&Command::resource_flush(7, Rect::new(0, 0, w, h)));
    let seen = r.frames();
    assert_eq!(seen.len(), 1);
    let f = &seen[0];
    assert_eq!(
        (f.info.width, f.info.height, f.info.stride, f.info.offset),
        (w, h, stride, u64::from(off))
    );
    assert_eq!(
        f.bytes,
        pattern_bytes(0xb10b, 0, size as usize),
        "the blob's bytes"
    );
    // Unref of the blob disables the scanout.
    r.ok(&Command::unref(7));
    assert_eq!(r.g.display().scanout_resource(0), None);
    r.err(
        &Command::resource_flush(7, Rect::new(0, 0, 1, 1)),
        InvalidResourceId,
    );
}

#[test]
fn unref_releases_2d_resources_and_disables_their_scanouts() {
    let mut r = rig();
    r.backed(1, 64, 64, RAM_GPA);
    let bytes = r.g.display().bytes();
    assert_eq!(bytes, 64 * 64 * 4);
    r.ok(&Command::set_scanout(0, 1, Rect::new(0, 0, 64, 64)));
    // 2D resources can be attached to contexts (Linux does for every handle with virgl).
    r.ok(&Command::ctx_create(1, 0, b"t"));
    r.ok(&Command::ctx_attach_resource(1, 1));
    r.ok(&Command::ctx_detach_resource(1, 1));
    r.ok(&Command::unref(1));
    assert_eq!(r.g.display().scanout_resource(0), None);
    assert_eq!(r.g.display().bytes(), 0);
    assert_eq!(r.g.display().resources(), 0);
    r.err(&Command::unref(1), ErrorCode::InvalidResourceId);
    r.err(
        &Command::resource_flush(1, Rect::new(0, 0, 1, 1)),
        ErrorCode::InvalidResourceId,
    );
    r.err(
        &Command::transfer_to_host_2d(1, Rect::new(0, 0, 1, 1), 0),
        ErrorCode::InvalidResourceId,
    );
    // The id is free again, for either kind.
    r.ok(&Command::create_blob(
        1,
        1,
        VIRTIO_GPU_BLOB_MEM_HOST3D,
        0,
        0,
        4096,
    ));
}

#[test]
fn assign_uuid_is_stable_per_resource_and_distinct() {
    let mut r = rig();
    let uuid = |r: &mut Rig, id| match r.send(&Command::assign_uuid(id)) {
        Response::OkResourceUuid { uuid, .. } => uuid,
        other => panic!("{other:?}"),
    };
    r.err(&Command::assign_uuid(1), ErrorCode::InvalidResourceId);
    r.ok(&Command::create_2d(1, XRGB, 4, 4));
    r.ok(&Command::ctx_create(1, 0, b"t"));
    r.ok(&Command::create_blob(
        1,
        2,
        VIRTIO_GPU_BLOB_MEM_HOST3D,
        0,
        0,
        4096,
    ));
    let a = uuid(&mut r, 1);
    let b = uuid(&mut r, 2);
    assert_ne!(a, b);
    assert_eq!(uuid(&mut r, 1), a, "the same resource keeps its UUID");
    for u in [a, b] {
        assert_eq!(u[6] >> 4, 4);
    }
    let out = r.g.handle(&Command::assign_uuid(2).encode());
    assert_eq!(out.len(), RESP_RESOURCE_UUID_SIZE);
    r.ok(&Command::unref(1));
    r.ok(&Command::create_2d(1, XRGB, 4, 4));
    assert_ne!(
        uuid(&mut r, 1),
        a,
        "a new resource under an old id gets a new UUID"
    );
}

#[test]
fn the_cursor_takes_64x64_2d_resources_only() {
    let mut r = rig();
    let n = CURSOR_SIZE;
    let img = pattern(0x77, (n * n * 4) as usize);
    r.ram.write_slice(&img, GuestAddress(RAM_GPA)).unwrap();
    r.backed(1, n, n, RAM_GPA);
    r.ok(&Command::transfer_to_host_2d(1, Rect::new(0, 0, n, n), 0));
    r.backed(2, 32, 32, RAM_GPA);
    r.backed(3, 64, 32, RAM_GPA);
    let cursor = |r: &mut Rig, c: &Command| r.g.cursor(&c.encode());
    cursor(&mut r, &Command::update_cursor(0, (100, 200), 1, (3, 4)));
    let c = r.g.display().cursor().clone();
    assert_eq!(
        (c.x, c.y, c.resource_id, c.hot_x, c.hot_y),
        (100, 200, 1, 3, 4)
    );
    assert_eq!(c.image, img);
    assert_eq!(c.format, Some(Format::B8G8R8X8));
    // Refused: wrong sizes, unknown resource, scanout out of range, hot spot outside.
    let refused = [
        Command::update_cursor(0, (1, 1), 2, (0, 0)),
        Command::update_cursor(0, (1, 1), 3, (0, 0)),
        Command::update_cursor(0, (1, 1), 99, (0, 0)),
        Command::update_cursor(1, (1, 1), 1, (0, 0)),
        Command::update_cursor(0, (1, 1), 1, (64, 0)),
        Command::move_cursor(5, (1, 1)),
    ];
    for cmd in &refused {
        cursor(&mut r, cmd);
    }
    assert_eq!(r.g.display().cursor(), &c, "nothing changed");
    assert_eq!(r.g.display().stats().cursor_refusals, refused.len() as u64);
    // Not a cursor command, and truncated bytes: refused and counted too.
    cursor(&mut r, &Command::get_display_info());
    r.g.cursor(&Command::move_cursor(0, (1, 1)).encode()[..40]);
    assert_eq!(
        r.g.display().stats().cursor_refusals,
        refused.len() as u64 + 2
    );
    // A move changes the position only; resource 0 hides.
    cursor(&mut r, &Command::move_cursor(0, (5, 6)));
    let m = r.g.display().cursor().clone();
    assert_eq!((m.x, m.y, m.resource_id, m.moves), (5, 6, 1, 1));
    assert_eq!(m.image, img);
    cursor(&mut r, &Command::update_cursor(0, (0, 0), 0, (0, 0)));
    let h = r.g.display().cursor().clone();
    assert_eq!((h.resource_id, h.image.len(), h.format), (0, 0, None));
    assert_eq!(
        r.rec.cursors.lock().unwrap().len(),
        3,
        "the sink saw each change"
    );
    // On the control queue a cursor command is ERR_UNSPEC.
    r.err(&Command::move_cursor(0, (1, 1)), ErrorCode::Unspec);
}

#[test]
fn reset_drops_the_display_state_but_keeps_the_scanouts() {
    let mut r = rig();
    r.backed(1, 16, 16, RAM_GPA);
    r.ok(&Command::set_scanout(0, 1, Rect::new(0, 0, 16, 16)));
    r.ok(&Command::resource_flush(1, Rect::new(0, 0, 16, 16)));
    r.g.cursor(&Command::move_cursor(0, (3, 3)).encode());
    r.g.reset_all();
    assert_eq!(r.g.display().resources(), 0);
    assert_eq!(r.g.display().bytes(), 0);
    assert_eq!(r.g.display().scanout_resource(0), None);
    assert_eq!(r.g.display().latest_frame(0), None);
    assert_eq!(r.g.display().cursor().x, 0);
    assert_eq!(r.g.display().num_scanouts(), 1);
    r.backed(1, 16, 16, RAM_GPA);
}

#[test]
fn random_display_commands_never_panic_and_keep_the_books() {
    let mut r = rig_with(DisplayConfig::parse("64x64,32x32").unwrap());
    r.g.display_mut().set_budget(1 << 20);
    r.ok(&Command::ctx_create(1, 0, b"t"));
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let edge = [
        0u32,
        1,
        2,
        15,
        16,
        31,
        32,
        63,
        64,
        65,
        4096,
        u32::MAX - 1,
        u32::MAX,
    ];
    // Mostly small values (so commands also succeed), one time in eight an edge value.
    let mut pick = |n: u64| -> u32 {
        let v = next();
        if v % 8 == 0 {
            edge[(v as usize / 8) % edge.len()]
        } else {
            ((v >> 8) % n) as u32
        }
    };
    for i in 0..20_000u32 {
        let id = pick(8);
        let rect = Rect::new(pick(40), pick(40), pick(64), pick(64));
        let cmd = match i % 12 {
            0 => Command::create_2d(
                id,
                [XRGB, 1, 67, 0, 999][pick(5) as usize % 5],
                pick(80),
                pick(80),
            ),
            1 => {
                let n = pick(4) as usize % 4;
                let e: Vec<(u64, u32)> = (0..n)
                    .map(|_| {
                        let base = [RAM_GPA, RAM_GPA, 0, WINDOW_GPA, RAM_GPA + RAM_SIZE - 64];
                        (
                            base[pick(5) as usize % 5].wrapping_add(u64::from(pick(8192))),
                            pick(40_000),
                        )
                    })
                    .collect();
                Command::attach_backing(id, &e)
            }
            2 => Command::detach_backing(id),
            3 => Command::transfer_to_host_2d(id, rect, u64::from(pick(4096))),
            4 => Command::set_scanout(pick(3), id, rect),
            5 | 6 => Command::resource_flush(id, rect),
            7 => {
                if pick(4) == 0 {
                    Command::unref(id)
                } else {
                    Command::assign_uuid(id)
                }
            }
            8 => Command::get_edid(pick(3)),
            9 => Command::create_blob(
                1,
                id,
                VIRTIO_GPU_BLOB_MEM_HOST3D,
                0,
                0,
                4096 * u64::from(pick(4)),
            ),
            10 => Command::set_scanout_blob(
                pick(3),
                id,
                XRGB,
                (pick(80), pick(80)),
                pick(600),
                pick(9000),
            ),
            _ => {
                let c =
                    Command::update_cursor(pick(3), (pick(9), pick(9)), id, (pick(70), pick(70)));
                r.g.cursor(&c.encode());
                continue;
            }
        };
        let out = r.g.handle(&cmd.encode());
        Response::parse(&out).expect("a response");
        // The books: the display's bytes are its resources' bytes, within its budget.
        assert!(r.g.display().bytes() <= 1 << 20);
        for s in 0..2 {
            if let Some(id) = r.g.display().scanout_resource(s) {
                assert!(
                    r.g.display().has_resource(id) || r.g.blob(id).is_some(),
                    "scanout {s} shows {id}, which is gone"
                );
            }
        }
    }
    let mut ids: Vec<u32> = (0..80u32).chain(edge).collect();
    ids.sort_unstable();
    ids.dedup();
    let total: u64 = ids
        .into_iter()
        .filter_map(|id| r.g.display().resource_bytes(id).map(|b| b.len() as u64))
        .sum();
    assert_eq!(total, r.g.display().bytes());
    // The loop reached the commands' success paths too, not only their refusals.
    let st = r.g.display().stats();
    assert!(
        st.transfers > 0 && st.flushes > 0 && st.frames > 0,
        "{st:?}"
    );
}
