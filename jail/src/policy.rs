//! The minijail policy language: parsing `.policy` files into a [`Policy`].
//!
//! Accepted, as minijail's Python compiler (`tools/parser.py`, what crosvm builds its
//! policies with) accepts it: `name: 1` / `allow`; argument expressions (`arg0`..`arg5`
//! with `== != < <= > >= & in`, joined by `&&` and `||`, `&&` binding tighter); constant
//! expressions with `|`, `~` and parentheses over numbers (negative ones too, as 64-bit two's
//! complement) and named constants; the actions `kill`, `kill-process`, `kill-thread`,
//! `trap`, `trace`, `log`, `user-notify`, `return ERRNO`; `expr; ACTION`; filter lists
//! `{filter, filter, …}`; `{a, b}` syscall lists; `[arch=…]` metadata after a syscall name
//! (a statement for another arch is skipped); repeated lines for one syscall (conditional
//! filters combine in file order); `@include` (relative to the including file, with an
//! optional path-prefix rewrite), `@frequency` (accepted, ignored), `@default`,
//! `@denylist`; `\` continuations and `#` comments.
//!
//! Refused, as minijail refuses them, with file and line: a permissive `@default` (`allow`,
//! `log`, `trace`, `return`: log mode is the launcher's option, not a policy's); any filter
//! for a syscall after an unconditional one (it could never match: both lines are named);
//! unknown constants and syscalls. Refused as not supported yet: syscall groups
//! (`name@group`) and `expr; return ERRNO` inside a filter list.
//!
//! # `expr; return ERRNO`
//!
//! minijail's two compilers disagree. Its C compiler and the minijail0(5) man page: allow
//! when `expr` holds, fail with ERRNO otherwise. Its Python compiler: fail with ERRNO when
//! `expr` holds, otherwise the rest of the syscall's filters (then the default). We keep the
//! C meaning; every such line is noted in [`Policy::notes`] and `hostmem policy lint` warns
//! on it. `expr; ACTION` for any other action exists only in the Python compiler and has its
//! meaning: ACTION when `expr` holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::constants;
use crate::error::{Error, Result};

/// What the filter does with a syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Let it run.
    Allow,
    /// Kill the whole process (SIGSYS).
    KillProcess,
    /// Kill the calling thread.
    KillThread,
    /// Send SIGSYS to the thread (a handler may catch it).
    Trap,
    /// Notify a tracer.
    Trace(u16),
    /// Allow, and log it.
    Log,
    /// Ask the user-space notifier.
    UserNotify,
    /// Fail with this errno.
    Errno(u16),
}

impl Action {
    /// The `SECCOMP_RET_*` value.
    pub fn ret(self) -> u32 {
        match self {
            Action::Allow => 0x7fff_0000,
            Action::KillProcess => 0x8000_0000,
            Action::KillThread => 0,
            Action::Trap => 0x0003_0000,
            Action::Trace(d) => 0x7ff0_0000 | u32::from(d),
            Action::Log => 0x7ffc_0000,
            Action::UserNotify => 0x7fc0_0000,
            Action::Errno(e) => 0x0005_0000 | u32::from(e),
        }
    }

    /// The action a `SECCOMP_RET_*` value means.
    pub fn from_ret(r: u32) -> Action {
        match r & 0xffff_0000 {
            0x7fff_0000 => Action::Allow,
            0x8000_0000 => Action::KillProcess,
            0x0003_0000 => Action::Trap,
            0x7ff0_0000 => Action::Trace(r as u16),
            0x7ffc_0000 => Action::Log,
            0x7fc0_0000 => Action::UserNotify,
            0x0005_0000 => Action::Errno(r as u16),
            _ => Action::KillThread,
        }
    }
}

/// A comparison of one argument with a constant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `&`: some bit of the mask is set.
    MaskAny,
    /// `in`: no bit outside the mask is set.
    In,
}

/// `argN OP value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Atom {
    /// Argument index 0..=5.
    pub arg: u8,
    /// Operator.
    pub op: Op,
    /// Constant.
    pub value: u64,
}

impl Atom {
    /// Evaluates the atom on an argument value (the reference semantics for the compiler).
    pub fn eval(&self, v: u64) -> bool {
        match self.op {
            Op::Eq => v == self.value,
            Op::Ne => v != self.value,
            Op::Lt => v < self.value,
            Op::Le => v <= self.value,
            Op::Gt => v > self.value,
            Op::Ge => v >= self.value,
            Op::MaskAny => v & self.value != 0,
            Op::In => v & !self.value == 0,
        }
    }
}

