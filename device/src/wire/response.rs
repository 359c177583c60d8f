//! Responses: [`ErrorCode`] and [`Response`], their encoding and parsing.

use std::fmt;

use super::{
    codec::put_u32, codec::type_name, codec::Reader, CtrlHdr, DisplayOne, WireError, CTRL_HDR_SIZE,
    DISPLAY_ONE_SIZE, EDID_MAX_SIZE, RESP_CAPSET_INFO_SIZE, RESP_DISPLAY_INFO_SIZE, RESP_EDID_SIZE,
    RESP_MAP_INFO_SIZE, RESP_RESOURCE_UUID_SIZE, VIRTIO_GPU_MAX_SCANOUTS,
    VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID, VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
    VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID, VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID,
    VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY, VIRTIO_GPU_RESP_ERR_UNSPEC, VIRTIO_GPU_RESP_OK_CAPSET,
    VIRTIO_GPU_RESP_OK_CAPSET_INFO, VIRTIO_GPU_RESP_OK_DISPLAY_INFO, VIRTIO_GPU_RESP_OK_EDID,
    VIRTIO_GPU_RESP_OK_MAP_INFO, VIRTIO_GPU_RESP_OK_NODATA, VIRTIO_GPU_RESP_OK_RESOURCE_UUID,
};

/// The error responses (`VIRTIO_GPU_RESP_ERR_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `ERR_UNSPEC`.
    Unspec,
    /// `ERR_OUT_OF_MEMORY`.
    OutOfMemory,
    /// `ERR_INVALID_SCANOUT_ID`.
    InvalidScanoutId,
    /// `ERR_INVALID_RESOURCE_ID`.
    InvalidResourceId,
    /// `ERR_INVALID_CONTEXT_ID`.
    InvalidContextId,
    /// `ERR_INVALID_PARAMETER`.
    InvalidParameter,
}

impl ErrorCode {
    /// The wire type.
    pub fn to_u32(self) -> u32 {
        match self {
            ErrorCode::Unspec => VIRTIO_GPU_RESP_ERR_UNSPEC,
            ErrorCode::OutOfMemory => VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY,
            ErrorCode::InvalidScanoutId => VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID,
            ErrorCode::InvalidResourceId => VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID,
            ErrorCode::InvalidContextId => VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID,
            ErrorCode::InvalidParameter => VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER,
        }
    }

    /// The code for a wire type, if it is an error response.
    pub fn from_u32(t: u32) -> Option<ErrorCode> {
        Some(match t {
            VIRTIO_GPU_RESP_ERR_UNSPEC => ErrorCode::Unspec,
            VIRTIO_GPU_RESP_ERR_OUT_OF_MEMORY => ErrorCode::OutOfMemory,
            VIRTIO_GPU_RESP_ERR_INVALID_SCANOUT_ID => ErrorCode::InvalidScanoutId,
            VIRTIO_GPU_RESP_ERR_INVALID_RESOURCE_ID => ErrorCode::InvalidResourceId,
            VIRTIO_GPU_RESP_ERR_INVALID_CONTEXT_ID => ErrorCode::InvalidContextId,
            VIRTIO_GPU_RESP_ERR_INVALID_PARAMETER => ErrorCode::InvalidParameter,
            _ => return None,
        })
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(type_name(self.to_u32()))
    }
}

