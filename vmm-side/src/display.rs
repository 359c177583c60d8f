//! The supervisor's end of the display (issue 26, part 2), shared by `hostmem run` (frames
//! come on the mapping tube, `service.rs`) and `hostmem vhost-user` (on the control tube):
//! every [`FrameMsg`] is checked like any placement event before a byte is read
//! ([`check_frame`]), its pixels are copied out with `pread` (no mapping, nothing of the
//! device's stays), and the latest frame per scanout is kept ([`Frames`]), across device
//! restarts. [`write_png`] writes one as PNG (`--screenshot`).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use hostmem_base::log_limit::LogLimiter;
use hostmem_base::shm::FileFacts;
use hostmem_ipc::protocol::{CursorMsg, FrameMsg};
use serde::Serialize;

/// Refused frames: logged the 1st, 2nd, 4th, … time of each kind, all counted.
pub static FRAME_WARNINGS: LogLimiter = LogLimiter::new("hostmem_vmm::display");

/// Largest width or height of a frame (the device's `MAX_2D_DIMENSION`).
pub const MAX_DIMENSION: u32 = 16384;
/// Most scanouts (virtio-gpu's `VIRTIO_GPU_MAX_SCANOUTS`).
pub const MAX_SCANOUTS: u32 = 16;
/// Most pixel bytes one kept frame may have (a 4096×4096 framebuffer): what a device can
/// make the supervisor hold per scanout.
pub const MAX_FRAME_BYTES: u64 = 64 << 20;
/// Most pixel bytes all kept frames together may have: 16 scanouts of the largest frame
/// would be 1 GiB of the supervisor's memory, at the device's word.
pub const MAX_KEPT_BYTES: u64 = 128 << 20;

pub use hostmem_ipc::pixel::PixelFormat;

/// A frame the supervisor keeps: what the device said, and the pixels copied out of its
/// fd, `width × 4` bytes a row, no padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptFrame {
    /// The message (as checked).
    pub msg: FrameMsg,
    /// Its format.
    pub format: PixelFormat,
    /// The pixels, row 0 first.
    pub pixels: Vec<u8>,
}

impl KeptFrame {
    /// The frame as RGBA, row 0 first.
    pub fn to_rgba(&self) -> Vec<u8> {
        self.pixels
            .chunks_exact(4)
            .flat_map(|p| self.format.to_rgba([p[0], p[1], p[2], p[3]]))
            .collect()
    }
}

/// Why a frame was refused, before anything was read: `None` when it passes. `facts`: the
/// fd's ([`hostmem_base::shm::mapping_facts`]); `given`: what the fd is if the VMM gave it
/// to the device (the window, guest RAM: [`crate::hostmem::Hostmem::given_as`]).
pub fn check_frame(msg: &FrameMsg, facts: &FileFacts, given: Option<&str>) -> Option<String> {
    if !facts.is_regular() {
        return Some(format!("fd is not a regular file (mode {:#o})", facts.mode));
    }
    if let Some(what) = given {
        return Some(format!(
            "fd is the VMM's own {what}: no fd the VMM gave the device is taken as a frame"
        ));
    }
    if msg.scanout_id >= MAX_SCANOUTS {
        return Some(format!("scanout {}", msg.scanout_id));
    }
    if PixelFormat::from_u32(msg.format).is_none() {
        return Some(format!("format {} unknown", msg.format));
    }
    let dims = 1..=MAX_DIMENSION;
    if !dims.contains(&msg.width) || !dims.contains(&msg.height) {
        return Some(format!("size {}x{}", msg.width, msg.height));
    }
    let row = u64::from(msg.width) * 4;
    let stride = u64::from(msg.stride);
    if stride < row {
        return Some(format!("stride {stride} < {row} bytes of a row"));
    }
    if row * u64::from(msg.height) > MAX_FRAME_BYTES {
        return Some(format!(
            "{}x{} is more than the {MAX_FRAME_BYTES} bytes a kept frame may have",
            msg.width, msg.height
        ));
    }
    let end = stride
        .checked_mul(u64::from(msg.height) - 1)
        .and_then(|v| v.checked_add(row))
        .and_then(|v| v.checked_add(msg.offset));
    match end {
        Some(end) if end <= facts.size => {}
        _ => {
            return Some(format!(
                "framebuffer at {:#x}, {} rows of {stride}: past the fd's {} bytes",
                msg.offset, msg.height, facts.size
            ))
        }
    }
    let [x, y, w, h] = msg.rect.map(u64::from);
    if x + w > u64::from(msg.width) || y + h > u64::from(msg.height) {
        return Some(format!(
            "rect {:?} outside {}x{}",
            msg.rect, msg.width, msg.height
        ));
    }
    let seals = facts.seals.unwrap_or(0);
    if seals & libc::F_SEAL_SHRINK == 0 {
        return Some("fd is not sealed against shrinking (F_SEAL_SHRINK)".into());
    }
    if !msg.blob && !facts.write_sealed() {
        return Some(format!(
            "a 2D frame's memfd is not sealed against writes (seals {seals:#x})"
        ));
    }
    None
}

