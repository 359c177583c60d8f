//! The pixel formats and the scanouts' configuration.

use crate::wire::VIRTIO_GPU_MAX_SCANOUTS;

use super::{DEFAULT_HEIGHT, DEFAULT_WIDTH};

/// The pixel formats served (shared with the supervisor, which converts them).
pub use hostmem_ipc::pixel::PixelFormat as Format;

/// The scanouts the device has: one size per scanout, 1 to [`VIRTIO_GPU_MAX_SCANOUTS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayConfig {
    modes: Vec<(u32, u32)>,
}

impl Default for DisplayConfig {
    fn default() -> Self {
        DisplayConfig {
            modes: vec![(DEFAULT_WIDTH, DEFAULT_HEIGHT)],
        }
    }
}

impl DisplayConfig {
    /// Scanouts of these sizes. Refused: none, more than [`VIRTIO_GPU_MAX_SCANOUTS`], a width
    /// or height outside what an EDID detailed timing holds ([`crate::edid::MIN_SIZE`] ..=
    /// [`crate::edid::MAX_SIZE`]).
    pub fn new(modes: Vec<(u32, u32)>) -> Result<DisplayConfig, String> {
        if modes.is_empty() || modes.len() > VIRTIO_GPU_MAX_SCANOUTS {
            return Err(format!(
                "{} scanouts (1 to {VIRTIO_GPU_MAX_SCANOUTS})",
                modes.len()
            ));
        }
        let range = crate::edid::MIN_SIZE..=crate::edid::MAX_SIZE;
        for (w, h) in &modes {
            if !range.contains(w) || !range.contains(h) {
                return Err(format!(
                    "scanout {w}x{h}: width and height must be {} to {}",
                    range.start(),
                    range.end()
                ));
            }
        }
        Ok(DisplayConfig { modes })
    }

    /// Parses `WxH[,WxH...]` (the device's `--display`).
    pub fn parse(s: &str) -> Result<DisplayConfig, String> {
        let modes = s
            .split(',')
            .map(|m| {
                let (w, h) = m
                    .trim()
                    .split_once(['x', 'X'])
                    .ok_or_else(|| format!("{m:?}: expected WIDTHxHEIGHT"))?;
                let n = |v: &str| {
                    v.trim()
                        .parse::<u32>()
                        .map_err(|e| format!("{m:?}: {v:?}: {e}"))
                };
                Ok((n(w)?, n(h)?))
            })
            .collect::<Result<Vec<_>, String>>()?;
        DisplayConfig::new(modes)
    }

    /// The scanouts' sizes.
    pub fn modes(&self) -> &[(u32, u32)] {
        &self.modes
    }

    /// `virtio_gpu_config.num_scanouts`.
    pub fn num_scanouts(&self) -> u32 {
        self.modes.len() as u32
    }
}

impl std::str::FromStr for DisplayConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        DisplayConfig::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_config_parses_and_bounds() {
        assert_eq!(DisplayConfig::default().modes(), &[(1024, 768)]);
        let c = DisplayConfig::parse("1920x1080, 800X600").unwrap();
        assert_eq!(c.modes(), &[(1920, 1080), (800, 600)]);
        assert_eq!(c.num_scanouts(), 2);
        for bad in ["", "1024", "0x768", "1024x0", "5000x100", "axb", "1x2x3"] {
            assert!(DisplayConfig::parse(bad).is_err(), "{bad:?}");
        }
        let many = vec!["64x64"; 17].join(",");
        assert!(DisplayConfig::parse(&many).is_err());
        assert!(DisplayConfig::parse(&vec!["64x64"; 16].join(",")).is_ok());
    }
    #[test]
    fn formats_round_trip_and_unknown_ones_are_none() {
        for f in Format::ALL {
            assert_eq!(Format::from_u32(f.to_u32()), Some(f));
            assert_eq!(f.bytes_per_pixel(), 4);
        }
        for v in [0, 5, 66, 100, 133, 135, u32::MAX] {
            assert_eq!(Format::from_u32(v), None, "{v}");
        }
    }

    #[test]
    fn the_shared_formats_are_the_wire_constants() {
        use crate::wire::*;
        let wire = [
            (Format::B8G8R8A8, VIRTIO_GPU_FORMAT_B8G8R8A8_UNORM),
            (Format::B8G8R8X8, VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM),
            (Format::A8R8G8B8, VIRTIO_GPU_FORMAT_A8R8G8B8_UNORM),
            (Format::X8R8G8B8, VIRTIO_GPU_FORMAT_X8R8G8B8_UNORM),
            (Format::R8G8B8A8, VIRTIO_GPU_FORMAT_R8G8B8A8_UNORM),
            (Format::X8B8G8R8, VIRTIO_GPU_FORMAT_X8B8G8R8_UNORM),
            (Format::A8B8G8R8, VIRTIO_GPU_FORMAT_A8B8G8R8_UNORM),
            (Format::R8G8B8X8, VIRTIO_GPU_FORMAT_R8G8B8X8_UNORM),
        ];
        for (f, v) in wire {
            assert_eq!(f.to_u32(), v, "{f:?}");
        }
    }
}
