//! The display half of the device (virtio 1.2 §5.7): scanouts, 2D resources with their
//! guest-RAM backing, the cursor, and where a flushed frame goes ([`FrameSink`]).
//!
//! The command handler ([`crate::gpu::Gpu`]) owns a [`Display`] and hands it the display
//! commands; blobs stay in the handler's table (resource ids are device-global, so a 2D
//! resource and a blob never share an id: both creations check the other table). 2D
//! resources live here, in host memory of this process, whatever the renderer backend:
//! shm and virgl serve the same display.
//!
//! # Rules (every refusal is an error response, never a panic)
//!
//! * Scanouts: [`DisplayConfig`] (1 by default, 1024×768; at most
//!   [`VIRTIO_GPU_MAX_SCANOUTS`](crate::wire::VIRTIO_GPU_MAX_SCANOUTS)), all enabled in `GET_DISPLAY_INFO`. A scanout id at or
//!   past their number is `ERR_INVALID_SCANOUT_ID` (`SET_SCANOUT`, `SET_SCANOUT_BLOB`,
//!   `GET_EDID`; logged only on the cursor queue, which has no responses).
//! * `RESOURCE_CREATE_2D`: id non-zero and unused (`ERR_INVALID_RESOURCE_ID`); format one
//!   of [`Format`] (4 bytes a pixel), width and height in 1 ..= [`MAX_2D_DIMENSION`]
//!   (`ERR_INVALID_PARAMETER`); at most [`MAX_2D_RESOURCES`] and the bytes of all of them
//!   within the display budget ([`DEFAULT_2D_BUDGET`]) and within the handler's shared
//!   memory budget (`ERR_OUT_OF_MEMORY`); an allocation that fails is `ERR_OUT_OF_MEMORY`.
//! * `RESOURCE_ATTACH_BACKING`: a 2D resource (`ERR_INVALID_RESOURCE_ID`) without backing
//!   (`ERR_UNSPEC`, as QEMU); 1 ..= [`MAX_BACKING_ENTRIES`] entries, each of non-zero
//!   length, `addr + length` not wrapping, outside every excluded range (the hostmem
//!   window) and inside guest RAM; their total at most [`MAX_BACKING_BYTES`]
//!   (`ERR_INVALID_PARAMETER`); no guest RAM yet is `ERR_UNSPEC`. The entries are kept as
//!   guest addresses and read at transfer time (a read that fails then is `ERR_UNSPEC`).
//!   `RESOURCE_DETACH_BACKING`: a 2D resource with backing (`ERR_INVALID_RESOURCE_ID`,
//!   `ERR_UNSPEC`).
//! * `TRANSFER_TO_HOST_2D`: a 2D resource with backing; the rect inside the resource;
//!   the source `offset + stride × (height − 1) + width × 4` inside the backing, with
//!   `stride = resource width × 4` (checked arithmetic, `ERR_INVALID_PARAMETER`). An empty
//!   rect copies nothing.
//! * `SET_SCANOUT`: resource 0 disables the scanout; otherwise a 2D resource (a blob is
//!   `ERR_INVALID_RESOURCE_ID`: it takes `SET_SCANOUT_BLOB`) and a non-empty rect inside it.
//! * `SET_SCANOUT_BLOB`: resource 0 disables; otherwise a blob, a known format, width and
//!   height in 1 ..= [`MAX_2D_DIMENSION`], `strides[0] ≥ width × 4`,
//!   `offsets[0] + strides[0] × (height − 1) + width × 4 ≤` the blob's size, a non-empty rect
//!   inside width × height; the backend exports the blob (its fd is what a frame sink
//!   gets), and a blob it cannot export (pointer-only) is the backend's refusal.
//! * `RESOURCE_FLUSH`: the resource exists (2D or blob); for a 2D resource the rect lies
//!   inside it, for a blob inside the framebuffer of every scanout showing it. Each scanout
//!   showing the resource whose rect meets the flushed one records a frame ([`FrameInfo`]:
//!   the latest per scanout, and a counter) and the sink is called with it; a resource on
//!   no scanout is answered `OK_NODATA` and counted ([`DisplayStats::off_scanout_flushes`]),
//!   as QEMU does.
//! * `RESOURCE_UNREF` of a 2D resource releases it and its backing; every scanout showing
//!   it (or a blob that is unref'd) is disabled.
//! * `RESOURCE_ASSIGN_UUID`: the resource exists; the answer is a random (version 4) UUID,
//!   the same for the resource until it is unref'd.
//! * `GET_EDID`: a 128-byte EDID 1.4 block for the scanout's size ([`crate::edid`]).
//! * Cursor queue (no response beyond the used entry): `UPDATE_CURSOR` needs a scanout
//!   in range, resource 0 (hide) or a [`CURSOR_SIZE`]² 2D resource, whose pixels are copied
//!   then, and a hot spot inside it; `MOVE_CURSOR` a scanout in range. A refused cursor
//!   command changes nothing and is logged (rate-limited) and counted.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::os::fd::{AsFd, BorrowedFd};

