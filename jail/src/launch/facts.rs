//! [`verify_jailed`]: what `/proc/<pid>` says of a jailed program, checked from outside.

use serde::Serialize;

use crate::error::Error;

/// What [`verify_jailed`] checked.
#[derive(Debug, Clone, Serialize)]
pub struct JailFacts {
    /// `Seccomp:` (2 = filter).
    pub seccomp: u32,
    /// `Seccomp_filters:`: 1 at start-up (the launch policy), 2 once the device stacked
    /// its run-time filter ([`crate::runtime`]).
    pub seccomp_filters: u32,
    /// `NoNewPrivs:`.
    pub no_new_privs: bool,
    /// `CapEff:`.
    pub cap_eff: u64,
    /// `CapPrm:`.
    pub cap_prm: u64,
    /// `CapBnd:`.
    pub cap_bnd: u64,
    /// `CapAmb:`.
    pub cap_amb: u64,
    /// Namespaces that differ from ours.
    pub new_namespaces: Vec<String>,
}

/// The namespaces a jailed program must not share with us.
pub const JAIL_NAMESPACES: [&str; 6] = ["user", "pid", "mnt", "net", "ipc", "uts"];

/// Reads the jail facts of `pid` from `/proc` without judging them.
pub fn jail_facts(pid: i32) -> Result<JailFacts, Error> {
    let st = hostmem_base::procfs::status_of(&pid.to_string())
        .map_err(|e| Error::NotJailed(e.to_string()))?;
    let mut new_ns = Vec::new();
    for ns in JAIL_NAMESPACES {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"));
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"));
        match (theirs, ours) {
            (Ok(t), Ok(o)) if t != o => new_ns.push(ns.to_string()),
            (Err(e), _) | (_, Err(e)) => {
                return Err(Error::NotJailed(format!("pid {pid}: ns/{ns}: {e}")))
            }
            _ => {}
        }
    }
    Ok(JailFacts {
        seccomp: st.seccomp,
        seccomp_filters: st.seccomp_filters,
        no_new_privs: st.no_new_privs,
        cap_eff: st.cap_eff,
        cap_prm: st.cap_prm,
        cap_bnd: st.cap_bnd,
        cap_amb: st.cap_amb,
        new_namespaces: new_ns,
    })
}

/// Checks from outside that `pid` is jailed: seccomp filter on (`Seccomp: 2`),
/// no_new_privs, no capabilities (effective, permitted, ambient, bounding), and its own
/// user, pid, mount, net, ipc and uts namespaces.
pub fn verify_jailed(pid: i32) -> Result<JailFacts, Error> {
    let facts = jail_facts(pid)?;
    if facts.seccomp != 2
        || !facts.no_new_privs
        || facts.cap_eff != 0
        || facts.cap_prm != 0
        || facts.cap_amb != 0
        || facts.cap_bnd != 0
        || facts.new_namespaces.len() != JAIL_NAMESPACES.len()
    {
        return Err(Error::NotJailed(format!("pid {pid}: {facts:?}")));
    }
    Ok(facts)
}
