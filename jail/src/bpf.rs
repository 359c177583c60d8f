//! Classic-BPF code generation for seccomp: symbolic jumps, then layout with long-jump
//! relaxation (a conditional jump farther than 255 instructions becomes a short jump over
//! an unconditional `ja`, whose offset is 32 bits).

use hostmem_base::seccomp::SockFilter;

/// `BPF_LD | BPF_W | BPF_ABS`.
pub const LD_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JA`.
pub const JA: u16 = 0x05;
/// `BPF_JMP | BPF_JEQ | BPF_K`.
pub const JEQ: u16 = 0x15;
/// `BPF_JMP | BPF_JGT | BPF_K`.
pub const JGT: u16 = 0x25;
/// `BPF_JMP | BPF_JGE | BPF_K`.
pub const JGE: u16 = 0x35;
/// `BPF_JMP | BPF_JSET | BPF_K`.
pub const JSET: u16 = 0x45;
/// `BPF_RET | BPF_K`.
pub const RET: u16 = 0x06;

/// Offsets in `struct seccomp_data`.
pub mod data {
    /// Syscall number.
    pub const NR: u32 = 0;
    /// AUDIT_ARCH_*.
    pub const ARCH: u32 = 4;
    /// Low 32 bits of argument `i`.
    pub fn arg_lo(i: u8) -> u32 {
        16 + 8 * u32::from(i)
    }
    /// High 32 bits of argument `i`.
    pub fn arg_hi(i: u8) -> u32 {
        arg_lo(i) + 4
    }
}

/// A jump target.
pub type Label = usize;

/// One symbolic instruction.
#[derive(Debug, Clone, Copy)]
pub enum Insn {
    /// Load a 32-bit word of seccomp_data.
    Load(u32),
    /// Conditional jump on `A op k`.
    Jump {
        /// JEQ/JGT/JGE/JSET.
        op: u16,
        /// Constant.
        k: u32,
        /// Target if true.
        t: Label,
        /// Target if false.
        f: Label,
    },
    /// Unconditional jump.
    Goto(Label),
    /// Return a seccomp action.
    Ret(u32),
    /// Defines a label here.
    Mark(Label),
}

/// A program under construction.
#[derive(Debug, Default)]
pub struct Builder {
    insns: Vec<Insn>,
    labels: usize,
}

impl Builder {
    /// A new label.
    pub fn label(&mut self) -> Label {
        self.labels += 1;
        self.labels - 1
    }
    /// Appends an instruction.
    pub fn push(&mut self, i: Insn) {
        self.insns.push(i);
    }
    /// Places `l` here.
    pub fn mark(&mut self, l: Label) {
        self.insns.push(Insn::Mark(l));
    }

    /// Lays the program out. Every conditional jump starts short; any whose distance does
    /// not fit in 8 bits becomes `jcc 0,1; ja t; ja f` and the layout is redone until stable.
    pub fn assemble(&self) -> Vec<SockFilter> {
        let mut long = vec![false; self.insns.len()];
        loop {
            // Addresses.
            let mut addr = vec![0usize; self.labels];
            let mut pos = Vec::with_capacity(self.insns.len());
            let mut pc = 0usize;
            for (i, ins) in self.insns.iter().enumerate() {
                pos.push(pc);
                pc += match ins {
                    Insn::Mark(l) => {
                        addr[*l] = pc;
                        0
                    }
                    Insn::Jump { .. } if long[i] => 3,
                    _ => 1,
                };
            }
            let mut out = Vec::with_capacity(pc);
            let mut grew = false;
            for (i, ins) in self.insns.iter().enumerate() {
                let here = pos[i];
                match *ins {
                    Insn::Mark(_) => {}
                    Insn::Load(off) => out.push(SockFilter {
                        code: LD_ABS,
                        jt: 0,
                        jf: 0,
                        k: off,
                    }),
                    Insn::Ret(k) => out.push(SockFilter {
                        code: RET,
                        jt: 0,
                        jf: 0,
                        k,
                    }),
                    Insn::Goto(l) => out.push(SockFilter {
                        code: JA,
                        jt: 0,
                        jf: 0,
                        k: (addr[l] - here - 1) as u32,
                    }),
                    Insn::Jump { op, k, t, f } => {
                        if long[i] {
                            out.push(SockFilter {
                                code: op,
                                jt: 0,
                                jf: 1,
                                k,
                            });
                            out.push(SockFilter {
                                code: JA,
                                jt: 0,
                                jf: 0,
                                k: (addr[t] - here - 2) as u32,
                            });
                            out.push(SockFilter {
                                code: JA,
                                jt: 0,
                                jf: 0,
                                k: (addr[f] - here - 3) as u32,
                            });
                        } else {
                            let (dt, df) = (addr[t] - here - 1, addr[f] - here - 1);
                            if dt > 255 || df > 255 {
                                long[i] = true;
                                grew = true;
                            }
                            out.push(SockFilter {
                                code: op,
                                jt: dt as u8,
                                jf: df as u8,
                                k,
                            });
                        }
                    }
                }
            }
            if !grew {
                return out;
            }
        }
    }
}
