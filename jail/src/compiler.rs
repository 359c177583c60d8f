//! Compiling a [`Policy`] to a seccomp BPF program with minijail's semantics: the
//! architecture check (anything but x86-64 is killed), x32 syscalls refused, a binary search
//! over the listed syscall numbers so large policies stay fast, per-syscall rules tried in
//! order (64-bit argument comparisons on the high and low words, JSET for `&`), and the
//! default action for the rest.

use std::path::Path;

use hostmem_base::seccomp::SockFilter;

use crate::bpf::{data, Builder, Insn, Label, JEQ, JGE, JGT, JSET};
use crate::error::{Error, Result};
use crate::interp::AUDIT_ARCH_X86_64;
use crate::policy::{parse_file, Action, Atom, Expr, Op, ParseOptions, Policy};

/// x32 syscalls carry this bit; minijail refuses them.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Compiler options.
#[derive(Debug, Clone, Default)]
pub struct CompileOptions {
    /// Parser options (include prefix rewrite, default action).
    pub parse: ParseOptions,
    /// Log mode: every kill (including the default) becomes SECCOMP_RET_LOG, so violations
    /// are logged by the kernel and the program keeps running.
    pub log_violations: bool,
}

impl CompileOptions {
    /// What the device launcher uses: kill-process by default, or log mode.
    pub fn for_device(log: bool) -> Self {
        CompileOptions {
            parse: ParseOptions::default(),
            log_violations: log,
        }
    }
}

/// Parses and compiles a policy file.
pub fn compile_file(path: &Path, opts: &CompileOptions) -> Result<Vec<SockFilter>> {
    compile(&parse_file(path, &opts.parse)?, opts)
}

fn hi(v: u64) -> u32 {
    (v >> 32) as u32
}
fn lo(v: u64) -> u32 {
    v as u32
}

fn jump(b: &mut Builder, op: u16, k: u32, t: Label, f: Label) {
    b.push(Insn::Jump { op, k, t, f });
}

/// Emits `atom ? goto t : goto f`.
fn emit_atom(b: &mut Builder, a: &Atom, t: Label, f: Label) {
    let (h, l) = (data::arg_hi(a.arg), data::arg_lo(a.arg));
    let v = a.value;
    match a.op {
        Op::Eq | Op::Ne => {
            let (t, f) = if a.op == Op::Eq { (t, f) } else { (f, t) };
            let next = b.label();
            b.push(Insn::Load(h));
            jump(b, JEQ, hi(v), next, f);
            b.mark(next);
            b.push(Insn::Load(l));
            jump(b, JEQ, lo(v), t, f);
        }
        Op::Gt | Op::Ge | Op::Lt | Op::Le => {
            // Gt/Ge directly; Lt = !Ge, Le = !Gt.
            let (last, t, f) = match a.op {
                Op::Gt => (JGT, t, f),
                Op::Ge => (JGE, t, f),
                Op::Lt => (JGE, f, t),
                _ => (JGT, f, t),
            };
            let (eq, low) = (b.label(), b.label());
            b.push(Insn::Load(h));
            jump(b, JGT, hi(v), t, eq);
            b.mark(eq);
            jump(b, JEQ, hi(v), low, f);
            b.mark(low);
            b.push(Insn::Load(l));
            jump(b, last, lo(v), t, f);
        }
        Op::MaskAny => {
            if hi(v) != 0 {
                let next = b.label();
                b.push(Insn::Load(h));
                jump(b, JSET, hi(v), t, next);
                b.mark(next);
            }
            b.push(Insn::Load(l));
            jump(b, JSET, lo(v), t, f);
        }
        Op::In => {
            let nm = !v;
            if hi(nm) != 0 {
                let next = b.label();
                b.push(Insn::Load(h));
                jump(b, JSET, hi(nm), f, next);
                b.mark(next);
            }
            b.push(Insn::Load(l));
            jump(b, JSET, lo(nm), f, t);
        }
    }
}

/// Emits `expr ? goto t : goto f` (OR of ANDs).
fn emit_expr(b: &mut Builder, e: &Expr, t: Label, f: Label) {
    for (ci, clause) in e.iter().enumerate() {
        let clause_false = if ci + 1 == e.len() { f } else { b.label() };
        for (ai, atom) in clause.iter().enumerate() {
            let atom_true = if ai + 1 == clause.len() { t } else { b.label() };
            emit_atom(b, atom, atom_true, clause_false);
            if atom_true != t {
                b.mark(atom_true);
            }
        }
        if clause.is_empty() {
            b.push(Insn::Goto(t));
        }
        if clause_false != f {
            b.mark(clause_false);
        }
    }
}

/// Binary search over syscall numbers (A holds the number).
fn emit_tree(b: &mut Builder, nrs: &[(u32, Label)], default: Label) {
    if nrs.len() <= 3 {
        for (nr, l) in nrs {
            let next = b.label();
            jump(b, JEQ, *nr, *l, next);
            b.mark(next);
        }
        b.push(Insn::Goto(default));
        return;
    }
    let mid = nrs.len() / 2;
    let (left, right) = (b.label(), b.label());
    jump(b, JGE, nrs[mid].0, right, left);
    b.mark(left);
    emit_tree(b, &nrs[..mid], default);
    b.mark(right);
    emit_tree(b, &nrs[mid..], default);
}

/// Compiles a parsed policy.
pub fn compile(p: &Policy, opts: &CompileOptions) -> Result<Vec<SockFilter>> {
    let act = |a: Action| -> u32 {
        match a {
            Action::KillProcess | Action::KillThread if opts.log_violations => Action::Log.ret(),
            other => other.ret(),
        }
    };
    let mut b = Builder::default();
    let (kill_arch, arch_ok, not_x32, default) = (b.label(), b.label(), b.label(), b.label());
    b.push(Insn::Load(data::ARCH));
    jump(&mut b, JEQ, AUDIT_ARCH_X86_64, arch_ok, kill_arch);
    b.mark(arch_ok);
    b.push(Insn::Load(data::NR));
    jump(&mut b, JSET, X32_SYSCALL_BIT, kill_arch, not_x32);
    b.mark(not_x32);
    let blocks: Vec<(u32, Label)> = p.syscalls.keys().map(|nr| (*nr, b.label())).collect();
    emit_tree(&mut b, &blocks, default);
    for ((_, label), rules) in blocks.iter().zip(p.syscalls.values()) {
        b.mark(*label);
        let mut terminated = false;
        for r in rules {
            match &r.expr {
                None => {
                    b.push(Insn::Ret(act(r.action)));
                    terminated = true;
                    break;
                }
                Some(e) => {
                    let (t, f) = (b.label(), b.label());
                    emit_expr(&mut b, e, t, f);
                    b.mark(t);
                    b.push(Insn::Ret(act(r.action)));
                    b.mark(f);
                }
            }
        }
        if !terminated {
            b.push(Insn::Goto(default));
        }
    }
    b.mark(default);
    b.push(Insn::Ret(act(p.default)));
    b.mark(kill_arch);
    b.push(Insn::Ret(Action::KillProcess.ret()));
    let prog = b.assemble();
    if prog.len() > hostmem_base::seccomp::BPF_MAXINSNS {
        return Err(Error::TooLarge(prog.len()));
    }
    Ok(prog)
}