use crate::backend::ExportedBlob;
use crate::wire::{
    CtrlHdr, DisplayOne, ErrorCode, GetEdid, Rect, ResourceFlush, Response, SetScanout,
    SetScanoutBlob, VIRTIO_GPU_RESP_OK_DISPLAY_INFO, VIRTIO_GPU_RESP_OK_EDID,
    VIRTIO_GPU_RESP_OK_RESOURCE_UUID,
};

mod cursor;
mod format;
mod resource;
mod tube_sink;

pub use cursor::CursorInfo;
pub use format::{DisplayConfig, Format};
use resource::Resource2d;
pub use tube_sink::{SinkStats, TubeSink};

/// Width of the default scanout.
pub const DEFAULT_WIDTH: u32 = 1024;
/// Height of the default scanout.
pub const DEFAULT_HEIGHT: u32 = 768;
/// Bytes per pixel of every format served.
pub const BYTES_PER_PIXEL: u32 = 4;
/// Largest width or height of a 2D resource or a blob framebuffer.
pub const MAX_2D_DIMENSION: u32 = 16384;
/// Most live 2D resources (`ERR_OUT_OF_MEMORY` beyond).
pub const MAX_2D_RESOURCES: usize = 4096;
/// Bytes all live 2D resources may hold together by default (`ERR_OUT_OF_MEMORY` beyond):
/// several 4K framebuffers.
pub const DEFAULT_2D_BUDGET: u64 = 256 << 20;
/// Most mem entries one `RESOURCE_ATTACH_BACKING` may name (QEMU's limit).
pub const MAX_BACKING_ENTRIES: usize = 16384;
/// Most bytes of guest RAM one resource's backing may name.
pub const MAX_BACKING_BYTES: u64 = 1 << 30;
/// Width and height of a cursor image.
pub const CURSOR_SIZE: u32 = 64;

/// A refused command: the response code and the reason to log.
pub type Refusal = (ErrorCode, String);

fn refuse<T>(code: ErrorCode, reason: impl Into<String>) -> Result<T, Refusal> {
    Err((code, reason.into()))
}

/// One past the last byte of `rows` rows of `row` bytes each, `stride` apart, from
/// `offset` (`None`: no rows, or it overflows).
fn rows_end(offset: u64, stride: u64, rows: u32, row: u64) -> Option<u64> {
    stride
        .checked_mul(u64::from(rows).checked_sub(1)?)?
        .checked_add(row)?
        .checked_add(offset)
}

/// A served format and a size in 1 ..= [`MAX_2D_DIMENSION`] each way (2D resources and
/// blob scanouts).
fn format_and_size(format: u32, width: u32, height: u32) -> Result<Format, Refusal> {
    let Some(f) = Format::from_u32(format) else {
        return refuse(
            ErrorCode::InvalidParameter,
            format!("format {format} not served"),
        );
    };
    let dims = 1..=MAX_2D_DIMENSION;
    if !dims.contains(&width) || !dims.contains(&height) {
        return refuse(
            ErrorCode::InvalidParameter,
            format!("size {width}x{height}: width and height must be 1 to {MAX_2D_DIMENSION}"),
        );
    }
    Ok(f)
}

