//! The display half of the wire: `DisplayOne`, `Rect`, 2D resources, scanouts and the cursor,
//! their parsing and their builders.

use super::{
    codec::mem_entries, codec::put_u32, codec::Reader, Command, CtrlHdr, MemEntry, ResourceCmd,
    WireError, GET_EDID_SIZE, MEM_ENTRY_SIZE, RESOURCE_ATTACH_BACKING_SIZE,
    RESOURCE_CREATE_2D_SIZE, RESOURCE_DETACH_BACKING_SIZE, RESOURCE_FLUSH_SIZE,
    SET_SCANOUT_BLOB_SIZE, SET_SCANOUT_SIZE, TRANSFER_TO_HOST_2D_SIZE, UPDATE_CURSOR_SIZE,
    VIRTIO_GPU_CMD_GET_EDID, VIRTIO_GPU_CMD_MOVE_CURSOR, VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID,
    VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING, VIRTIO_GPU_CMD_RESOURCE_CREATE_2D,
    VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING, VIRTIO_GPU_CMD_RESOURCE_FLUSH,
    VIRTIO_GPU_CMD_SET_SCANOUT, VIRTIO_GPU_CMD_SET_SCANOUT_BLOB,
    VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D, VIRTIO_GPU_CMD_UPDATE_CURSOR,
};

/// `struct virtio_gpu_display_one`: one scanout in `OK_DISPLAY_INFO`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DisplayOne {
    /// Rectangle: x.
    pub x: u32,
    /// Rectangle: y.
    pub y: u32,
    /// Rectangle: width.
    pub width: u32,
    /// Rectangle: height.
    pub height: u32,
    /// Non-zero when the scanout is enabled.
    pub enabled: u32,
    /// Flags.
    pub flags: u32,
}

/// `struct virtio_gpu_rect`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rect {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

impl Rect {
    /// A rect at `(x, y)` of `width` × `height`.
    pub fn new(x: u32, y: u32, width: u32, height: u32) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    /// True when the rect lies inside `width` × `height` (checked arithmetic: a rect whose
    /// `x + width` wraps is outside). An empty rect inside the bounds is inside.
    pub fn within(&self, width: u32, height: u32) -> bool {
        let right = u64::from(self.x) + u64::from(self.width);
        let bottom = u64::from(self.y) + u64::from(self.height);
        right <= u64::from(width) && bottom <= u64::from(height)
    }

    /// True when the rect has no pixels.
    pub fn is_empty(&self) -> bool {
        self.width == 0 || self.height == 0
    }

    fn read(r: &Reader<'_>, at: usize) -> Rect {
        Rect {
            x: r.u32(at),
            y: r.u32(at + 4),
            width: r.u32(at + 8),
            height: r.u32(at + 12),
        }
    }

    pub(super) fn encode_into(&self, out: &mut Vec<u8>) {
        for v in [self.x, self.y, self.width, self.height] {
            put_u32(out, v);
        }
    }
}

/// `VIRTIO_GPU_CMD_RESOURCE_CREATE_2D`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceCreate2d {
    /// Header.
    pub hdr: CtrlHdr,
    /// Guest-chosen id.
    pub resource_id: u32,
    /// `VIRTIO_GPU_FORMAT_*`.
    pub format: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// `VIRTIO_GPU_CMD_SET_SCANOUT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetScanout {
    /// Header.
    pub hdr: CtrlHdr,
    /// The part of the resource the scanout shows.
    pub r: Rect,
    /// Scanout.
    pub scanout_id: u32,
    /// 2D resource (0: disable the scanout).
    pub resource_id: u32,
}

/// `VIRTIO_GPU_CMD_RESOURCE_FLUSH`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceFlush {
    /// Header.
    pub hdr: CtrlHdr,
    /// The rect that changed, in resource coordinates.
    pub r: Rect,
    /// Resource.
    pub resource_id: u32,
    /// Padding.
    pub padding: u32,
}

