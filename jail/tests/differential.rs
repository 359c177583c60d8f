//! Differential test: for policies in the subset that `seccompiler` can express (==, !=, <,
//! <=, >, >=, `&` (any bit of a mask) and `in` (no bit outside a mask) on all six 64-bit
//! arguments, allow vs kill), random `seccomp_data` get the same verdict from our compiled
//! filter and from seccompiler's, both run through our interpreter. (`tests/kernel_verdicts.rs`
//! checks the interpreter against the kernel.) `arg & M` has no single seccompiler
//! condition: it is "some bit of M is set", i.e. one rule per bit of M (`MaskedEq(bit) ==
//! bit`); `arg in M` is `MaskedEq(!M) == 0`.

use std::collections::BTreeMap;

use hostmem_base::seccomp::SockFilter;
use hostmem_jail::compiler::{compile, CompileOptions};
use hostmem_jail::interp::{run, SeccompData};
use hostmem_jail::policy::{parse_str, Action, ParseOptions};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The workspace's seeded generator.
type Rng = hostmem_base::rng::SplitMix64;

const VALUES: [u64; 9] = [
    0,
    1,
    5,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    0x1_0000_0005,
    0xffff_ffff_0000_0000,
    u64::MAX,
];
/// An operator in policy syntax and its seccompiler equivalent.
type OpPair = (&'static str, fn(u64) -> SeccompCmpOp);

const OPS: [OpPair; 6] = [
    ("==", |_| SeccompCmpOp::Eq),
    ("!=", |_| SeccompCmpOp::Ne),
    ("<", |_| SeccompCmpOp::Lt),
    ("<=", |_| SeccompCmpOp::Le),
    (">", |_| SeccompCmpOp::Gt),
    (">=", |_| SeccompCmpOp::Ge),
];
const SYSCALLS: [(&str, i64); 5] = [
    ("read", 0),
    ("write", 1),
    ("close", 3),
    ("mmap", 9),
    ("ioctl", 16),
];

/// Bit positions for `&` masks and single-bit arguments: both words, their edges.
const BITS: [u32; 8] = [0, 1, 5, 31, 32, 33, 40, 63];

/// A mask for `in` (and an argument value that may or may not fit in it).
fn mask(r: &mut Rng) -> u64 {
    match r.below(4) {
        0 => value(r),
        1 => 0xffff_ffff,
        2 => r.next_u64() & r.next_u64(),
        _ => (0..1 + r.below(3)).fold(0, |m, _| {
            m | 1u64 << BITS[r.below(BITS.len() as u64) as usize]
        }),
    }
}

fn value(r: &mut Rng) -> u64 {
    let v = VALUES[r.below(VALUES.len() as u64) as usize];
    match r.below(4) {
        0 => v.wrapping_add(1),
        1 => v.wrapping_sub(1),
        _ => v,
    }
}

fn to_ours(p: &BpfProgram) -> Vec<SockFilter> {
    p.iter()
        .map(|i| SockFilter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect()
}

#[test]
fn same_verdicts_as_seccompiler_on_random_policies_and_calls() {
    let mut r = Rng::new(42);
    let mut calls = 0u64;
    for _policy in 0..60 {
        let mut text = String::new();
        let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
        for (name, nr) in SYSCALLS {
            if r.below(5) == 0 {
                continue; // not listed: killed by both
            }
            let mut ors = Vec::new();
            let mut sc_rules = Vec::new();
            for _ in 0..1 + r.below(3) {
                let mut ands = Vec::new();
                let mut conds = Vec::new();
                // `arg & M` of this conjunction: (arg, the bits of M), at most one.
                let mut any_bit: Option<(u8, Vec<u64>)> = None;
                for _ in 0..1 + r.below(3) {
                    let arg = r.below(6) as u8;
                    let cond = |op, v| SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, v);
                    match r.below(8) {
                        0 if any_bit.is_none() => {
                            let bits: Vec<u64> = (0..1 + r.below(2))
                                .map(|_| 1u64 << BITS[r.below(BITS.len() as u64) as usize])
                                .collect::<std::collections::BTreeSet<_>>()
                                .into_iter()
                                .collect();
                            let m = bits.iter().fold(0, |a, b| a | b);
                            ands.push(format!("arg{arg} & {m:#x}"));
                            any_bit = Some((arg, bits));
                        }
                        1 => {
                            let m = mask(&mut r);
                            ands.push(format!("arg{arg} in {m:#x}"));
                            conds.push(cond(SeccompCmpOp::MaskedEq(!m), 0).unwrap());
                        }
                        _ => {
                            let (op, mk) = OPS[r.below(OPS.len() as u64) as usize];
                            let v = value(&mut r);
                            ands.push(format!("arg{arg} {op} {v:#x}"));
                            conds.push(cond(mk(v), v).unwrap());
                        }
                    }
                }
                ors.push(ands.join(" && "));
                match any_bit {
                    Some((arg, bits)) => {
                        for b in bits {
                            let mut c = conds.clone();
                            c.push(
                                SeccompCondition::new(
                                    arg,
                                    SeccompCmpArgLen::Qword,
                                    SeccompCmpOp::MaskedEq(b),
                                    b,
                                )
                                .unwrap(),
                            );
                            sc_rules.push(SeccompRule::new(c).unwrap());
                        }
                    }
                    None => sc_rules.push(SeccompRule::new(conds).unwrap()),
                }
            }
            text.push_str(&format!("{name}: {}\n", ors.join(" || ")));
            rules.insert(nr, sc_rules);
        }
        let ours = compile(
            &parse_str(&text, &ParseOptions::default()).unwrap(),
            &CompileOptions::default(),
        )
        .unwrap();
        let theirs: BpfProgram = SeccompFilter::new(
            rules,
            SeccompAction::KillProcess,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .unwrap()
        .try_into()
        .unwrap();
        let theirs = to_ours(&theirs);
        for _ in 0..400 {
            let nr = if r.below(10) == 0 {
                2
            } else {
                SYSCALLS[r.below(5) as usize].1 as u32
            };
            let mut args = [0u64; 6];
            for a in &mut args {
                *a = match r.below(3) {
                    0 => mask(&mut r),
                    1 => 1u64 << BITS[r.below(BITS.len() as u64) as usize],
                    _ => value(&mut r),
                };
            }
            let d = SeccompData::x86_64(nr, args);
            let a = Action::from_ret(run(&ours, &d).unwrap());
            let b = Action::from_ret(run(&theirs, &d).unwrap());
            assert_eq!(a, b, "policy:\n{text}\ncall nr {nr} args {args:#x?}");
            calls += 1;
        }
    }
    assert_eq!(calls, 24_000);
}