/// A control-queue response.
///
/// `hdr.type_` is ignored by [`Response::encode`] (the variant decides) and set by
/// [`Response::parse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// `OK_NODATA`. `reply` is the **hostmem extension**: bytes a `SUBMIT_3D` stream
    /// produced (e.g. the shm backend's checksums), appended right after the 24-byte
    /// header. Empty for every other command, so the response is a plain `OK_NODATA`.
    OkNoData {
        /// Header.
        hdr: CtrlHdr,
        /// Reply bytes after the header (hostmem extension; usually empty).
        reply: Vec<u8>,
    },
    /// `OK_MAP_INFO`.
    OkMapInfo {
        /// Header.
        hdr: CtrlHdr,
        /// `VIRTIO_GPU_MAP_CACHE_*`.
        map_info: u32,
    },
    /// `OK_DISPLAY_INFO`: the scanouts (encoded as all [`VIRTIO_GPU_MAX_SCANOUTS`]
    /// entries; missing ones are zero, i.e. disabled).
    OkDisplayInfo {
        /// Header.
        hdr: CtrlHdr,
        /// The first scanouts (at most [`VIRTIO_GPU_MAX_SCANOUTS`]).
        modes: Vec<DisplayOne>,
    },
    /// `OK_CAPSET_INFO`.
    OkCapsetInfo {
        /// Header.
        hdr: CtrlHdr,
        /// Capset id.
        capset_id: u32,
        /// Highest version.
        capset_max_version: u32,
        /// Size of the capset.
        capset_max_size: u32,
    },
    /// `OK_CAPSET`.
    OkCapset {
        /// Header.
        hdr: CtrlHdr,
        /// The capset bytes.
        data: Vec<u8>,
    },
    /// `OK_EDID`: `size` is `edid.len()` (at most [`EDID_MAX_SIZE`]; the rest of the
    /// 1024-byte array is zero).
    OkEdid {
        /// Header.
        hdr: CtrlHdr,
        /// The EDID bytes.
        edid: Vec<u8>,
    },
    /// `OK_RESOURCE_UUID`.
    OkResourceUuid {
        /// Header.
        hdr: CtrlHdr,
        /// The resource's UUID.
        uuid: [u8; 16],
    },
    /// One of the `ERR_*` responses.
    Err {
        /// Header.
        hdr: CtrlHdr,
        /// Which error.
        code: ErrorCode,
    },
}

impl Response {
    /// The response's header.
    pub fn hdr(&self) -> &CtrlHdr {
        match self {
            Response::OkNoData { hdr, .. }
            | Response::OkMapInfo { hdr, .. }
            | Response::OkDisplayInfo { hdr, .. }
            | Response::OkCapsetInfo { hdr, .. }
            | Response::OkCapset { hdr, .. }
            | Response::OkEdid { hdr, .. }
            | Response::OkResourceUuid { hdr, .. }
            | Response::Err { hdr, .. } => hdr,
        }
    }

    /// The wire type of this response.
    pub fn type_(&self) -> u32 {
        match self {
            Response::OkNoData { .. } => VIRTIO_GPU_RESP_OK_NODATA,
            Response::OkMapInfo { .. } => VIRTIO_GPU_RESP_OK_MAP_INFO,
            Response::OkDisplayInfo { .. } => VIRTIO_GPU_RESP_OK_DISPLAY_INFO,
            Response::OkCapsetInfo { .. } => VIRTIO_GPU_RESP_OK_CAPSET_INFO,
            Response::OkCapset { .. } => VIRTIO_GPU_RESP_OK_CAPSET,
            Response::OkEdid { .. } => VIRTIO_GPU_RESP_OK_EDID,
            Response::OkResourceUuid { .. } => VIRTIO_GPU_RESP_OK_RESOURCE_UUID,
            Response::Err { code, .. } => code.to_u32(),
        }
    }