/// `VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferToHost2d {
    /// Header.
    pub hdr: CtrlHdr,
    /// The rect to copy, in resource coordinates.
    pub r: Rect,
    /// Offset of the rect's first byte in the backing (rows `width * 4` bytes apart).
    pub offset: u64,
    /// Resource.
    pub resource_id: u32,
    /// Padding.
    pub padding: u32,
}

/// `VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING` and its mem entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceAttachBacking {
    /// Header.
    pub hdr: CtrlHdr,
    /// Resource.
    pub resource_id: u32,
    /// The `nr_entries` mem entries that follow (encoded `nr_entries` = `entries.len()`).
    pub entries: Vec<MemEntry>,
}

/// `VIRTIO_GPU_CMD_GET_EDID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetEdid {
    /// Header.
    pub hdr: CtrlHdr,
    /// Scanout.
    pub scanout: u32,
    /// Padding.
    pub padding: u32,
}

/// `VIRTIO_GPU_CMD_SET_SCANOUT_BLOB`: a blob resource as the scanout's framebuffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetScanoutBlob {
    /// Header.
    pub hdr: CtrlHdr,
    /// The part of the framebuffer the scanout shows.
    pub r: Rect,
    /// Scanout.
    pub scanout_id: u32,
    /// Blob resource (0: disable the scanout).
    pub resource_id: u32,
    /// Framebuffer width in pixels.
    pub width: u32,
    /// Framebuffer height in pixels.
    pub height: u32,
    /// `VIRTIO_GPU_FORMAT_*`.
    pub format: u32,
    /// Padding.
    pub padding: u32,
    /// Bytes per row of each plane (the formats served have one plane).
    pub strides: [u32; 4],
    /// Offset of each plane in the blob.
    pub offsets: [u32; 4],
}

/// `struct virtio_gpu_cursor_pos`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CursorPos {
    /// Scanout.
    pub scanout_id: u32,
    /// x.
    pub x: u32,
    /// y.
    pub y: u32,
    /// Padding.
    pub padding: u32,
}

/// `VIRTIO_GPU_CMD_UPDATE_CURSOR` / `VIRTIO_GPU_CMD_MOVE_CURSOR` (`struct
/// virtio_gpu_update_cursor`; MOVE uses only `pos`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdateCursor {
    /// Header.
    pub hdr: CtrlHdr,
    /// Position.
    pub pos: CursorPos,
    /// The cursor image: a 64×64 2D resource (0: hide the cursor).
    pub resource_id: u32,
    /// Hot spot x.
    pub hot_x: u32,
    /// Hot spot y.
    pub hot_y: u32,
    /// Padding.
    pub padding: u32,
}

