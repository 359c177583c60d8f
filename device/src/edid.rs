//! The EDID a scanout answers `GET_EDID` with: one 128-byte EDID 1.4 base block (VESA
//! E-EDID A2), no extensions, describing a digital display whose preferred (and native)
//! mode is the scanout's size.
//!
//! # The block
//!
//! | bytes | what |
//! |---|---|
//! | 0..8 | the fixed header `00 FF FF FF FF FF FF 00` |
//! | 8..10 | manufacturer id [`MANUFACTURER`] (three 5-bit letters, big-endian) |
//! | 10..12 | product code [`PRODUCT_CODE`], 12..16 serial number (the scanout's index + 1) |
//! | 16, 17 | week 0 (unknown), year [`YEAR`] − 1990 |
//! | 18, 19 | version 1, revision 4 |
//! | 20 | digital input, 8 bits per colour |
//! | 21, 22 | image size in cm (at [`MM_PER_PIXEL_X1000`], 0.264 mm a pixel: 96 dpi) |
//! | 23 | gamma 2.2 |
//! | 24 | features: sRGB default colour space, preferred timing is native, RGB 4:4:4 |
//! | 25..35 | sRGB chromaticity (primaries and D65 white, 10-bit fractions) |
//! | 35..38 | no established timings; 38..54 all eight standard timings unused (`01 01`) |
//! | 54..72 | detailed timing descriptor: the scanout's size, [`REFRESH_HZ`] Hz (lower when the pixel clock would not fit 16 bits of 10 kHz), reduced blanking, positive syncs |
//! | 72..90 | display range limits (`FD`): 24–75 Hz vertical, 1–255 kHz horizontal, pixel clock up to 660 MHz, no timing formula |
//! | 90..108 | display product name (`FC`) `hostmem` |
//! | 108..126 | dummy descriptor (`10`) |
//! | 126 | no extension blocks; 127 the checksum: all 128 bytes sum to 0 mod 256 |
//!
//! Sizes must fit the descriptor's 12-bit fields: [`MIN_SIZE`] ..= [`MAX_SIZE`]
//! ([`crate::display::DisplayConfig`] refuses others).

/// Bytes of an EDID base block.
pub const EDID_BLOCK: usize = 128;
/// The fixed header of every EDID.
pub const HEADER: [u8; 8] = [0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00];
/// Manufacturer id (PNP id letters).
pub const MANUFACTURER: [u8; 3] = *b"HMD";
/// Product code.
pub const PRODUCT_CODE: u16 = 0x1234;
/// Year of manufacture written in the block.
pub const YEAR: u16 = 2025;
/// Refresh rate of the detailed timing, when the pixel clock allows it.
pub const REFRESH_HZ: u32 = 60;
/// Smallest width or height a detailed timing describes here.
pub const MIN_SIZE: u32 = 16;
/// Largest width or height: the detailed timing's active fields have 12 bits.
pub const MAX_SIZE: u32 = 4095;
/// Physical size of a pixel in µm (96 dpi).
pub const MM_PER_PIXEL_X1000: u32 = 264;

/// Horizontal blanking (CVT reduced blanking): front porch, sync, back porch.
const H_FRONT: u32 = 48;
const H_SYNC: u32 = 32;
const H_BACK: u32 = 80;
/// Vertical blanking: front porch, sync, back porch.
const V_FRONT: u32 = 3;
const V_SYNC: u32 = 5;
const V_BACK: u32 = 15;
/// Largest pixel clock the descriptor holds, in Hz (16 bits of 10 kHz).
const MAX_CLOCK_HZ: u64 = 0xffff * 10_000;

/// The timing of the detailed descriptor for a `width` × `height` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Active pixels per line.
    pub width: u32,
    /// Active lines.
    pub height: u32,
    /// Pixel clock in units of 10 kHz.
    pub clock_10khz: u16,
    /// Pixels of horizontal blanking.
    pub h_blank: u32,
    /// Lines of vertical blanking.
    pub v_blank: u32,
    /// Whole frames per second at that clock.
    pub refresh_hz: u32,
}

impl Timing {
    /// The timing for `width` × `height` (each clamped to [`MIN_SIZE`] ..= [`MAX_SIZE`]):
    /// [`REFRESH_HZ`], or the highest whole rate the 16-bit clock allows.
    pub fn for_mode(width: u32, height: u32) -> Timing {
        let width = width.clamp(MIN_SIZE, MAX_SIZE);
        let height = height.clamp(MIN_SIZE, MAX_SIZE);
        let h_blank = H_FRONT + H_SYNC + H_BACK;
        let v_blank = V_FRONT + V_SYNC + V_BACK;
        let total = u64::from(width + h_blank) * u64::from(height + v_blank);
        let refresh = (MAX_CLOCK_HZ / total).min(u64::from(REFRESH_HZ)).max(1);
        // Rounded up to the next 10 kHz, then capped (the cap only bites for refresh 1).
        let clock = (total * refresh).div_ceil(10_000).min(0xffff);
        Timing {
            width,
            height,
            clock_10khz: u16::try_from(clock).unwrap_or(u16::MAX),
            h_blank,
            v_blank,
            refresh_hz: refresh as u32,
        }
    }
}