/// One flushed frame of a scanout: what [`FrameSink::frame`] gets, and what
/// [`Display::latest_frame`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameInfo {
    /// The scanout.
    pub scanout_id: u32,
    /// The resource on it (2D or blob).
    pub resource_id: u32,
    /// What changed: the flushed rect met with the scanout's rect (framebuffer
    /// coordinates).
    pub rect: Rect,
    /// The part of the framebuffer the scanout shows (`SET_SCANOUT`'s rect).
    pub scanout_rect: Rect,
    /// Pixel format.
    pub format: Format,
    /// Framebuffer width in pixels.
    pub width: u32,
    /// Framebuffer height in pixels.
    pub height: u32,
    /// Bytes from one row to the next.
    pub stride: u32,
    /// Where the framebuffer's first byte is in the pixels the sink gets (0 for a 2D
    /// resource; `offsets[0]` for a blob).
    pub offset: u64,
    /// This scanout's frame counter: 1 for its first frame.
    pub seq: u64,
}

/// The pixels of a frame, as the device holds them.
#[derive(Debug, Clone, Copy)]
pub enum FramePixels<'a> {
    /// A 2D resource's host copy: `stride × height` bytes, row 0 first.
    Bytes(&'a [u8]),
    /// A blob, exported by the backend: the framebuffer starts at `fd_offset +`
    /// [`FrameInfo::offset`] of `fd`, which holds `size` bytes of the blob from `fd_offset`.
    Blob {
        /// The blob's fd.
        fd: BorrowedFd<'a>,
        /// Where the blob starts in the fd.
        fd_offset: u64,
        /// The blob's size.
        size: u64,
    },
}

