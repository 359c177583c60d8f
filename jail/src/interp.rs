//! A classic-BPF interpreter for seccomp programs: evaluates a compiled filter on a
//! `seccomp_data` without the kernel, for table tests and `hostmem policy explain`.
//!
//! [`check`] refuses exactly what the kernel refuses when the filter is installed
//! (`bpf_check_classic` + `seccomp_check_filter`): an empty or too long program, an
//! instruction outside seccomp's subset (loads other than aligned 32-bit words of
//! `seccomp_data`, `BPF_IND`/`BPF_MSH`, `MOD`, `RET X`, ...), a constant division by zero or
//! shift by 32 or more, a scratch cell out of range or read before it is written on some
//! path, a jump past the end, and a program whose last instruction is not a return.
//! [`run`] checks first, then evaluates as the kernel does (a division by a zero `X`
//! returns 0, i.e. kills). `tests/kernel_verdicts.rs` compares both with the kernel.

use hostmem_base::seccomp::SockFilter;

/// `struct seccomp_data`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SeccompData {
    /// Syscall number.
    pub nr: u32,
    /// AUDIT_ARCH_* value.
    pub arch: u32,
    /// Instruction pointer.
    pub ip: u64,
    /// Arguments.
    pub args: [u64; 6],
}

/// AUDIT_ARCH_X86_64.
pub const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

impl SeccompData {
    /// An x86-64 call of `nr` with `args`.
    pub fn x86_64(nr: u32, args: [u64; 6]) -> Self {
        SeccompData {
            nr,
            arch: AUDIT_ARCH_X86_64,
            ip: 0,
            args,
        }
    }

    fn word(&self, off: u32) -> Option<u32> {
        let mut b = [0u8; 64];
        b[0..4].copy_from_slice(&self.nr.to_le_bytes());
        b[4..8].copy_from_slice(&self.arch.to_le_bytes());
        b[8..16].copy_from_slice(&self.ip.to_le_bytes());
        for (i, a) in self.args.iter().enumerate() {
            b[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let o = off as usize;
        (off.is_multiple_of(4) && o + 4 <= 64)
            .then(|| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]))
    }
}

/// Scratch memory cells (`BPF_MEMWORDS`).
const MEMWORDS: u32 = 16;

/// Whether seccomp allows instruction code `code` (`seccomp_check_filter`'s list; the
/// `BPF_LD|W|ABS` offset is checked by [`check`]).
fn code_allowed(code: u16) -> bool {
    const ALU_OPS: [u16; 9] = [0x00, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0xa0];
    match code {
        0x20 | 0x80 | 0x81 => true, // ld [k]; ld #len; ldx #len
        0x06 | 0x16 => true,        // ret k; ret a
        0x84 => true,               // neg
        0x00 | 0x01 | 0x07 | 0x87 | 0x60 | 0x61 | 0x02 | 0x03 => true,
        0x05 => true, // ja
        0x15 | 0x1d | 0x25 | 0x2d | 0x35 | 0x3d | 0x45 | 0x4d => true,
        c if c & 0x07 == 0x04 => ALU_OPS.contains(&(c & 0xf0)) && c & !0xf8 == 0x04,
        _ => false,
    }
}