impl Command {
    /// The display half of [`Command::parse`]: `None` for a type it does not know.
    pub(super) fn parse_display(
        hdr: CtrlHdr,
        name: &'static str,
        bytes: &[u8],
    ) -> Option<Result<Command, WireError>> {
        let need = |size| Reader::new(bytes, name, size);
        let parsed = match hdr.type_ {
            VIRTIO_GPU_CMD_RESOURCE_CREATE_2D => need(RESOURCE_CREATE_2D_SIZE).map(|r| {
                Command::ResourceCreate2d(ResourceCreate2d {
                    hdr,
                    resource_id: r.u32(24),
                    format: r.u32(28),
                    width: r.u32(32),
                    height: r.u32(36),
                })
            }),
            VIRTIO_GPU_CMD_SET_SCANOUT => need(SET_SCANOUT_SIZE).map(|r| {
                Command::SetScanout(SetScanout {
                    hdr,
                    r: Rect::read(&r, 24),
                    scanout_id: r.u32(40),
                    resource_id: r.u32(44),
                })
            }),
            VIRTIO_GPU_CMD_RESOURCE_FLUSH => need(RESOURCE_FLUSH_SIZE).map(|r| {
                Command::ResourceFlush(ResourceFlush {
                    hdr,
                    r: Rect::read(&r, 24),
                    resource_id: r.u32(40),
                    padding: r.u32(44),
                })
            }),
            VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D => need(TRANSFER_TO_HOST_2D_SIZE).map(|r| {
                Command::TransferToHost2d(TransferToHost2d {
                    hdr,
                    r: Rect::read(&r, 24),
                    offset: r.u64(40),
                    resource_id: r.u32(48),
                    padding: r.u32(52),
                })
            }),
            VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING => {
                need(RESOURCE_ATTACH_BACKING_SIZE).and_then(|r| {
                    let nr_entries = r.u32(28);
                    let rest = bytes
                        .get(RESOURCE_ATTACH_BACKING_SIZE..)
                        .unwrap_or_default();
                    let avail = rest.len() / MEM_ENTRY_SIZE;
                    if nr_entries as usize > avail {
                        return Err(WireError::BadLength(format!(
                            "{name}: nr_entries {nr_entries} but the message holds {avail} entries"
                        )));
                    }
                    Ok(Command::ResourceAttachBacking(ResourceAttachBacking {
                        hdr,
                        resource_id: r.u32(24),
                        entries: mem_entries(rest, nr_entries),
                    }))
                })
            }
            VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING | VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID => {
                need(RESOURCE_DETACH_BACKING_SIZE).map(|r| {
                    let c = ResourceCmd {
                        hdr,
                        resource_id: r.u32(24),
                        padding: r.u32(28),
                    };
                    if hdr.type_ == VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID {
                        Command::ResourceAssignUuid(c)
                    } else {
                        Command::ResourceDetachBacking(c)
                    }
                })
            }
            VIRTIO_GPU_CMD_GET_EDID => need(GET_EDID_SIZE).map(|r| {
                Command::GetEdid(GetEdid {
                    hdr,
                    scanout: r.u32(24),
                    padding: r.u32(28),
                })
            }),
            VIRTIO_GPU_CMD_SET_SCANOUT_BLOB => need(SET_SCANOUT_BLOB_SIZE).map(|r| {
                let four = |at: usize| [r.u32(at), r.u32(at + 4), r.u32(at + 8), r.u32(at + 12)];
                Command::SetScanoutBlob(SetScanoutBlob {
                    hdr,
                    r: Rect::read(&r, 24),
                    scanout_id: r.u32(40),
                    resource_id: r.u32(44),
                    width: r.u32(48),
                    height: r.u32(52),
                    format: r.u32(56),
                    padding: r.u32(60),
                    strides: four(64),
                    offsets: four(80),
                })
            }),
            VIRTIO_GPU_CMD_UPDATE_CURSOR | VIRTIO_GPU_CMD_MOVE_CURSOR => need(UPDATE_CURSOR_SIZE)
                .map(|r| {
                    let c = UpdateCursor {
                        hdr,
                        pos: CursorPos {
                            scanout_id: r.u32(24),
                            x: r.u32(28),
                            y: r.u32(32),
                            padding: r.u32(36),
                        },
                        resource_id: r.u32(40),
                        hot_x: r.u32(44),
                        hot_y: r.u32(48),
                        padding: r.u32(52),
                    };
                    if hdr.type_ == VIRTIO_GPU_CMD_MOVE_CURSOR {
                        Command::MoveCursor(c)
                    } else {
                        Command::UpdateCursor(c)
                    }
                }),
            _ => return None,
        };
        Some(parsed)
    }
}