/// A condition in disjunctive normal form: OR of ANDs.
pub type Expr = Vec<Vec<Atom>>;

/// One filter of a syscall: if `expr` holds (or there is none), `action`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// The condition; `None` = always.
    pub expr: Option<Expr>,
    /// What to do.
    pub action: Action,
}

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// Per syscall number: its rules in order (first match wins).
    pub syscalls: BTreeMap<u32, Vec<Rule>>,
    /// Syscall names by number (for tools).
    pub names: BTreeMap<u32, String>,
    /// For syscalls not listed, or when no rule matched.
    pub default: Action,
    /// `@denylist`: unlisted syscalls are allowed.
    pub denylist: bool,
    /// What minijail would read differently, each with its `file:line`: the lines
    /// `hostmem policy lint` warns on (see the module docs).
    pub notes: Vec<String>,
}

/// Parse state beyond the policy: where each syscall's first unconditional filter is.
#[derive(Default)]
struct State {
    unconditional: BTreeMap<u32, String>,
}

/// Parser options.
#[derive(Debug, Clone, Default)]
pub struct ParseOptions {
    /// Rewrite `@include` paths starting with `.0` to `.1` (e.g. crosvm's
    /// `/usr/share/policy/crosvm/` to a local folder).
    pub rewrite_prefix: Option<(String, PathBuf)>,
    /// The action for unlisted syscalls unless the policy says `@default` (kill-process).
    pub default: Option<Action>,
}

/// The syscall number of `name` on x86-64.
pub fn syscall_nr(name: &str) -> Option<u32> {
    name.parse::<syscalls::Sysno>().ok().map(|s| s.id() as u32)
}

struct Loc<'a> {
    file: &'a str,
    line: usize,
}

impl Loc<'_> {
    fn err(&self, col: usize, msg: impl Into<String>) -> Error {
        Error::Parse {
            file: self.file.to_string(),
            line: self.line,
            col,
            msg: msg.into(),
        }
    }
}

/// Parses a policy file (and its includes).
pub fn parse_file(path: &Path, opts: &ParseOptions) -> Result<Policy> {
    let mut p = Policy {
        syscalls: BTreeMap::new(),
        names: BTreeMap::new(),
        default: opts.default.unwrap_or(Action::KillProcess),
        denylist: false,
        notes: Vec::new(),
    };
    let mut stack = Vec::new();
    parse_into(path, opts, &mut p, &mut State::default(), &mut stack)?;
    if p.denylist && opts.default.is_none() {
        p.default = Action::Allow;
    }
    Ok(p)
}

/// Parses policy text (for tests and fuzzing); `@include` is resolved relative to the
/// current directory.
pub fn parse_str(text: &str, opts: &ParseOptions) -> Result<Policy> {
    let mut p = Policy {
        syscalls: BTreeMap::new(),
        names: BTreeMap::new(),
        default: opts.default.unwrap_or(Action::KillProcess),
        denylist: false,
        notes: Vec::new(),
    };
    parse_text(
        text,
        "<string>",
        Path::new("."),
        opts,
        &mut p,
        &mut State::default(),
        &mut Vec::new(),
    )?;
    if p.denylist && opts.default.is_none() {
        p.default = Action::Allow;
    }
    Ok(p)
}

fn parse_into(
    path: &Path,
    opts: &ParseOptions,
    p: &mut Policy,
    st: &mut State,
    stack: &mut Vec<PathBuf>,
) -> Result<()> {
    let text = std::fs::read_to_string(path).map_err(|err| Error::Read {
        path: path.display().to_string(),
        err,
    })?;
    if stack.iter().any(|s| s == path) || stack.len() > 16 {
        return Err(Error::Parse {
            file: path.display().to_string(),
            line: 1,
            col: 1,
            msg: "@include cycle or nesting too deep".into(),
        });
    }
    stack.push(path.to_path_buf());
    let dir = path.parent().unwrap_or(Path::new("."));
    let r = parse_text(&text, &path.display().to_string(), dir, opts, p, st, stack);
    stack.pop();
    r
}