/// Reads `msg`'s framebuffer out of `fd` (checked by [`check_frame`]) row by row.
pub fn read_frame(msg: &FrameMsg, fd: BorrowedFd<'_>) -> Result<Vec<u8>, String> {
    let row = usize::try_from(msg.width).map_err(|e| e.to_string())? * 4;
    let height = usize::try_from(msg.height).map_err(|e| e.to_string())?;
    let mut out = vec![0u8; row * height];
    for (y, dst) in out.chunks_exact_mut(row).enumerate() {
        let at = msg
            .offset
            .checked_add(u64::from(msg.stride) * y as u64)
            .and_then(|v| i64::try_from(v).ok())
            .ok_or("row offset overflows")?;
        let mut done = 0usize;
        while let Some(rest) = dst.get_mut(done..).filter(|r| !r.is_empty()) {
            match nix::sys::uio::pread(fd, rest, at + done as i64) {
                Ok(0) => return Err(format!("row {y}: the fd ended early")),
                Ok(n) => done += n,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(format!("row {y}: pread: {e}")),
            }
        }
    }
    Ok(out)
}

/// What `hostmem run --json` and the vhost-user stop line report of the display.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DisplayReport {
    /// Frames accepted.
    pub frames: u64,
    /// Frames refused.
    pub refused: u64,
    /// Refusals by kind.
    pub refusals: BTreeMap<String, u64>,
    /// Scanout 0's latest frame's width (0: none yet).
    pub width: u32,
    /// Its height.
    pub height: u32,
    /// Its format.
    pub format: Option<PixelFormat>,
    /// Its frame counter, as the device numbered it.
    pub seq: u64,
    /// Cursor updates accepted.
    pub cursor_updates: u64,
    /// The last cursor the device reported (position, image's resource, hot spot, image
    /// hash).
    pub cursor: Option<CursorMsg>,
    /// Screenshots written.
    pub screenshots: u64,
    /// Frames the guest's pattern check found wrong (`hostmem run`; `None`: not checked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mismatches: Option<u64>,
    /// Fields of the last cursor (scanout, x, y, resource, hot spot, image hash) that are
    /// not what the guest driver sent (`hostmem run`; `None`: not checked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor_mismatches: Option<u64>,
    /// Pixels of the blob frame the driver showed on scanout 0 (`SET_SCANOUT_BLOB`) that
    /// are not the blob's bytes (`hostmem run`; `None`: not checked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blob_scanout_mismatches: Option<u64>,
}

#[derive(Debug, Default)]
struct State {
    latest: BTreeMap<u32, KeptFrame>,
    /// Scanout 0's latest frame of a blob once a 2D frame replaced it there (what `hostmem
    /// run`'s blob-scanout check reads): one more kept frame at most, within
    /// [`MAX_KEPT_BYTES`] with the others.
    latest_blob0: Option<KeptFrame>,
    frames: u64,
    refused: u64,
    refusals: BTreeMap<String, u64>,
    cursor: Option<CursorMsg>,
    cursor_updates: u64,
    screenshots: u64,
}

impl State {
    /// The bytes `latest_blob0` holds once `msg` is kept (a 2D frame on scanout 0 moves a
    /// blob frame shown there into it; a blob frame there empties it).
    fn blob0_after(&self, msg: &FrameMsg) -> u64 {
        let len = |f: Option<&KeptFrame>| f.map_or(0, |f| f.pixels.len() as u64);
        match (msg.scanout_id, msg.blob) {
            (0, true) => 0,
            (0, false) => match self.latest.get(&0) {
                Some(f) if f.msg.blob => len(Some(f)),
                _ => len(self.latest_blob0.as_ref()),
            },
            _ => len(self.latest_blob0.as_ref()),
        }
    }
}

/// The latest frame per scanout and the counters; clones share them (the receiving thread
/// and the supervisor), and they outlive any one device.
#[derive(Debug, Clone, Default)]
pub struct Frames(Arc<Mutex<State>>);