impl Command {
    /// `RESOURCE_CREATE_2D` of `resource_id`.
    pub fn create_2d(resource_id: u32, format: u32, width: u32, height: u32) -> Command {
        Command::ResourceCreate2d(ResourceCreate2d {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_RESOURCE_CREATE_2D),
            resource_id,
            format,
            width,
            height,
        })
    }

    /// `SET_SCANOUT` of `resource_id` (0: disable) on `scanout_id`, showing `r`.
    pub fn set_scanout(scanout_id: u32, resource_id: u32, r: Rect) -> Command {
        Command::SetScanout(SetScanout {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_SET_SCANOUT),
            r,
            scanout_id,
            resource_id,
        })
    }

    /// `RESOURCE_FLUSH` of `r` of `resource_id`.
    pub fn resource_flush(resource_id: u32, r: Rect) -> Command {
        Command::ResourceFlush(ResourceFlush {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_RESOURCE_FLUSH),
            r,
            resource_id,
            padding: 0,
        })
    }

    /// `TRANSFER_TO_HOST_2D` of `r` of `resource_id` from backing `offset`.
    pub fn transfer_to_host_2d(resource_id: u32, r: Rect, offset: u64) -> Command {
        Command::TransferToHost2d(TransferToHost2d {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_TRANSFER_TO_HOST_2D),
            r,
            offset,
            resource_id,
            padding: 0,
        })
    }

    /// `RESOURCE_ATTACH_BACKING` of `entries` (guest address, length) to `resource_id`.
    pub fn attach_backing(resource_id: u32, entries: &[(u64, u32)]) -> Command {
        Command::ResourceAttachBacking(ResourceAttachBacking {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_RESOURCE_ATTACH_BACKING),
            resource_id,
            entries: entries
                .iter()
                .map(|&(addr, length)| MemEntry {
                    addr,
                    length,
                    padding: 0,
                })
                .collect(),
        })
    }

    /// `RESOURCE_DETACH_BACKING` of `resource_id`.
    pub fn detach_backing(resource_id: u32) -> Command {
        Command::ResourceDetachBacking(ResourceCmd {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_RESOURCE_DETACH_BACKING),
            resource_id,
            padding: 0,
        })
    }

    /// `GET_EDID` of `scanout`.
    pub fn get_edid(scanout: u32) -> Command {
        Command::GetEdid(GetEdid {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_GET_EDID),
            scanout,
            padding: 0,
        })
    }

    /// `RESOURCE_ASSIGN_UUID` of `resource_id`.
    pub fn assign_uuid(resource_id: u32) -> Command {
        Command::ResourceAssignUuid(ResourceCmd {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_RESOURCE_ASSIGN_UUID),
            resource_id,
            padding: 0,
        })
    }

    /// `SET_SCANOUT_BLOB` of a one-plane framebuffer of `width` × `height` in `format`,
    /// `stride` bytes per row from `offset` in blob `resource_id`, shown whole.
    pub fn set_scanout_blob(
        scanout_id: u32,
        resource_id: u32,
        format: u32,
        (width, height): (u32, u32),
        stride: u32,
        offset: u32,
    ) -> Command {
        Command::SetScanoutBlob(SetScanoutBlob {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_SET_SCANOUT_BLOB),
            r: Rect::new(0, 0, width, height),
            scanout_id,
            resource_id,
            width,
            height,
            format,
            padding: 0,
            strides: [stride, 0, 0, 0],
            offsets: [offset, 0, 0, 0],
        })
    }

    /// `UPDATE_CURSOR`: `resource_id` (0: hide) with its hot spot at `(x, y)` of `scanout_id`.
    pub fn update_cursor(
        scanout_id: u32,
        (x, y): (u32, u32),
        resource_id: u32,
        (hot_x, hot_y): (u32, u32),
    ) -> Command {
        Command::UpdateCursor(UpdateCursor {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_UPDATE_CURSOR),
            pos: CursorPos {
                scanout_id,
                x,
                y,
                padding: 0,
            },
            resource_id,
            hot_x,
            hot_y,
            padding: 0,
        })
    }

    /// `MOVE_CURSOR` to `(x, y)` of `scanout_id`.
    pub fn move_cursor(scanout_id: u32, (x, y): (u32, u32)) -> Command {
        Command::MoveCursor(UpdateCursor {
            hdr: CtrlHdr::new(VIRTIO_GPU_CMD_MOVE_CURSOR),
            pos: CursorPos {
                scanout_id,
                x,
                y,
                padding: 0,
            },
            resource_id: 0,
            hot_x: 0,
            hot_y: 0,
            padding: 0,
        })
    }
}