fn parse_text(
    text: &str,
    file: &str,
    dir: &Path,
    opts: &ParseOptions,
    p: &mut Policy,
    st: &mut State,
    stack: &mut Vec<PathBuf>,
) -> Result<()> {
    // Join `\` continuations, remembering the line each logical line starts on.
    let mut logical: Vec<(usize, String)> = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("");
        let (cont, body) = match line.trim_end().strip_suffix('\\') {
            Some(b) => (true, b.to_string()),
            None => (false, line.to_string()),
        };
        let entry = pending.get_or_insert((i + 1, String::new()));
        entry.1.push_str(&body);
        entry.1.push(' ');
        if !cont {
            logical.extend(pending.take());
        }
    }
    logical.extend(pending.take());
    for (lineno, line) in logical {
        let loc = Loc { file, line: lineno };
        let t = line.trim();
        if t.is_empty() {
            continue;
        }
        let col0 = line.len() - line.trim_start().len() + 1;
        if let Some(rest) = t.strip_prefix('@') {
            let (kw, arg) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
            let arg = arg.trim();
            match kw {
                "include" => {
                    // A rewritten prefix is taken as given (relative to the working
                    // directory); anything else relative is relative to this file.
                    let target = match &opts.rewrite_prefix {
                        Some((from, to)) if arg.starts_with(from.as_str()) => {
                            to.join(&arg[from.len()..])
                        }
                        _ if Path::new(arg).is_relative() => dir.join(arg),
                        _ => PathBuf::from(arg),
                    };
                    parse_into(&target, opts, p, st, stack)?;
                }
                "frequency" => {}
                "denylist" => p.denylist = true,
                "default" => p.default = parse_default_action(arg, &loc, col0 + 9)?,
                other => return Err(loc.err(col0, format!("unknown directive @{other}"))),
            }
            continue;
        }
        let Some((lhs, rhs)) = t.split_once(':') else {
            return Err(loc.err(col0, "expected `syscall: rule`"));
        };
        let rhs_col = col0 + lhs.len() + 1;
        let names = parse_descriptors(lhs.trim(), &loc, col0)?;
        let rules = parse_rhs(rhs, &loc, rhs_col, &mut p.notes)?;
        for name in names {
            let nr = syscall_nr(name)
                .ok_or_else(|| loc.err(col0, format!("unknown syscall `{name}`")))?;
            p.names.insert(nr, name.to_string());
            for rule in &rules {
                // minijail: nothing may follow an unconditional filter (it could not match).
                if let Some(first) = st.unconditional.get(&nr) {
                    return Err(loc.err(
                        col0,
                        format!(
                            "syscall `{name}` already had an unconditional action at {first}: \
                             this rule could never match (minijail refuses it too)"
                        ),
                    ));
                }
                if rule.expr.is_none() {
                    st.unconditional.insert(nr, format!("{file}:{lineno}"));
                }
                p.syscalls.entry(nr).or_default().push(rule.clone());
            }
        }
    }
    Ok(())
}

/// The syscall names of a statement's left side (`name`, `{a, b}`, each with optional
/// `[key=value,…; …]` metadata). Names whose `arch` metadata leaves out x86_64 are dropped,
/// as minijail drops them; other keys are ignored, as minijail ignores them.
fn parse_descriptors<'a>(lhs: &'a str, loc: &Loc<'_>, col: usize) -> Result<Vec<&'a str>> {
    let list = match lhs.strip_prefix('{') {
        Some(inner) => inner
            .strip_suffix('}')
            .ok_or_else(|| loc.err(col, "unclosed `{` in syscall list"))?,
        None => lhs,
    };
    let mut out = Vec::new();
    for desc in split_top(list, ',') {
        let desc = desc.trim();
        let (name, meta) = match desc.split_once('[') {
            Some((n, m)) => (
                n.trim(),
                Some(
                    m.strip_suffix(']')
                        .ok_or_else(|| loc.err(col, format!("unclosed `[` in `{desc}`")))?,
                ),
            ),
            None => (desc, None),
        };
        if name.contains('@') {
            return Err(loc.err(
                col,
                format!("syscall groups (`{name}`) are not supported yet"),
            ));
        }
        let mut keep = true;
        for pair in meta.into_iter().flat_map(|m| m.split(';')) {
            let (key, values) = pair
                .split_once('=')
                .ok_or_else(|| loc.err(col, format!("metadata `{pair}` is not key=value")))?;
            let values: Vec<&str> = values.split(',').map(str::trim).collect();
            if values.iter().any(|v| v.is_empty()) {
                return Err(loc.err(col, format!("empty value in metadata `{pair}`")));
            }
            if key.trim() == "arch" && !values.contains(&"x86_64") {
                keep = false;
            }
        }
        if name.is_empty() {
            return Err(loc.err(col, "missing syscall name"));
        }
        if keep {
            out.push(name);
        }
    }
    Ok(out)
}

