//! The crate's error type.

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can fail in hostmem-jail.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A policy file could not be read.
    #[error("{path}: {err}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        err: std::io::Error,
    },
    /// A policy does not parse: file, line, column and what is wrong.
    #[error("{file}:{line}:{col}: {msg}")]
    Parse {
        /// The file.
        file: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        col: usize,
        /// What is wrong.
        msg: String,
    },
    /// The compiled program is too large for the kernel.
    #[error("compiled program has {0} instructions (the kernel takes at most 4096)")]
    TooLarge(usize),
    /// Launching the jailed program failed (the step and errno are in the message).
    #[error("launch: {0}")]
    Launch(String),
    /// The program is not jailed as required.
    #[error("not jailed: {0}")]
    NotJailed(String),
    /// Installing the seccomp filter in the jailed program failed.
    #[error("seccomp: {0}")]
    Seccomp(String),
    /// A step of the jailed launch failed (in the parent, or in the child before exec):
    /// its name, with the path or item it concerned, and the errno.
    #[error("jail step '{step}' failed: {errno}")]
    LaunchStep {
        /// The step, e.g. `execveat` or `bind mount /lib64`.
        step: String,
        /// The errno.
        errno: nix::errno::Errno,
    },
}