/// The EDID base block for a scanout of `width` × `height`; `serial` goes into bytes
/// 12..16 (the device writes the scanout's index + 1).
pub fn edid(width: u32, height: u32, serial: u32) -> [u8; EDID_BLOCK] {
    let t = Timing::for_mode(width, height);
    let mut b = [0u8; EDID_BLOCK];
    b[..8].copy_from_slice(&HEADER);
    let [m0, m1, m2] = MANUFACTURER.map(|c| u16::from(c.saturating_sub(b'A') + 1) & 0x1f);
    let id = (m0 << 10) | (m1 << 5) | m2;
    b[8..10].copy_from_slice(&id.to_be_bytes());
    b[10..12].copy_from_slice(&PRODUCT_CODE.to_le_bytes());
    b[12..16].copy_from_slice(&serial.to_le_bytes());
    b[16] = 0;
    b[17] = u8::try_from(YEAR - 1990).unwrap_or(0);
    b[18] = 1;
    b[19] = 4;
    // Digital input, 8 bits per primary (bits 6..4 = 010), interface not defined.
    b[20] = 0x80 | 0x20;
    let (w_mm, h_mm) = (mm(t.width), mm(t.height));
    b[21] = u8::try_from(w_mm.div_ceil(10)).unwrap_or(u8::MAX);
    b[22] = u8::try_from(h_mm.div_ceil(10)).unwrap_or(u8::MAX);
    // Gamma 2.2: (gamma × 100) − 100.
    b[23] = 120;
    // sRGB default (bit 2), preferred timing mode is native (bit 1), RGB 4:4:4 (bits 4..3 = 00).
    b[24] = 0x04 | 0x02;
    chromaticity(&mut b[25..35]);
    // No established timings (35..38); standard timings unused.
    for i in 0..8 {
        b[38 + 2 * i] = 0x01;
        b[39 + 2 * i] = 0x01;
    }
    detailed_timing(&mut b[54..72], &t, w_mm, h_mm);
    range_limits(&mut b[72..90]);
    text_descriptor(&mut b[90..108], 0xfc, b"hostmem");
    // Dummy descriptor: tag 0x10, everything else zero.
    b[108 + 3] = 0x10;
    b[126] = 0;
    b[127] = checksum_byte(&b[..127]);
    b
}

/// Millimetres of `pixels` at [`MM_PER_PIXEL_X1000`].
fn mm(pixels: u32) -> u32 {
    (pixels * MM_PER_PIXEL_X1000).div_ceil(1000)
}

/// The byte that makes `bytes` plus it sum to 0 mod 256.
fn checksum_byte(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    0u8.wrapping_sub(sum)
}