impl FramePixels<'_> {
    /// The bytes as the device holds them (a blob's `size` bytes from `fd_offset`, read
    /// with `pread`): what a sink that keeps frames keeps.
    pub fn copy_out(&self) -> nix::Result<Vec<u8>> {
        match *self {
            FramePixels::Bytes(b) => Ok(b.to_vec()),
            FramePixels::Blob {
                fd,
                fd_offset,
                size,
            } => {
                let len = usize::try_from(size).map_err(|_| nix::errno::Errno::EFBIG)?;
                let mut out = vec![0u8; len];
                let mut done = 0usize;
                while done < len {
                    let at = fd_offset
                        .checked_add(done as u64)
                        .and_then(|a| i64::try_from(a).ok())
                        .ok_or(nix::errno::Errno::EOVERFLOW)?;
                    match nix::sys::uio::pread(fd, &mut out[done..], at) {
                        Ok(0) => return Err(nix::errno::Errno::EIO),
                        Ok(n) => done += n,
                        Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            }
        }
    }
}

/// Where flushed frames go: the supervisor's end in a later part (issue 26); tests record
/// them. Called inside the command, so it must not block for long.
pub trait FrameSink: Send {
    /// A scanout's frame after a `RESOURCE_FLUSH`.
    fn frame(&mut self, frame: &FrameInfo, pixels: FramePixels<'_>);
    /// The cursor changed (an accepted `UPDATE_CURSOR` or `MOVE_CURSOR`).
    fn cursor(&mut self, cursor: &CursorInfo) {
        let _ = cursor;
    }
    /// Sends what waits (called from the device loop; [`FrameSink::pending`]).
    fn retry(&mut self) {}
    /// True while something waits to go out: the device loop must come back soon.
    fn pending(&self) -> bool {
        false
    }
    /// What the sink counted, if it counts ([`TubeSink`]).
    fn counters(&self) -> Option<SinkStats> {
        None
    }
}

/// A sink that keeps nothing (the device's default until the supervisor takes frames).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoSink;

impl FrameSink for NoSink {
    fn frame(&mut self, _frame: &FrameInfo, _pixels: FramePixels<'_>) {}
}

/// Counters of the display.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DisplayStats {
    /// `RESOURCE_FLUSH`es accepted.
    pub flushes: u64,
    /// Frames recorded (one per scanout a flush reached).
    pub frames: u64,
    /// Flushes of a resource on no scanout (or outside every scanout's rect).
    pub off_scanout_flushes: u64,
    /// `TRANSFER_TO_HOST_2D`s done.
    pub transfers: u64,
    /// Bytes they copied.
    pub transferred_bytes: u64,
    /// Cursor commands refused.
    pub cursor_refusals: u64,
    /// `RESOURCE_CREATE_2D`s refused at a memory bound.
    pub budget_refusals: u64,
}

/// What a scanout shows.
#[derive(Debug)]
enum Source {
    Resource2d(u32),
    Blob {
        id: u32,
        format: Format,
        width: u32,
        height: u32,
        stride: u32,
        offset: u64,
        exported: ExportedBlob,
    },
}

impl Source {
    fn resource_id(&self) -> u32 {
        match self {
            Source::Resource2d(id) | Source::Blob { id, .. } => *id,
        }
    }
}

#[derive(Debug)]
struct Scanout {
    /// The configured (preferred) size.
    width: u32,
    height: u32,
    source: Option<Source>,
    rect: Rect,
    latest: Option<FrameInfo>,
    frames: u64,
}

/// A blob as the display needs to know it (the handler's table owns blobs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobRef {
    /// Resource id.
    pub resource_id: u32,
    /// Size in bytes.
    pub size: u64,
}

/// The display state: scanouts, 2D resources, cursor, UUIDs, the frame sink.
pub struct Display {
    config: DisplayConfig,
    scanouts: Vec<Scanout>,
    resources: BTreeMap<u32, Resource2d>,
    bytes: u64,
    bytes_max: u64,
    budget: u64,
    uuids: BTreeMap<u32, [u8; 16]>,
    uuid_keys: std::collections::hash_map::RandomState,
    uuid_count: u64,
    cursor: CursorInfo,
    sink: Box<dyn FrameSink>,
    excluded: Vec<(u64, u64)>,
    stats: DisplayStats,
}

impl std::fmt::Debug for Display {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Display")
            .field("config", &self.config)
            .field("resources", &self.resources.len())
            .field("bytes", &self.bytes)
            .field("stats", &self.stats)
            .finish()
    }
}

impl Default for Display {
    fn default() -> Self {
        Display::new(DisplayConfig::default())
    }
}

impl Display {
    /// A display with `config`'s scanouts, no resources, [`NoSink`].
    pub fn new(config: DisplayConfig) -> Display {
        let scanouts = Self::scanouts_of(&config);
        Display {
            config,
            scanouts,
            resources: BTreeMap::new(),
            bytes: 0,
            bytes_max: 0,
            budget: DEFAULT_2D_BUDGET,
            uuids: BTreeMap::new(),
            uuid_keys: std::collections::hash_map::RandomState::new(),
            uuid_count: 0,
            cursor: CursorInfo::default(),
            sink: Box::new(NoSink),
            excluded: Vec::new(),
            stats: DisplayStats::default(),
        }
    }

    fn scanouts_of(config: &DisplayConfig) -> Vec<Scanout> {
        config
            .modes()
            .iter()
            .map(|&(width, height)| Scanout {
                width,
                height,
                source: None,
                rect: Rect::default(),
                latest: None,
                frames: 0,
            })
            .collect()
    }

    /// Replaces the scanouts (every one disabled).
    pub fn set_config(&mut self, config: DisplayConfig) {
        self.scanouts = Self::scanouts_of(&config);
        self.config = config;
    }

    /// The scanouts' configuration.
    pub fn config(&self) -> &DisplayConfig {
        &self.config
    }

    /// `virtio_gpu_config.num_scanouts`.
    pub fn num_scanouts(&self) -> u32 {
        self.config.num_scanouts()
    }

    /// Where frames go from now on.
    pub fn set_sink(&mut self, sink: Box<dyn FrameSink>) {
        self.sink = sink;
    }

