//! The 32-bit pixel formats a virtio-gpu scanout shows: what the device serves and the
//! supervisor converts (virtio-gpu's names give the bytes in memory order: `B8G8R8A8` is the
//! bytes B, G, R, A).

use serde::Serialize;

/// A served `VIRTIO_GPU_FORMAT_*_UNORM`: the 4-byte ones Linux and Mesa use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum PixelFormat {
    /// `B8G8R8A8_UNORM` (1).
    B8G8R8A8,
    /// `B8G8R8X8_UNORM` (2).
    B8G8R8X8,
    /// `A8R8G8B8_UNORM` (3).
    A8R8G8B8,
    /// `X8R8G8B8_UNORM` (4).
    X8R8G8B8,
    /// `R8G8B8A8_UNORM` (67).
    R8G8B8A8,
    /// `X8B8G8R8_UNORM` (68).
    X8B8G8R8,
    /// `A8B8G8R8_UNORM` (121).
    A8B8G8R8,
    /// `R8G8B8X8_UNORM` (134).
    R8G8B8X8,
}

impl PixelFormat {
    /// Every format served.
    pub const ALL: [PixelFormat; 8] = [
        PixelFormat::B8G8R8A8,
        PixelFormat::B8G8R8X8,
        PixelFormat::A8R8G8B8,
        PixelFormat::X8R8G8B8,
        PixelFormat::R8G8B8A8,
        PixelFormat::X8B8G8R8,
        PixelFormat::A8B8G8R8,
        PixelFormat::R8G8B8X8,
    ];

    /// The format of a `VIRTIO_GPU_FORMAT_*` value, if it is served.
    pub fn from_u32(v: u32) -> Option<PixelFormat> {
        PixelFormat::ALL.into_iter().find(|f| f.to_u32() == v)
    }

    /// The wire value.
    pub fn to_u32(self) -> u32 {
        match self {
            PixelFormat::B8G8R8A8 => 1,
            PixelFormat::B8G8R8X8 => 2,
            PixelFormat::A8R8G8B8 => 3,
            PixelFormat::X8R8G8B8 => 4,
            PixelFormat::R8G8B8A8 => 67,
            PixelFormat::X8B8G8R8 => 68,
            PixelFormat::A8B8G8R8 => 121,
            PixelFormat::R8G8B8X8 => 134,
        }
    }

    /// Bytes per pixel (4 for every format served).
    pub fn bytes_per_pixel(self) -> u32 {
        4
    }

    /// Where R, G, B and A (`None`: X, opaque) are in a pixel's 4 bytes.
    fn layout(self) -> ([usize; 3], Option<usize>) {
        match self {
            PixelFormat::B8G8R8A8 => ([2, 1, 0], Some(3)),
            PixelFormat::B8G8R8X8 => ([2, 1, 0], None),
            PixelFormat::A8R8G8B8 => ([1, 2, 3], Some(0)),
            PixelFormat::X8R8G8B8 => ([1, 2, 3], None),
            PixelFormat::R8G8B8A8 => ([0, 1, 2], Some(3)),
            PixelFormat::X8B8G8R8 => ([3, 2, 1], None),
            PixelFormat::A8B8G8R8 => ([3, 2, 1], Some(0)),
            PixelFormat::R8G8B8X8 => ([0, 1, 2], None),
        }
    }

    /// One pixel's 4 bytes as RGBA (X reads as opaque).
    pub fn to_rgba(self, px: [u8; 4]) -> [u8; 4] {
        let ([r, g, b], a) = self.layout();
        let at = |i: usize| px.get(i).copied().unwrap_or(0);
        [at(r), at(g), at(b), a.map_or(0xff, at)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_round_trip_and_nothing_else_is_served() {
        for f in PixelFormat::ALL {
            assert_eq!(PixelFormat::from_u32(f.to_u32()), Some(f));
        }
        let served = (0..=200).filter_map(PixelFormat::from_u32).count();
        assert_eq!(served, 8);
        assert_eq!(PixelFormat::from_u32(0), None);
    }
}
