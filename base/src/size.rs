//! Sizes on the command line: the one parser every size flag of `hostmem` and
//! `hostmem-gpu-device` uses (`--window`, `--shmem-size`, `--device-memory`,
//! `--blob-budget`, …).
//!
//! A size is a decimal number of bytes with an optional suffix `K`, `M` or `G` (either
//! case, `KiB`/`MiB`/`GiB` too), each a power of 1024: `4096`, `64K`, `256M`, `1G`,
//! `1GiB`. A size that does not fit in 64 bits is refused, as is anything else (a sign,
//! a fraction, hex, an unknown suffix).

/// Why a size was refused; the message names the text and the accepted forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Nothing there.
    #[error("empty size: expected bytes, e.g. 4096, 64K, 256M or 1G")]
    Empty,
    /// Not a number with one of the suffixes.
    #[error("bad size `{0}`: expected decimal bytes with an optional K, M or G suffix (powers of 1024), e.g. 4096, 64K, 256M or 1G")]
    Malformed(String),
    /// The bytes do not fit in 64 bits.
    #[error("size `{0}` is too large (more than 2^64 - 1 bytes)")]
    Overflow(String),
}

/// Parses a size ([module doc](self)); usable as clap's `value_parser`.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let digits = s.bytes().take_while(u8::is_ascii_digit).count();
    let (num, suffix) = s.split_at(digits);
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => return Err(SizeError::Malformed(text.to_string())),
    };
    if num.is_empty() {
        return Err(SizeError::Malformed(text.to_string()));
    }
    // Only digits are left: parsing fails only by overflow.
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::Overflow(text.to_string()))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::Overflow(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes_and_zero() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 268435456 "), Ok(256 << 20));
        assert_eq!(parse_size("0G"), Ok(0));
        assert_eq!(parse_size(&u64::MAX.to_string()), Ok(u64::MAX));
    }

    #[test]
    fn suffixes_are_powers_of_1024() {
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("16g"), Ok(16 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2KiB"), Ok(2048));
        assert_eq!(parse_size("3mib"), Ok(3 << 20));
    }

    #[test]
    fn overflow_is_refused() {
        let max_g = u64::MAX >> 30;
        assert_eq!(parse_size(&format!("{max_g}G")), Ok(max_g << 30));
        for s in [
            format!("{}G", max_g + 1),
            format!("{}K", u64::MAX),
            "18446744073709551616".to_string(),
            "99999999999999999999999M".to_string(),
        ] {
            assert_eq!(parse_size(&s), Err(SizeError::Overflow(s.clone())), "{s}");
        }
        assert!(parse_size("17179869184G")
            .unwrap_err()
            .to_string()
            .contains("too large"));
    }

    #[test]
    fn garbage_is_refused() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("   "), Err(SizeError::Empty));
        for s in [
            "M", "K", "-1", "+1", "1.5G", "0x1000", "12X", "1T", "1 G", "1GB", "1KB", "G1", "abc",
            "1MM", "1e9",
        ] {
            assert_eq!(
                parse_size(s),
                Err(SizeError::Malformed(s.to_string())),
                "{s}"
            );
        }
        let msg = parse_size("12X").unwrap_err().to_string();
        assert!(msg.contains("`12X`") && msg.contains("K, M or G"), "{msg}");
    }
}