    /// The sink sends what waits ([`FrameSink::retry`]).
    pub fn retry_sink(&mut self) {
        self.sink.retry();
    }

    /// At the device's end: the sink sends what still waits (the latest frame per scanout,
    /// the last cursor: the supervisor's picture of the display), trying for at most
    /// `within`.
    pub fn flush_sink(&mut self, within: std::time::Duration) {
        let t0 = std::time::Instant::now();
        while self.sink.pending() && t0.elapsed() < within {
            self.sink.retry();
            if self.sink.pending() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }

    /// Something waits in the sink ([`FrameSink::pending`]).
    pub fn sink_pending(&self) -> bool {
        self.sink.pending()
    }

    /// The sink's counters, if it counts.
    pub fn sink_stats(&self) -> Option<SinkStats> {
        self.sink.counters()
    }

    /// Bounds the bytes of all 2D resources (default [`DEFAULT_2D_BUDGET`]).
    pub fn set_budget(&mut self, bytes: u64) {
        self.budget = bytes;
    }

    /// Guest-physical ranges `(start, len)` that are never backing (the hostmem window,
    /// wherever the transport knows it).
    pub fn set_excluded(&mut self, ranges: Vec<(u64, u64)>) {
        self.excluded = ranges;
    }

    /// The ranges [`Display::set_excluded`] set.
    pub fn excluded(&self) -> &[(u64, u64)] {
        &self.excluded
    }

    /// Bytes the live 2D resources hold now.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Most bytes the live 2D resources held at once.
    pub fn bytes_max(&self) -> u64 {
        self.bytes_max
    }

    /// The counters.
    pub fn stats(&self) -> DisplayStats {
        self.stats
    }

    /// True when `id` is a live 2D resource.
    pub fn has_resource(&self, id: u32) -> bool {
        self.resources.contains_key(&id)
    }

    /// Live 2D resources.
    pub fn resources(&self) -> usize {
        self.resources.len()
    }

    /// Bytes of backing attached to 2D resource `id` (`None`: no such resource or none).
    pub fn backing_len(&self, id: u32) -> Option<u64> {
        self.resources.get(&id)?.backing.as_ref().map(|b| b.len)
    }

    /// The host copy of 2D resource `id` (`stride × height` bytes).
    pub fn resource_bytes(&self, id: u32) -> Option<&[u8]> {
        self.resources.get(&id).map(|r| r.data.as_slice())
    }

    /// The resource scanout `id` shows (`None`: disabled or no such scanout).
    pub fn scanout_resource(&self, id: u32) -> Option<u32> {
        self.scanout(id)?.source.as_ref().map(Source::resource_id)
    }

    /// The latest frame of scanout `id`.
    pub fn latest_frame(&self, id: u32) -> Option<FrameInfo> {
        self.scanout(id)?.latest
    }

    /// Frames scanout `id` recorded so far.
    pub fn frames(&self, id: u32) -> u64 {
        self.scanout(id).map_or(0, |s| s.frames)
    }

    /// The cursor.
    pub fn cursor(&self) -> &CursorInfo {
        &self.cursor
    }

    fn scanout(&self, id: u32) -> Option<&Scanout> {
        self.scanouts.get(usize::try_from(id).ok()?)
    }

    fn scanout_index(&self, id: u32) -> Result<usize, Refusal> {
        match usize::try_from(id) {
            Ok(i) if i < self.scanouts.len() => Ok(i),
            _ => refuse(
                ErrorCode::InvalidScanoutId,
                format!("scanout {id} (the device has {})", self.scanouts.len()),
            ),
        }
    }

    /// `OK_DISPLAY_INFO`: every configured scanout enabled at its size.
    pub fn display_info(&self, hdr: &CtrlHdr) -> Response {
        Response::OkDisplayInfo {
            hdr: hdr.response(VIRTIO_GPU_RESP_OK_DISPLAY_INFO),
            modes: self
                .scanouts
                .iter()
                .map(|s| DisplayOne {
                    x: 0,
                    y: 0,
                    width: s.width,
                    height: s.height,
                    enabled: 1,
                    flags: 0,
                })
                .collect(),
        }
    }

    /// `GET_EDID`.
    pub fn edid(&self, c: &GetEdid) -> Result<Response, Refusal> {
        let i = self.scanout_index(c.scanout)?;
        let s = self
            .scanouts
            .get(i)
            .ok_or((ErrorCode::InvalidScanoutId, "scanout".to_string()))?;
        let block = crate::edid::edid(s.width, s.height, c.scanout.saturating_add(1));
        Ok(Response::OkEdid {
            hdr: c.hdr.response(VIRTIO_GPU_RESP_OK_EDID),
            edid: block.to_vec(),
        })
    }

    /// `SET_SCANOUT`; `is_blob`: the resource id is a blob's.
    pub fn set_scanout(&mut self, c: &SetScanout, is_blob: bool) -> Result<(), Refusal> {
        let i = self.scanout_index(c.scanout_id)?;
        let id = c.resource_id;
        if id == 0 {
            self.disable(i);
            return Ok(());
        }
        let Some(res) = self.resources.get(&id) else {
            let why = if is_blob {
                format!("resource {id} is a blob (SET_SCANOUT_BLOB shows blobs)")
            } else {
                format!("no resource {id}")
            };
            return refuse(ErrorCode::InvalidResourceId, why);
        };
        if c.r.is_empty() || !c.r.within(res.width, res.height) {
            return refuse(
                ErrorCode::InvalidParameter,
                format!(
                    "scanout rect {:?}: must be non-empty and inside resource {id} of {}x{}",
                    c.r, res.width, res.height
                ),
            );
        }
        if let Some(s) = self.scanouts.get_mut(i) {
            s.source = Some(Source::Resource2d(id));
            s.rect = c.r;
        }
        log::debug!("scanout {}: resource {id} at {:?}", c.scanout_id, c.r);
        Ok(())
    }

    /// `SET_SCANOUT_BLOB`; `blob`: the resource if it is a blob; `export` exports it.
    pub fn set_scanout_blob(
        &mut self,
        c: &SetScanoutBlob,
        blob: Option<BlobRef>,
        export: impl FnOnce() -> Result<ExportedBlob, Refusal>,
    ) -> Result<(), Refusal> {
        let i = self.scanout_index(c.scanout_id)?;
        let id = c.resource_id;
        if id == 0 {
            self.disable(i);
            return Ok(());
        }
        let Some(blob) = blob else {
            let why = if self.resources.contains_key(&id) {
                format!("resource {id} is a 2D resource, not a blob")
            } else {
                format!("no resource {id}")
            };
            return refuse(ErrorCode::InvalidResourceId, why);
        };
        let format = format_and_size(c.format, c.width, c.height)?;
        let row = u64::from(c.width) * u64::from(format.bytes_per_pixel());
        let stride = u64::from(c.strides[0]);
        if stride < row {
            return refuse(
                ErrorCode::InvalidParameter,
                format!("stride {stride} < {row} bytes of a row"),
            );
        }
        let offset = u64::from(c.offsets[0]);
        match rows_end(offset, stride, c.height, row) {
            Some(end) if end <= blob.size => {}
            _ => {
                return refuse(
                    ErrorCode::InvalidParameter,
                    format!(
                        "framebuffer at {offset:#x}, {} rows of {stride}: past blob {id} of {:#x} bytes",
                        c.height, blob.size
                    ),
                )
            }
        }
        if c.r.is_empty() || !c.r.within(c.width, c.height) {
            return refuse(
                ErrorCode::InvalidParameter,
                format!(
                    "scanout rect {:?}: must be non-empty and inside {}x{}",
                    c.r, c.width, c.height
                ),
            );
        }
        let exported = export()?;
        if exported.size < blob.size {
            return refuse(
                ErrorCode::Unspec,
                format!(
                    "backend exported {:#x} bytes of blob {id} ({:#x})",
                    exported.size, blob.size
                ),
            );
        }
        if let Some(s) = self.scanouts.get_mut(i) {
            s.source = Some(Source::Blob {
                id,
                format,
                width: c.width,
                height: c.height,
                stride: c.strides[0],
                offset,
                exported,
            });
            s.rect = c.r;
        }
        log::debug!(
            "scanout {}: blob {id} {}x{} at {:?}",
            c.scanout_id,
            c.width,
            c.height,
            c.r
        );
        Ok(())
    }

    fn disable(&mut self, i: usize) {
        if let Some(s) = self.scanouts.get_mut(i) {
            s.source = None;
            s.rect = Rect::default();
        }
    }

    /// `RESOURCE_FLUSH`; `is_blob`: the resource id is a blob's.
    pub fn flush(&mut self, c: &ResourceFlush, is_blob: bool) -> Result<(), Refusal> {
        let id = c.resource_id;
        let r = c.r;
        if let Some(res) = self.resources.get(&id) {
            if !r.within(res.width, res.height) {
                return refuse(
                    ErrorCode::InvalidParameter,
                    format!(
                        "rect {r:?} outside resource {id} of {}x{}",
                        res.width, res.height
                    ),
                );
            }
        } else if is_blob {
            for s in &self.scanouts {
                if let Some(Source::Blob {
                    id: b,
                    width,
                    height,
                    ..
                }) = &s.source
                {
                    if *b == id && !r.within(*width, *height) {
                        return refuse(
                            ErrorCode::InvalidParameter,
                            format!("rect {r:?} outside blob {id}'s framebuffer {width}x{height}"),
                        );
                    }
                }
            }
        } else {
            return refuse(ErrorCode::InvalidResourceId, format!("no resource {id}"));
        }
        self.stats.flushes += 1;
        let mut reached = 0;
        for (i, s) in self.scanouts.iter_mut().enumerate() {
            let Some(src) = &s.source else { continue };
            if src.resource_id() != id {
                continue;
            }
            let Some(damage) = intersect(&r, &s.rect) else {
                continue;
            };
            s.frames += 1;
            let (format, width, height, stride, offset, pixels) = match src {
                Source::Resource2d(rid) => {
                    let Some(res) = self.resources.get(rid) else {
                        continue;
                    };
                    (
                        res.format,
                        res.width,
                        res.height,
                        res.stride,
                        0,
                        FramePixels::Bytes(&res.data),
                    )
                }
                Source::Blob {
                    format,
                    width,
                    height,
                    stride,
                    offset,
                    exported,
                    ..
                } => (
                    *format,
                    *width,
                    *height,
                    *stride,
                    *offset,
                    FramePixels::Blob {
                        fd: exported.fd.as_fd(),
                        fd_offset: exported.fd_offset,
                        size: exported.size,
                    },
                ),
            };
            let frame = FrameInfo {
                scanout_id: i as u32,
                resource_id: id,
                rect: damage,
                scanout_rect: s.rect,
                format,
                width,
                height,
                stride,
                offset,
                seq: s.frames,
            };
            s.latest = Some(frame);
            self.sink.frame(&frame, pixels);
            reached += 1;
        }
        self.stats.frames += reached;
        if reached == 0 {
            self.stats.off_scanout_flushes += 1;
            log::debug!("flush of resource {id}, which no scanout shows");
        }
        Ok(())
    }

    /// `RESOURCE_ASSIGN_UUID` of a resource that exists (`exists`: checked by the handler
    /// for blobs).
    pub fn assign_uuid(&mut self, hdr: &CtrlHdr, id: u32, blob: bool) -> Result<Response, Refusal> {
        if !blob && !self.resources.contains_key(&id) {
            return refuse(ErrorCode::InvalidResourceId, format!("no resource {id}"));
        }
        let uuid = match self.uuids.get(&id) {
            Some(u) => *u,
            None => {
                let u = self.new_uuid();
                self.uuids.insert(id, u);
                u
            }
        };
        Ok(Response::OkResourceUuid {
            hdr: hdr.response(VIRTIO_GPU_RESP_OK_RESOURCE_UUID),
            uuid,
        })
    }

    /// A version 4 (random) UUID: SipHash under the process's random keys of a counter.
    fn new_uuid(&mut self) -> [u8; 16] {
        let mut out = [0u8; 16];
        for half in out.chunks_exact_mut(8) {
            self.uuid_count += 1;
            let mut h = self.uuid_keys.build_hasher();
            h.write_u64(self.uuid_count);
            half.copy_from_slice(&h.finish().to_le_bytes());
        }
        out[6] = (out[6] & 0x0f) | 0x40;
        out[8] = (out[8] & 0x3f) | 0x80;
        out
    }

    /// `RESOURCE_UNREF` of a 2D resource: released with its backing, every scanout showing
    /// it disabled. False when `id` is not a 2D resource.
    pub fn unref(&mut self, id: u32) -> bool {
        let Some(res) = self.resources.remove(&id) else {
            return false;
        };
        self.bytes = self.bytes.saturating_sub(res.data.len() as u64);
        self.forget(id);
        log::debug!("resource {id}: 2D unref'd");
        true
    }

    /// A resource went away (a blob's unref, or a 2D resource's): scanouts showing it are
    /// disabled, its UUID forgotten.
    pub fn forget(&mut self, id: u32) {
        for s in &mut self.scanouts {
            if s.source.as_ref().is_some_and(|src| src.resource_id() == id) {
                s.source = None;
                s.rect = Rect::default();
            }
        }
        self.uuids.remove(&id);
    }

    /// Device reset: every 2D resource, scanout source, UUID and the cursor dropped
    /// (configuration, sink and counters stay).
    pub fn reset(&mut self) -> usize {
        let n = self.resources.len();
        self.resources.clear();
        self.bytes = 0;
        self.uuids.clear();
        for s in &mut self.scanouts {
            s.source = None;
            s.rect = Rect::default();
            s.latest = None;
        }
        let (updates, moves) = (self.cursor.updates, self.cursor.moves);
        self.cursor = CursorInfo {
            updates,
            moves,
            ..CursorInfo::default()
        };
        n
    }
}

/// The common part of two rects (`None` when it is empty).
fn intersect(a: &Rect, b: &Rect) -> Option<Rect> {
    let x0 = a.x.max(b.x);
    let y0 = a.y.max(b.y);
    let x1 = (u64::from(a.x) + u64::from(a.width)).min(u64::from(b.x) + u64::from(b.width));
    let y1 = (u64::from(a.y) + u64::from(a.height)).min(u64::from(b.y) + u64::from(b.height));
    if x1 <= u64::from(x0) || y1 <= u64::from(y0) {
        return None;
    }
    Some(Rect::new(
        x0,
        y0,
        (x1 - u64::from(x0)) as u32,
        (y1 - u64::from(y0)) as u32,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rects_intersect_without_overflow() {
        let a = Rect::new(10, 10, 100, 100);
        assert_eq!(
            intersect(&a, &Rect::new(50, 0, 200, 30)),
            Some(Rect::new(50, 10, 60, 20))
        );
        assert_eq!(intersect(&a, &Rect::new(110, 10, 5, 5)), None);
        let huge = Rect::new(u32::MAX, u32::MAX, u32::MAX, u32::MAX);
        assert_eq!(intersect(&a, &huge), None);
        assert!(!huge.within(u32::MAX, u32::MAX), "x + width wraps u32");
        assert!(Rect::new(0, 0, 4, 4).within(4, 4));
        assert!(!Rect::new(1, 0, 4, 4).within(4, 4));
    }

    #[test]
    fn uuids_are_version_4_and_distinct() {
        let mut d = Display::default();
        let a = d.new_uuid();
        let b = d.new_uuid();
        assert_ne!(a, b);
        for u in [a, b] {
            assert_eq!(u[6] >> 4, 4, "version 4");
            assert_eq!(u[8] >> 6, 0b10, "RFC 4122 variant");
        }
    }
}