/// Refuses what the kernel refuses to install (see the module doc).
pub fn check(prog: &[SockFilter]) -> Result<(), String> {
    let len = prog.len();
    if len == 0 || len > hostmem_base::seccomp::BPF_MAXINSNS {
        return Err(format!("{len} instructions"));
    }
    for (pc, i) in prog.iter().enumerate() {
        let at = |what: &str| format!("instruction {pc} ({:#06x} k {:#x}): {what}", i.code, i.k);
        if !code_allowed(i.code) {
            return Err(at("not allowed in a seccomp filter"));
        }
        match i.code {
            0x20 if i.k >= 64 || i.k % 4 != 0 => {
                return Err(at("load outside seccomp_data or not 32-bit aligned"))
            }
            0x34 if i.k == 0 => return Err(at("division by zero")),
            0x64 | 0x74 if i.k >= 32 => return Err(at("shift by 32 or more")),
            0x60 | 0x61 | 0x02 | 0x03 if i.k >= MEMWORDS => {
                return Err(at("scratch cell out of range"))
            }
            0x05 if i.k as usize >= len - pc - 1 => return Err(at("jump past the end")),
            c if c & 0x07 == 0x05
                && c != 0x05
                && (pc + usize::from(i.jt) + 1 >= len || pc + usize::from(i.jf) + 1 >= len) =>
            {
                return Err(at("jump past the end"))
            }
            _ => {}
        }
    }
    if !matches!(prog[len - 1].code, 0x06 | 0x16) {
        return Err("the last instruction is not a return".into());
    }
    // check_load_and_stores: a scratch cell must be written on every path before a load.
    let mut masks = vec![u16::MAX; len];
    let mut valid: u16 = 0;
    for (pc, i) in prog.iter().enumerate() {
        valid &= masks[pc];
        match i.code {
            0x02 | 0x03 => valid |= 1 << i.k,
            0x60 | 0x61 if valid & (1 << i.k) == 0 => {
                return Err(format!(
                    "instruction {pc}: scratch cell {} read before it is written",
                    i.k
                ))
            }
            0x05 => {
                masks[pc + 1 + i.k as usize] &= valid;
                valid = u16::MAX;
            }
            c if c & 0x07 == 0x05 => {
                masks[pc + 1 + usize::from(i.jt)] &= valid;
                masks[pc + 1 + usize::from(i.jf)] &= valid;
                valid = u16::MAX;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Runs `prog` on `d` after [`check`]; returns the `SECCOMP_RET_*` value.
pub fn run(prog: &[SockFilter], d: &SeccompData) -> Result<u32, String> {
    check(prog)?;
    let (mut a, mut x) = (0u32, 0u32);
    let mut mem = [0u32; 16];
    let mut pc = 0usize;
    for _ in 0..=prog.len() {
        let i = prog
            .get(pc)
            .ok_or_else(|| format!("pc {pc} outside the program"))?;
        pc += 1;
        let src = if i.code & 0x08 != 0 { x } else { i.k };
        match i.code & 0x07 {
            0x00 => {
                // LD
                a = match i.code & 0xe0 {
                    0x20 => d.word(i.k).ok_or("bad load offset")?,
                    0x00 => i.k,
                    0x60 => *mem.get(i.k as usize).ok_or("bad scratch index")?,
                    0x80 => 64, // BPF_LEN: sizeof(seccomp_data)
                    m => return Err(format!("unsupported load mode {m:#x}")),
                }
            }
            0x01 => {
                x = match i.code & 0xe0 {
                    0x00 => i.k,
                    0x60 => *mem.get(i.k as usize).ok_or("bad scratch index")?,
                    0x80 => 64,
                    m => return Err(format!("unsupported ldx mode {m:#x}")),
                }
            }
            0x02 => *mem.get_mut(i.k as usize).ok_or("bad scratch index")? = a,
            0x03 => *mem.get_mut(i.k as usize).ok_or("bad scratch index")? = x,
            0x04 => {
                a = match i.code & 0xf0 {
                    0x00 => a.wrapping_add(src),
                    0x10 => a.wrapping_sub(src),
                    0x20 => a.wrapping_mul(src),
                    // A zero X: the kernel's converted filter returns 0 (kill).
                    0x30 => match a.checked_div(src) {
                        Some(q) => q,
                        None => return Ok(0),
                    },
                    0x40 => a | src,
                    0x50 => a & src,
                    0x60 => a.checked_shl(src).unwrap_or(0),
                    0x70 => a.checked_shr(src).unwrap_or(0),
                    0x80 => a.wrapping_neg(),
                    0xa0 => a ^ src,
                    op => return Err(format!("unsupported alu op {op:#x}")),
                }
            }
            0x05 => {
                let off = match i.code & 0xf0 {
                    0x00 => i.k as usize,
                    op => {
                        let c = match op {
                            0x10 => a == src,
                            0x20 => a > src,
                            0x30 => a >= src,
                            0x40 => a & src != 0,
                            _ => return Err(format!("unsupported jump {op:#x}")),
                        };
                        usize::from(if c { i.jt } else { i.jf })
                    }
                };
                pc = pc.checked_add(off).ok_or("jump overflow")?;
            }
            0x06 => return Ok(if i.code & 0x18 == 0x10 { a } else { i.k }),
            0x07 => {
                if i.code & 0xf8 == 0 {
                    x = a
                } else {
                    a = x
                }
            }
            _ => unreachable!("3-bit class"),
        }
    }
    Err("program does not terminate".into())
}