/// True when `block` is a base block: the header, and its bytes summing to 0 mod 256.
pub fn valid(block: &[u8]) -> bool {
    block.len() == EDID_BLOCK
        && block.get(..8) == Some(&HEADER[..])
        && block.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

/// sRGB primaries and D65 white point as 10-bit binary fractions, in the block's layout
/// (two bytes of low bits, then the high 8 bits of Rx Ry Gx Gy Bx By Wx Wy).
fn chromaticity(out: &mut [u8]) {
    // round(v × 1024) of 0.640 0.330 0.300 0.600 0.150 0.060 0.3127 0.3290.
    let v: [u16; 8] = [655, 338, 307, 614, 154, 61, 320, 337];
    let lo = |a: u16, b: u16, c: u16, d: u16| {
        (((a & 3) << 6) | ((b & 3) << 4) | ((c & 3) << 2) | (d & 3)) as u8
    };
    out[0] = lo(v[0], v[1], v[2], v[3]);
    out[1] = lo(v[4], v[5], v[6], v[7]);
    for (o, x) in out[2..10].iter_mut().zip(v) {
        *o = (x >> 2) as u8;
    }
}

fn detailed_timing(d: &mut [u8], t: &Timing, w_mm: u32, h_mm: u32) {
    d[0..2].copy_from_slice(&t.clock_10khz.to_le_bytes());
    let lo = |v: u32| (v & 0xff) as u8;
    let hi4 = |v: u32| ((v >> 8) & 0x0f) as u8;
    d[2] = lo(t.width);
    d[3] = lo(t.h_blank);
    d[4] = (hi4(t.width) << 4) | hi4(t.h_blank);
    d[5] = lo(t.height);
    d[6] = lo(t.v_blank);
    d[7] = (hi4(t.height) << 4) | hi4(t.v_blank);
    d[8] = lo(H_FRONT);
    d[9] = lo(H_SYNC);
    d[10] = (((V_FRONT & 0x0f) << 4) | (V_SYNC & 0x0f)) as u8;
    d[11] = ((((H_FRONT >> 8) & 3) << 6)
        | (((H_SYNC >> 8) & 3) << 4)
        | (((V_FRONT >> 4) & 3) << 2)
        | ((V_SYNC >> 4) & 3)) as u8;
    d[12] = lo(w_mm);
    d[13] = lo(h_mm);
    d[14] = (hi4(w_mm) << 4) | hi4(h_mm);
    d[15] = 0;
    d[16] = 0;
    // Digital separate sync (bits 4..3 = 11), vsync + (bit 2), hsync + (bit 1), progressive.
    d[17] = 0x18 | 0x04 | 0x02;
}

fn range_limits(d: &mut [u8]) {
    d[3] = 0xfd;
    d[4] = 0; // no offsets
    d[5] = 24; // min vertical Hz
    d[6] = 75; // max vertical Hz
    d[7] = 1; // min horizontal kHz
    d[8] = 255; // max horizontal kHz
    d[9] = 66; // max pixel clock / 10 MHz (≥ 655.35 MHz, the descriptor's maximum)
    d[10] = 0x01; // range limits only, no timing formula
    d[11] = 0x0a;
    for x in &mut d[12..18] {
        *x = 0x20;
    }
}

/// A display descriptor with text: `tag` (0xFC name, 0xFF serial, 0xFE text), at most 13
/// bytes, ended by a line feed and padded with spaces.
fn text_descriptor(d: &mut [u8], tag: u8, text: &[u8]) {
    d[3] = tag;
    let field = &mut d[5..18];
    field.fill(0x20);
    let n = text.len().min(13);
    field[..n].copy_from_slice(&text[..n]);
    if n < 13 {
        field[n] = 0x0a;
    }
}

/// What a base block's first detailed timing says: `(width, height, clock in 10 kHz)`,
/// `None` when the first descriptor is not a timing (clock 0). For tests and tools.
pub fn preferred_mode(block: &[u8]) -> Option<(u32, u32, u16)> {
    let d = block.get(54..72)?;
    let clock = u16::from_le_bytes([d[0], d[1]]);
    if clock == 0 {
        return None;
    }
    let w = u32::from(d[2]) | (u32::from(d[4] >> 4) << 8);
    let h = u32::from(d[5]) | (u32::from(d[7] >> 4) << 8);
    Some((w, h, clock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_block_is_valid_and_describes_its_mode() {
        let b = edid(1024, 768, 1);
        assert!(valid(&b));
        assert_eq!(preferred_mode(&b).map(|m| (m.0, m.1)), Some((1024, 768)));
        assert_eq!((b[18], b[19]), (1, 4), "EDID 1.4");
        assert_eq!(&b[8..10], &[0x21, 0xa4], "HMD: 01000 01101 00100");
        assert_eq!(b[126], 0, "no extensions");
        // 60 Hz: (1024 + 160) × (768 + 23) × 60 = 56.19 MHz.
        let t = Timing::for_mode(1024, 768);
        assert_eq!((t.refresh_hz, t.clock_10khz), (60, 5620));
        assert_eq!(&b[90 + 5..90 + 13], b"hostmem\n");
    }

    #[test]
    fn every_size_gives_a_valid_block_with_a_fitting_clock() {
        for (w, h) in [
            (16, 16),
            (640, 480),
            (1920, 1080),
            (3840, 2160),
            (4095, 4095),
            (4095, 16),
        ] {
            let b = edid(w, h, 7);
            assert!(valid(&b), "{w}x{h}");
            let (pw, ph, clock) = preferred_mode(&b).unwrap();
            assert_eq!((pw, ph), (w, h));
            let t = Timing::for_mode(w, h);
            let total = u64::from(w + t.h_blank) * u64::from(h + t.v_blank);
            // The clock is at least what the refresh needs, within one 10 kHz step.
            let need = total * u64::from(t.refresh_hz);
            assert!(u64::from(clock) * 10_000 >= need, "{w}x{h}");
            assert!(u64::from(clock) * 10_000 < need + 10_000, "{w}x{h}");
            // The range descriptor admits the mode.
            assert!(
                (24..=75).contains(&t.refresh_hz),
                "{w}x{h}: {}",
                t.refresh_hz
            );
        }
        let mut b = edid(800, 600, 1);
        b[40] ^= 1;
        assert!(!valid(&b), "a changed byte breaks the checksum");
    }
}