    /// The error code, if this is an error response.
    pub fn error(&self) -> Option<ErrorCode> {
        match self {
            Response::Err { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Encodes the response in its wire layout.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RESP_CAPSET_INFO_SIZE);
        let hdr = CtrlHdr {
            type_: self.type_(),
            ..*self.hdr()
        };
        hdr.encode_into(&mut out);
        match self {
            Response::OkNoData { reply, .. } => out.extend_from_slice(reply),
            Response::OkMapInfo { map_info, .. } => {
                put_u32(&mut out, *map_info);
                put_u32(&mut out, 0);
            }
            Response::OkDisplayInfo { modes, .. } => {
                for i in 0..VIRTIO_GPU_MAX_SCANOUTS {
                    let m = modes.get(i).copied().unwrap_or_default();
                    for v in [m.x, m.y, m.width, m.height, m.enabled, m.flags] {
                        put_u32(&mut out, v);
                    }
                }
            }
            Response::OkCapsetInfo {
                capset_id,
                capset_max_version,
                capset_max_size,
                ..
            } => {
                put_u32(&mut out, *capset_id);
                put_u32(&mut out, *capset_max_version);
                put_u32(&mut out, *capset_max_size);
                put_u32(&mut out, 0);
            }
            Response::OkCapset { data, .. } => out.extend_from_slice(data),
            Response::OkEdid { edid, .. } => {
                let n = edid.len().min(EDID_MAX_SIZE);
                put_u32(&mut out, n as u32);
                put_u32(&mut out, 0);
                let mut block = [0u8; EDID_MAX_SIZE];
                if let (Some(dst), Some(src)) = (block.get_mut(..n), edid.get(..n)) {
                    dst.copy_from_slice(src);
                }
                out.extend_from_slice(&block);
            }
            Response::OkResourceUuid { uuid, .. } => out.extend_from_slice(uuid),
            Response::Err { .. } => {}
        }
        out
    }

    /// Decodes a response. Never panics. Bytes after an `OK_NODATA` header are its `reply`
    /// (the hostmem extension); bytes after an `OK_CAPSET` header are the capset.
    pub fn parse(bytes: &[u8]) -> Result<Response, WireError> {
        let hdr = CtrlHdr::parse(bytes)?;
        let t = hdr.type_;
        let rest = bytes.get(CTRL_HDR_SIZE..).unwrap_or_default();
        Ok(match t {
            VIRTIO_GPU_RESP_OK_NODATA => Response::OkNoData {
                hdr,
                reply: rest.to_vec(),
            },
            VIRTIO_GPU_RESP_OK_MAP_INFO => {
                let r = Reader::new(bytes, "OK_MAP_INFO", RESP_MAP_INFO_SIZE)?;
                Response::OkMapInfo {
                    hdr,
                    map_info: r.u32(24),
                }
            }
            VIRTIO_GPU_RESP_OK_CAPSET_INFO => {
                let r = Reader::new(bytes, "OK_CAPSET_INFO", RESP_CAPSET_INFO_SIZE)?;
                Response::OkCapsetInfo {
                    hdr,
                    capset_id: r.u32(24),
                    capset_max_version: r.u32(28),
                    capset_max_size: r.u32(32),
                }
            }
            VIRTIO_GPU_RESP_OK_DISPLAY_INFO => {
                let r = Reader::new(bytes, "OK_DISPLAY_INFO", RESP_DISPLAY_INFO_SIZE)?;
                let modes = (0..VIRTIO_GPU_MAX_SCANOUTS)
                    .map(|i| {
                        let at = CTRL_HDR_SIZE + i * DISPLAY_ONE_SIZE;
                        DisplayOne {
                            x: r.u32(at),
                            y: r.u32(at + 4),
                            width: r.u32(at + 8),
                            height: r.u32(at + 12),
                            enabled: r.u32(at + 16),
                            flags: r.u32(at + 20),
                        }
                    })
                    .collect();
                Response::OkDisplayInfo { hdr, modes }
            }
            VIRTIO_GPU_RESP_OK_CAPSET => Response::OkCapset {
                hdr,
                data: rest.to_vec(),
            },
            VIRTIO_GPU_RESP_OK_EDID => {
                let r = Reader::new(bytes, "OK_EDID", RESP_EDID_SIZE)?;
                let size = r.u32(24) as usize;
                if size > EDID_MAX_SIZE {
                    return Err(WireError::BadLength(format!(
                        "OK_EDID: size {size} > {EDID_MAX_SIZE}"
                    )));
                }
                let start = CTRL_HDR_SIZE + 8;
                Response::OkEdid {
                    hdr,
                    edid: bytes.get(start..start + size).unwrap_or_default().to_vec(),
                }
            }
            VIRTIO_GPU_RESP_OK_RESOURCE_UUID => {
                let r = Reader::new(bytes, "OK_RESOURCE_UUID", RESP_RESOURCE_UUID_SIZE)?;
                Response::OkResourceUuid {
                    hdr,
                    uuid: r.arr(CTRL_HDR_SIZE),
                }
            }
            other => match ErrorCode::from_u32(other) {
                Some(code) => Response::Err { hdr, code },
                None => return Err(WireError::UnknownType(other)),
            },
        })
    }

    /// An error response to a command with header `req` (fence echoed).
    pub fn error_for(req: &CtrlHdr, code: ErrorCode) -> Response {
        Response::Err {
            hdr: req.response(code.to_u32()),
            code,
        }
    }

    /// `OK_NODATA` (with hostmem `reply` bytes, usually empty) for `req`.
    pub fn ok_for(req: &CtrlHdr, reply: Vec<u8>) -> Response {
        Response::OkNoData {
            hdr: req.response(VIRTIO_GPU_RESP_OK_NODATA),
            reply,
        }
    }
}
