//! A classic-BPF interpreter for seccomp programs: evaluates a compiled filter on a
//! `seccomp_data` without the kernel, for table tests and `hostmem policy explain`. It runs
//! the instructions seccomp allows (loads of seccomp_data words, ALU, jumps, returns,
//! scratch memory); anything else, or a jump out of the program, is an error, as the
//! kernel's verifier would refuse it.

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

/// Runs `prog` on `d`; returns the `SECCOMP_RET_*` value.
pub fn run(prog: &[SockFilter], d: &SeccompData) -> Result<u32, String> {
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
                    0x30 => a.checked_div(src).ok_or("division by zero")?,
                    0x40 => a | src,
                    0x50 => a & src,
                    0x60 => a.checked_shl(src).unwrap_or(0),
                    0x70 => a.checked_shr(src).unwrap_or(0),
                    0x80 => a.wrapping_neg(),
                    0x90 => a.checked_rem(src).ok_or("division by zero")?,
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
