//! The crate's error type: one variant per failed operation, carrying the errno.

use nix::errno::Errno;

/// Result alias for hostmem-base.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can fail in hostmem-base.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `memfd_create` failed.
    #[error("memfd_create failed: {0}")]
    MemfdCreate(Errno),
    /// `ftruncate` of a memfd failed.
    #[error("ftruncate to {size} bytes failed: {errno}")]
    Truncate {
        /// Requested size.
        size: u64,
        /// The errno.
        errno: Errno,
    },
    /// Adding or reading seals failed.
    #[error("fcntl seals failed: {0}")]
    Seal(Errno),
    /// `fstat` failed.
    #[error("fstat failed: {0}")]
    Fstat(Errno),
    /// An fd that must be a mappable regular file (memfd, shm) is something else.
    #[error("fd is not a regular mappable file (mode {mode:#o})")]
    NotRegularFile {
        /// `st_mode` as reported by fstat.
        mode: u32,
    },
    /// A file is shorter than the range that would be mapped from it.
    #[error("file too small: need {need} bytes, it has {have}")]
    FileTooSmall {
        /// Bytes needed (`fd_offset + len`).
        need: u64,
        /// Bytes the file has.
        have: u64,
    },
    /// `mmap` failed.
    #[error("mmap of {len} bytes failed: {errno}")]
    Mmap {
        /// Length requested.
        len: usize,
        /// The errno.
        errno: Errno,
    },
    /// `mmap(MAP_FIXED)` into the window failed.
    #[error("MAP_FIXED at window offset {offset:#x} (+{len:#x}) failed: {errno}")]
    MapFixed {
        /// Window offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The errno.
        errno: Errno,
    },
    /// Punching the background back to zeros failed.
    #[error("fallocate(PUNCH_HOLE) failed: {0}")]
    PunchHole(Errno),
    /// Writing zeros over background pages failed.
    #[error("writing zeros over the background failed: {0}")]
    ZeroFill(Errno),
    /// Writing a memfd's contents failed.
    #[error("writing the memfd failed: {0}")]
    Write(Errno),
    /// A size of zero, or a value that does not fit the platform.
    #[error("invalid size {0:#x}")]
    InvalidSize(u64),
    /// An offset or length is not page-aligned.
    #[error("{what} {value:#x} is not page-aligned")]
    Misaligned {
        /// Which value.
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// A range ends past its container, or its end overflows.
    #[error("range {offset:#x}+{len:#x} is outside 0..{limit:#x}")]
    OutOfRange {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Container size.
        limit: u64,
    },
    /// A placement would overlap a live one.
    #[error("range {offset:#x}+{len:#x} overlaps the live placement at {other:#x}+{other_len:#x}")]
    Overlap {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
        /// Start of the live placement.
        other: u64,
        /// Its length.
        other_len: u64,
    },
    /// A restore names a range that is not exactly one live placement.
    #[error("no live placement at {offset:#x}+{len:#x}")]
    NotPlaced {
        /// Start.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// Protection bits other than READ|WRITE (EXEC is never allowed), or none at all.
    #[error("protection {0:#x} not allowed (only READ, READ|WRITE)")]
    BadProtection(u32),
    /// A writable placement of a file sealed against writes (`F_SEAL_WRITE` or
    /// `F_SEAL_FUTURE_WRITE`): the MAP_FIXED would fail with EPERM, so it is refused first.
    #[error("fd is sealed against writes (seals {0:#x}): a read/write placement would fail")]
    WriteSealed(i32),
    /// An fd that `mmap` would refuse for how it was opened or where it lives
    /// ([`FileFacts::mapping_refusal`](crate::shm::FileFacts::mapping_refusal)).
    #[error("{0}")]
    Unmappable(String),
    /// The window's mappings in `/proc/self/maps` differ from its placement table.
    #[error("window mappings differ from the placement table: {0}")]
    WindowMismatch(String),
    /// Too few VMAs left below `vm.max_map_count` to place and still be sure to restore.
    #[error("VMA headroom exhausted: {used} of {limit} used, {reserve} kept in reserve")]
    VmaHeadroom {
        /// VMAs in use (estimated or counted).
        used: usize,
        /// The limit.
        limit: usize,
        /// VMAs kept in reserve for restores.
        reserve: usize,
    },
    /// Reading a `/proc` file failed.
    #[error("reading {path} failed: {source}")]
    Proc {
        /// The path.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A `/proc` file did not hold what was expected.
    #[error("unexpected content in {path}: {what}")]
    ProcParse {
        /// The path.
        path: String,
        /// What was missing or malformed.
        what: String,
    },
    /// A KVM operation failed.
    #[error("KVM: {0}")]
    Kvm(String),
    /// An fd operation (dup, fcntl, close) failed.
    #[error("{op} failed: {errno}")]
    Fd {
        /// The operation.
        op: &'static str,
        /// The errno.
        errno: Errno,
    },
}

impl From<crate::kvm::KvmError> for Error {
    fn from(e: crate::kvm::KvmError) -> Self {
        Error::Kvm(e.to_string())
    }
}
