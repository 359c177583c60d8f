//! Installing a classic-BPF seccomp filter, and moving a program between processes as bytes.

use nix::errno::Errno;

/// One classic-BPF instruction (`struct sock_filter`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct SockFilter {
    /// Opcode.
    pub code: u16,
    /// Jump offset if true.
    pub jt: u8,
    /// Jump offset if false.
    pub jf: u8,
    /// Constant.
    pub k: u32,
}

/// Seccomp failures.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// `prctl(PR_SET_NO_NEW_PRIVS)` failed.
    #[error("PR_SET_NO_NEW_PRIVS: {0}")]
    NoNewPrivs(Errno),
    /// `seccomp(SECCOMP_SET_MODE_FILTER)` failed (the kernel rejected the program).
    #[error("seccomp(SET_MODE_FILTER): {0}")]
    Install(Errno),
    /// The program is empty, too long (> 4096 instructions) or its bytes are not whole
    /// instructions.
    #[error("bad BPF program: {0}")]
    BadProgram(String),
}

/// Largest program the kernel accepts.
pub const BPF_MAXINSNS: usize = 4096;

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
pub fn set_no_new_privs() -> Result<(), SeccompError> {
    nix::sys::prctl::set_no_new_privs().map_err(SeccompError::NoNewPrivs)
}

/// Installs `prog` as this process's (all threads' with `tsync`) seccomp filter.
/// no_new_privs must be set first (or the caller must have CAP_SYS_ADMIN).
pub fn install_filter(prog: &[SockFilter], tsync: bool) -> Result<(), SeccompError> {
    if prog.is_empty() || prog.len() > BPF_MAXINSNS {
        return Err(SeccompError::BadProgram(format!(
            "{} instructions",
            prog.len()
        )));
    }
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    let flags: libc::c_ulong = if tsync { 1 } else { 0 }; // SECCOMP_FILTER_FLAG_TSYNC
                                                          // SAFETY: `fprog` points at `prog`, a live slice of `SockFilter`, which is #[repr(C)]
                                                          // with the same layout as `struct sock_filter`; the kernel copies the program during
                                                          // the call and keeps no pointer to our memory.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            1 as libc::c_ulong, // SECCOMP_SET_MODE_FILTER
            flags,
            &fprog as *const libc::sock_fprog,
        )
    };
    if ret != 0 {
        return Err(SeccompError::Install(Errno::last()));
    }
    Ok(())
}

/// Serialises a program: 8 bytes per instruction, little-endian.
pub fn program_to_bytes(prog: &[SockFilter]) -> Vec<u8> {
    let mut v = Vec::with_capacity(prog.len() * 8);
    for i in prog {
        v.extend_from_slice(&i.code.to_le_bytes());
        v.push(i.jt);
        v.push(i.jf);
        v.extend_from_slice(&i.k.to_le_bytes());
    }
    v
}

/// Parses a program serialised by [`program_to_bytes`].
pub fn program_from_bytes(bytes: &[u8]) -> Result<Vec<SockFilter>, SeccompError> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(8) || bytes.len() / 8 > BPF_MAXINSNS {
        return Err(SeccompError::BadProgram(format!("{} bytes", bytes.len())));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| SockFilter {
            code: u16::from_le_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip() {
        let p = vec![
            SockFilter {
                code: 0x20,
                jt: 0,
                jf: 0,
                k: 4,
            },
            SockFilter {
                code: 0x06,
                jt: 1,
                jf: 2,
                k: 0x7fff_0000,
            },
        ];
        assert_eq!(program_from_bytes(&program_to_bytes(&p)).unwrap(), p);
        assert!(program_from_bytes(&[1, 2, 3]).is_err());
        assert!(program_from_bytes(&[]).is_err());
    }
}