/// `s` split at each `sep` outside brackets and parentheses.
fn split_top(s: &str, sep: char) -> Vec<&str> {
    let (mut out, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '[' | '(' | '{' => depth += 1,
            ']' | ')' | '}' => depth -= 1,
            c if c == sep && depth == 0 => {
                out.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// `@default`: only the non-permissive actions minijail accepts there.
fn parse_default_action(s: &str, loc: &Loc<'_>, col: usize) -> Result<Action> {
    let a = parse_action(s, loc, col)?;
    match a {
        Action::KillProcess | Action::KillThread | Action::Trap | Action::UserNotify => Ok(a),
        _ => Err(loc.err(
            col,
            format!(
                "permissive `@default {}` refused (minijail refuses it too); log mode is the \
                 launcher's option (`--seccomp-log`), not a policy's",
                s.trim()
            ),
        )),
    }
}

fn parse_action(s: &str, loc: &Loc<'_>, col: usize) -> Result<Action> {
    let s = s.trim();
    Ok(match s {
        "allow" | "1" => Action::Allow,
        "kill" | "kill-process" => Action::KillProcess,
        "kill-thread" => Action::KillThread,
        "trap" => Action::Trap,
        "trace" => Action::Trace(0),
        "log" => Action::Log,
        "user-notify" => Action::UserNotify,
        _ => match s.strip_prefix("return") {
            Some(e) => Action::Errno(parse_errno(e.trim(), loc, col)?),
            None => return Err(loc.err(col, format!("unknown action `{s}`"))),
        },
    })
}

fn parse_errno(s: &str, loc: &Loc<'_>, col: usize) -> Result<u16> {
    let v = match parse_number(s) {
        Some(v) => v,
        None => constants::lookup(s).ok_or_else(|| loc.err(col, format!("unknown errno `{s}`")))?,
    };
    u16::try_from(v).map_err(|_| loc.err(col, format!("errno {v} out of range")))
}

fn parse_number(s: &str) -> Option<u64> {
    let s = s.trim();
    // minijail: a negative number is its 64-bit two's complement, down to -2^63.
    if let Some(m) = s.strip_prefix('-') {
        if m.starts_with('-') {
            return None;
        }
        let v = parse_number(m)?;
        return (v <= 1u64 << 63).then(|| v.wrapping_neg());
    }
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if s.len() > 1 && s.starts_with('0') && s.bytes().all(|b| b.is_ascii_digit()) {
        u64::from_str_radix(&s[1..], 8).ok()
    } else {
        s.parse().ok()
    }
}

fn is_action(s: &str) -> bool {
    matches!(
        s,
        "1" | "allow"
            | "kill"
            | "kill-process"
            | "kill-thread"
            | "trap"
            | "trace"
            | "log"
            | "user-notify"
    ) || s.starts_with("return")
}

/// A statement's right side: one filter or a `{…}` list of them, as rules in order.
fn parse_rhs(rhs: &str, loc: &Loc<'_>, col: usize, notes: &mut Vec<String>) -> Result<Vec<Rule>> {
    let rhs = rhs.trim();
    for word in rhs.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if constants::minijail_lacks(word) {
            notes.push(format!(
                "{}:{}: `{word}` is not in minijail's constants table: minijail refuses this \
                 policy (write its number, {:#x}, with a comment naming it)",
                loc.file,
                loc.line,
                constants::lookup(word).unwrap_or_default()
            ));
        }
    }
    match rhs.strip_prefix('{') {
        Some(inner) => {
            let inner = inner
                .strip_suffix('}')
                .ok_or_else(|| loc.err(col, "unclosed `{` in filter list"))?;
            let mut rules = Vec::new();
            for f in split_top(inner, ',') {
                rules.extend(parse_filter(f, loc, col, true, notes)?);
            }
            Ok(rules)
        }
        None => parse_filter(rhs, loc, col, false, notes),
    }
}

/// One filter: an action, an expression (allow when it holds), or `expr; ACTION`.
fn parse_filter(
    f: &str,
    loc: &Loc<'_>,
    col: usize,
    in_list: bool,
    notes: &mut Vec<String>,
) -> Result<Vec<Rule>> {
    let (expr_part, ret_part) = match f.split_once(';') {
        Some((e, r)) => (e.trim(), Some(r.trim())),
        None => (f.trim(), None),
    };
    if expr_part.is_empty() {
        return Err(loc.err(col, "missing filter"));
    }
    if is_action(expr_part) {
        if ret_part.is_some() {
            return Err(loc.err(col, "`;` after an action"));
        }
        return Ok(vec![Rule {
            expr: None,
            action: parse_action(expr_part, loc, col)?,
        }]);
    }
    let expr = Some(parse_expr(expr_part, loc, col)?);
    let Some(r) = ret_part else {
        return Ok(vec![Rule {
            expr,
            action: Action::Allow,
        }]);
    };
    let action = parse_action(r, loc, col + expr_part.len() + 1)?;
    match action {
        Action::Errno(_) if in_list => Err(loc.err(
            col,
            "`expr; return ERRNO` inside a filter list is not supported yet (minijail's C and \
             Python compilers give it opposite meanings; write it as its own line)",
        )),
        Action::Errno(_) => {
            notes.push(format!(
                "{}:{}: `{expr_part}; {r}`: allowed when the expression holds and {r} otherwise \
                 (minijail's C compiler and minijail0(5), and hostmem); minijail's Python \
                 compiler (crosvm's build) instead fails the call with the errno when it holds \
                 and applies the default otherwise",
                loc.file, loc.line
            ));
            Ok(vec![
                Rule {
                    expr,
                    action: Action::Allow,
                },
                Rule { expr: None, action },
            ])
        }
        action => Ok(vec![Rule { expr, action }]),
    }
}

fn parse_expr(s: &str, loc: &Loc<'_>, col: usize) -> Result<Expr> {
    let mut out = Vec::new();
    for clause in s.split("||") {
        let mut atoms = Vec::new();
        for atom in clause.split("&&") {
            atoms.push(parse_atom(atom.trim(), loc, col)?);
        }
        out.push(atoms);
    }
    Ok(out)
}

fn parse_atom(s: &str, loc: &Loc<'_>, col: usize) -> Result<Atom> {
    let mut s = s.trim();
    while s.starts_with('(') && s.ends_with(')') && s.matches('(').count() == s.matches(')').count()
    {
        s = s[1..s.len() - 1].trim();
    }
    let rest = s
        .strip_prefix("arg")
        .ok_or_else(|| loc.err(col, format!("expected argN in `{s}`")))?;
    let idx = rest
        .chars()
        .next()
        .and_then(|c| c.to_digit(10))
        .filter(|d| *d <= 5);
    let Some(arg) = idx else {
        return Err(loc.err(col, format!("bad argument index in `{s}`")));
    };
    let rest = rest[1..].trim_start();
    let ops = [
        ("==", Op::Eq),
        ("!=", Op::Ne),
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("<", Op::Lt),
        (">", Op::Gt),
        ("&", Op::MaskAny),
        ("in ", Op::In),
    ];
    for (tok, op) in ops {
        if let Some(v) = rest.strip_prefix(tok) {
            let value = parse_const(v.trim(), loc, col)?;
            return Ok(Atom {
                arg: arg as u8,
                op,
                value,
            });
        }
    }
    Err(loc.err(col, format!("expected an operator in `{s}`")))
}

/// Parses a constant expression: `|` of terms, `~term`, `(expr)`, numbers and names.
pub fn parse_const_str(s: &str) -> Option<u64> {
    let loc = Loc { file: "", line: 0 };
    parse_const(s, &loc, 0).ok()
}

fn parse_const(s: &str, loc: &Loc<'_>, col: usize) -> Result<u64> {
    let toks = tokenize(s);
    let mut pos = 0;
    let v = const_or(&toks, &mut pos, loc, col)?;
    if pos != toks.len() {
        return Err(loc.err(col, format!("unexpected `{}` in constant `{s}`", toks[pos])));
    }
    Ok(v)
}

fn tokenize(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in s.chars() {
        if matches!(c, '|' | '~' | '(' | ')') || c.is_whitespace() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            if !c.is_whitespace() {
                out.push(c.to_string());
            }
        } else {
            cur.push(c);
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn const_or(t: &[String], pos: &mut usize, loc: &Loc<'_>, col: usize) -> Result<u64> {
    let mut v = const_term(t, pos, loc, col)?;
    while t.get(*pos).map(String::as_str) == Some("|") {
        *pos += 1;
        v |= const_term(t, pos, loc, col)?;
    }
    Ok(v)
}

fn const_term(t: &[String], pos: &mut usize, loc: &Loc<'_>, col: usize) -> Result<u64> {
    let tok = t
        .get(*pos)
        .ok_or_else(|| loc.err(col, "missing constant"))?
        .clone();
    *pos += 1;
    match tok.as_str() {
        "~" => Ok(!const_term(t, pos, loc, col)?),
        "(" => {
            let v = const_or(t, pos, loc, col)?;
            if t.get(*pos).map(String::as_str) != Some(")") {
                return Err(loc.err(col, "missing `)`"));
            }
            *pos += 1;
            Ok(v)
        }
        name => parse_number(name)
            .or_else(|| constants::lookup(name))
            .ok_or_else(|| loc.err(col, format!("unknown constant `{name}`"))),
    }
}