/// Most refusal kinds counted by name.
const MAX_KINDS: usize = 32;

impl Frames {
    /// Nothing kept yet.
    pub fn new() -> Frames {
        Frames::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refuse(&self, kind: &'static str, why: &str) {
        let mut st = self.lock();
        st.refused += 1;
        if st.refusals.len() < MAX_KINDS || st.refusals.contains_key(kind) {
            *st.refusals.entry(kind.to_string()).or_default() += 1;
        }
        drop(st);
        FRAME_WARNINGS.warn(kind, format_args!("display: frame refused: {why}"));
    }

    /// A [`FrameMsg`] and the fds that came with it: checked, copied out and kept as its
    /// scanout's latest, or refused (logged, counted). `given` names a file the VMM gave
    /// the device (by `(st_dev, st_ino)`).
    pub fn receive(
        &self,
        msg: &FrameMsg,
        mut fds: Vec<OwnedFd>,
        given: &dyn Fn((u64, u64)) -> Option<&'static str>,
    ) -> bool {
        let Some(fd) = fds.pop().filter(|_| fds.is_empty()) else {
            self.refuse("frame without one fd", "a frame needs exactly one fd");
            return false;
        };
        let facts = match hostmem_base::shm::mapping_facts(fd.as_fd()) {
            Ok(f) => f,
            Err(e) => {
                self.refuse("frame fd unreadable", &format!("fstat: {e}"));
                return false;
            }
        };
        if let Some(why) = check_frame(msg, &facts, given(facts.id)) {
            self.refuse("frame invalid", &why);
            return false;
        }
        let Some(format) = PixelFormat::from_u32(msg.format) else {
            return false;
        };
        let bytes = u64::from(msg.width) * 4 * u64::from(msg.height);
        let others: u64 = {
            let st = self.lock();
            let kept: u64 = st
                .latest
                .iter()
                .filter(|(id, _)| **id != msg.scanout_id)
                .map(|(_, f)| f.pixels.len() as u64)
                .sum();
            kept + st.blob0_after(msg)
        };
        if others + bytes > MAX_KEPT_BYTES {
            self.refuse(
                "frames past the kept bound",
                &format!(
                    "scanout {}: {bytes} bytes with {others} kept for other scanouts is more than {MAX_KEPT_BYTES}",
                    msg.scanout_id
                ),
            );
            return false;
        }
        let pixels = match read_frame(msg, fd.as_fd()) {
            Ok(p) => p,
            Err(why) => {
                self.refuse("frame unreadable", &why);
                return false;
            }
        };
        let kept = KeptFrame {
            msg: *msg,
            format,
            pixels,
        };
        let mut st = self.lock();
        st.frames += 1;
        let old = st.latest.insert(msg.scanout_id, kept);
        if msg.scanout_id == 0 {
            if msg.blob {
                st.latest_blob0 = None;
            } else if let Some(old) = old.filter(|f| f.msg.blob) {
                st.latest_blob0 = Some(old);
            }
        }
        true
    }

    /// A [`CursorMsg`] (checked: a scanout in range).
    pub fn cursor(&self, msg: &CursorMsg) {
        if msg.scanout_id >= MAX_SCANOUTS {
            self.refuse("cursor invalid", &format!("scanout {}", msg.scanout_id));
            return;
        }
        let mut st = self.lock();
        st.cursor_updates += 1;
        st.cursor = Some(*msg);
    }

    /// The latest frame of `scanout`.
    pub fn latest(&self, scanout: u32) -> Option<KeptFrame> {
        self.lock().latest.get(&scanout).cloned()
    }

    /// Scanout 0's latest frame that showed a blob (`SET_SCANOUT_BLOB`), even if a 2D
    /// frame came after it.
    pub fn latest_blob0(&self) -> Option<KeptFrame> {
        let st = self.lock();
        match st.latest.get(&0) {
            Some(f) if f.msg.blob => Some(f.clone()),
            _ => st.latest_blob0.clone(),
        }
    }

    /// The counters and scanout 0's latest frame's shape.
    pub fn report(&self) -> DisplayReport {
        let st = self.lock();
        let f0 = st.latest.get(&0);
        DisplayReport {
            frames: st.frames,
            refused: st.refused,
            refusals: st.refusals.clone(),
            width: f0.map_or(0, |f| f.msg.width),
            height: f0.map_or(0, |f| f.msg.height),
            format: f0.map(|f| f.format),
            seq: f0.map_or(0, |f| f.msg.seq),
            cursor_updates: st.cursor_updates,
            cursor: st.cursor,
            screenshots: st.screenshots,
            mismatches: None,
            cursor_mismatches: None,
            blob_scanout_mismatches: None,
        }
    }

    /// Writes scanout 0's latest frame to `path` as PNG: `Ok(false)` when there is none.
    pub fn screenshot(&self, path: &Path) -> anyhow::Result<bool> {
        let Some(frame) = self.latest(0) else {
            return Ok(false);
        };
        write_png(path, &frame)?;
        self.lock().screenshots += 1;
        Ok(true)
    }
}

/// Writes `frame` to `path` as an 8-bit RGBA PNG (through a temporary file renamed into
/// place, so a reader never sees half a picture).
pub fn write_png(path: &Path, frame: &KeptFrame) -> anyhow::Result<()> {
    use anyhow::Context;
    let tmp = path.with_extension("png.tmp");
    let file = std::fs::File::create(&tmp).with_context(|| format!("{}", tmp.display()))?;
    let mut enc = png::Encoder::new(
        std::io::BufWriter::new(file),
        frame.msg.width,
        frame.msg.height,
    );
    enc.set_color(png::ColorType::Rgba);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header()?;
    w.write_image_data(&frame.to_rgba())?;
    w.finish()?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostmem_base::shm::SharedMemory;

    fn msg(width: u32, height: u32) -> FrameMsg {
        FrameMsg {
            scanout_id: 0,
            resource_id: 1,
            width,
            height,
            stride: width * 4,
            format: 2,
            offset: 0,
            rect: [0, 0, width, height],
            seq: 1,
            blob: false,
        }
    }

    fn sealed_facts(size: u64) -> FileFacts {
        FileFacts {
            size,
            mode: libc::S_IFREG | 0o600,
            seals: Some(
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL,
            ),
            ..FileFacts::default()
        }
    }

    #[test]
    fn every_refusal_of_the_frame_check() {
        let good = msg(4, 3);
        let facts = sealed_facts(48);
        assert_eq!(check_frame(&good, &facts, None), None);
        let refused = |m: FrameMsg, f: FileFacts, given: Option<&str>, word: &str| {
            let why = check_frame(&m, &f, given).expect("refused");
            assert!(why.contains(word), "{word}: {why}");
        };
        let socket = FileFacts {
            mode: libc::S_IFSOCK | 0o600,
            ..facts
        };
        refused(good, socket, None, "regular");
        refused(good, facts, Some("guest RAM"), "guest RAM");
        refused(
            FrameMsg {
                scanout_id: 16,
                ..good
            },
            facts,
            None,
            "scanout",
        );
        refused(FrameMsg { format: 5, ..good }, facts, None, "format");
        refused(FrameMsg { width: 0, ..good }, facts, None, "size");
        refused(
            FrameMsg {
                height: 16385,
                ..good
            },
            facts,
            None,
            "size",
        );
        refused(FrameMsg { stride: 15, ..good }, facts, None, "stride");
        refused(
            FrameMsg {
                width: 16384,
                height: 16384,
                stride: 65536,
                ..good
            },
            FileFacts {
                size: u64::MAX,
                ..facts
            },
            None,
            "more than",
        );
        // Short by one byte; an offset that wraps.
        refused(good, sealed_facts(47), None, "past");
        refused(FrameMsg { offset: 1, ..good }, facts, None, "past");
        refused(
            FrameMsg {
                offset: u64::MAX - 10,
                ..good
            },
            facts,
            None,
            "past",
        );
        // A stride that is not the row: the last row needs only width × 4 bytes.
        let padded = FrameMsg { stride: 20, ..good };
        assert_eq!(check_frame(&padded, &sealed_facts(56), None), None);
        refused(padded, sealed_facts(55), None, "past");
        refused(
            FrameMsg {
                rect: [1, 0, 4, 3],
                ..good
            },
            facts,
            None,
            "rect",
        );
        refused(
            FrameMsg {
                rect: [u32::MAX, 0, 2, 1],
                ..good
            },
            facts,
            None,
            "rect",
        );
        let unsealed = FileFacts {
            seals: Some(0),
            ..facts
        };
        refused(good, unsealed, None, "shrinking");
        refused(
            FrameMsg { blob: true, ..good },
            FileFacts {
                seals: None,
                ..facts
            },
            None,
            "shrinking",
        );
        let writable = FileFacts {
            seals: Some(libc::F_SEAL_SHRINK | libc::F_SEAL_GROW),
            ..facts
        };
        refused(good, writable, None, "writes");
        // A blob the guest writes to is not write-sealed: taken (copied out at once).
        assert_eq!(
            check_frame(&FrameMsg { blob: true, ..good }, &writable, None),
            None
        );
    }

    #[test]
    fn formats_convert_by_virtio_gpu_byte_order() {
        let px = [0x11, 0x22, 0x33, 0x44];
        let cases = [
            (1, [0x33, 0x22, 0x11, 0x44]),
            (2, [0x33, 0x22, 0x11, 0xff]),
            (3, [0x22, 0x33, 0x44, 0x11]),
            (4, [0x22, 0x33, 0x44, 0xff]),
            (67, [0x11, 0x22, 0x33, 0x44]),
            (68, [0x44, 0x33, 0x22, 0xff]),
            (121, [0x44, 0x33, 0x22, 0x11]),
            (134, [0x11, 0x22, 0x33, 0xff]),
        ];
        for (v, want) in cases {
            let f = PixelFormat::from_u32(v).unwrap();
            assert_eq!(f.to_rgba(px), want, "{f:?}");
        }
        assert!(PixelFormat::from_u32(0).is_none());
    }

    #[test]
    fn kept_frames_together_stay_under_their_bound() {
        // 4096x4096 frames are 64 MiB each: two scanouts fit, the third does not; a new
        // frame for a scanout already kept replaces it within the bound.
        let side = 4096u32;
        let shm = || {
            let s = SharedMemory::new("big", u64::from(side) * 4 * u64::from(side)).unwrap();
            s.seal_size().unwrap();
            s.into_fd()
        };
        // A blob scanout: the size seals are what it needs.
        let on = |id| FrameMsg {
            scanout_id: id,
            blob: true,
            ..msg(side, side)
        };
        let frames = Frames::new();
        assert!(frames.receive(&on(0), vec![shm()], &|_| None));
        assert!(frames.receive(&on(1), vec![shm()], &|_| None));
        assert!(
            !frames.receive(&on(2), vec![shm()], &|_| None),
            "past 128 MiB"
        );
        assert!(
            frames.receive(&on(1), vec![shm()], &|_| None),
            "a replacement"
        );
        let r = frames.report();
        assert_eq!((r.frames, r.refused), (3, 1));
        assert_eq!(r.refusals.get("frames past the kept bound"), Some(&1));
    }

    #[test]
    fn a_kept_frame_is_the_fds_bytes_and_its_png_decodes_to_them() {
        // 3x2, stride 16 (4 bytes of padding a row), at offset 8.
        let mut bytes = vec![0xeeu8; 8 + 16 * 2];
        for y in 0..2 {
            for x in 0..12 {
                bytes[8 + y * 16 + x] = (y * 12 + x) as u8;
            }
        }
        let shm = SharedMemory::frozen_copy("frame", &bytes).unwrap();
        let m = FrameMsg {
            width: 3,
            height: 2,
            stride: 16,
            offset: 8,
            rect: [0, 0, 3, 2],
            format: 67,
            ..msg(3, 2)
        };
        let frames = Frames::new();
        assert!(frames.receive(&m, vec![shm.into_fd()], &|_| None));
        let kept = frames.latest(0).unwrap();
        let want: Vec<u8> = (0..24).collect();
        assert_eq!(kept.pixels, want);
        let dir = std::env::temp_dir().join(format!("hostmem-png-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("shot.png");
        assert!(frames.screenshot(&path).unwrap());
        let dec = png::Decoder::new(std::fs::File::open(&path).unwrap());
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (3, 2));
        assert_eq!(&buf[..info.buffer_size()], &want[..]);
        let _ = std::fs::remove_dir_all(&dir);
        // An unsealed memfd, an fd the VMM gave, no fd: refused and counted.
        let loose = SharedMemory::new("loose", 64).unwrap();
        assert!(!frames.receive(&m, vec![loose.into_fd()], &|_| None));
        let given = SharedMemory::frozen_copy("given", &bytes).unwrap();
        assert!(!frames.receive(&m, vec![given.into_fd()], &|_| Some("guest RAM")));
        assert!(!frames.receive(&m, vec![], &|_| None));
        let r = frames.report();
        assert_eq!((r.frames, r.refused, r.width, r.height), (1, 3, 3, 2));
        assert_eq!(r.screenshots, 1);
    }
}
