//! `SharedMemory`: a memfd with CLOEXEC and sealing, the unit of memory hostmem moves
//! between processes (the hostmem window's background and every shm blob).

use std::ffi::CString;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MemFdCreateFlag};
use nix::sys::stat::{fstat, SFlag};

use crate::{Error, Result};

/// A memfd-backed shared memory object that owns its fd.
#[derive(Debug)]
pub struct SharedMemory {
    fd: OwnedFd,
    size: u64,
}

/// What `fstat` and the seals say about a file someone handed us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FileFacts {
    /// Size in bytes.
    pub size: u64,
    /// `st_mode`.
    pub mode: u32,
    /// Seals, if the file supports them (memfds do).
    pub seals: Option<i32>,
    /// The file's identity: `(st_dev, st_ino)` (two fds for one file have the same).
    pub id: (u64, u64),
    /// How the fd was opened (`F_GETFL`: access mode, `O_PATH`), when read
    /// ([`mapping_facts`]; `None` from [`file_facts`], which the device's policy allows).
    pub status_flags: Option<i32>,
    /// The file system's magic (`fstatfs`), when read ([`mapping_facts`]).
    pub fs_type: Option<libc::c_long>,
}

impl FileFacts {
    /// True if the file can neither shrink nor grow (F_SEAL_SHRINK and F_SEAL_GROW set).
    pub fn size_sealed(&self) -> bool {
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        self.seals.is_some_and(|s| s & want == want)
    }
    /// True if the file was sealed for sharing ([`SharedMemory::seal_for_sharing`]): it can
    /// neither shrink nor grow, and no seal can be added (F_SEAL_SEAL).
    pub fn sealed_for_sharing(&self) -> bool {
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        self.seals.is_some_and(|s| s & want == want)
    }
    /// True if the file refuses new writable shared mappings (`F_SEAL_WRITE` or
    /// `F_SEAL_FUTURE_WRITE`): a read/write `MAP_SHARED` of it fails with EPERM.
    pub fn write_sealed(&self) -> bool {
        let write = libc::F_SEAL_WRITE | libc::F_SEAL_FUTURE_WRITE;
        self.seals.is_some_and(|s| s & write != 0)
    }
    /// True if it is a regular file (memfds and shm files are).
    pub fn is_regular(&self) -> bool {
        SFlag::from_bits_truncate(self.mode & SFlag::S_IFMT.bits()) == SFlag::S_IFREG
    }

    /// Why `mmap(MAP_SHARED)` with `prot` would refuse this fd for how it was opened or
    /// where the file lives (what [`mapping_facts`] read; `None`: nothing against it, or
    /// not read). Checked before the syscall so that the refusal names the cause instead
    /// of coming back as a failed mapping.
    pub fn mapping_refusal(&self, prot: crate::mmap::Prot) -> Option<String> {
        if let Some(fl) = self.status_flags {
            if fl & libc::O_PATH != 0 {
                return Some("fd is an O_PATH handle: it cannot be mapped (EBADF)".into());
            }
            let acc = fl & libc::O_ACCMODE;
            let name = match acc {
                libc::O_RDONLY => "O_RDONLY",
                libc::O_WRONLY => "O_WRONLY",
                _ => "O_RDWR",
            };
            let need_write = prot.bits() & libc::PROT_WRITE as u32 != 0;
            if acc == libc::O_WRONLY || (need_write && acc != libc::O_RDWR) {
                return Some(format!(
                    "fd was opened {name}: a shared {} mapping needs {} (EACCES)",
                    if need_write { "read/write" } else { "read" },
                    if need_write { "O_RDWR" } else { "read access" },
                ));
            }
        }
        if self.fs_type == Some(nix::sys::statfs::HUGETLBFS_MAGIC.0) {
            return Some(
                "fd is a hugetlbfs file: it maps only at huge-page alignment, which window \
                 placements do not have (EINVAL)"
                    .into(),
            );
        }
        None
    }
}

/// `fstat` + `F_GET_SEALS` on any fd: the calls the device's own policy allows (its mirror
/// reads these before each placement).
pub fn file_facts(fd: BorrowedFd<'_>) -> Result<FileFacts> {
    let st = fstat(fd.as_raw_fd()).map_err(Error::Fstat)?;
    let seals = fcntl(fd.as_raw_fd(), FcntlArg::F_GET_SEALS).ok();
    Ok(FileFacts {
        size: st.st_size as u64,
        mode: st.st_mode,
        seals,
        id: (st.st_dev, st.st_ino),
        status_flags: None,
        fs_type: None,
    })
}

/// [`file_facts`] and what else decides whether a shared mapping of `fd` can work: how it
/// was opened (`F_GETFL`) and its file system (`fstatfs`), for
/// [`FileFacts::mapping_refusal`]. For the VMM, which checks every fd a device sends before
/// it maps it.
pub fn mapping_facts(fd: BorrowedFd<'_>) -> Result<FileFacts> {
    let mut facts = file_facts(fd)?;
    facts.status_flags = Some(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).map_err(Error::Fstat)?);
    facts.fs_type = nix::sys::statfs::fstatfs(fd)
        .ok()
        .map(|s| s.filesystem_type().0);
    Ok(facts)
}

impl SharedMemory {
    /// Creates a memfd of `size` bytes (zero-filled), CLOEXEC, sealing allowed.
    pub fn new(name: &str, size: u64) -> Result<Self> {
        if size == 0 || i64::try_from(size).is_err() {
            return Err(Error::InvalidSize(size));
        }
        let cname = CString::new(name.replace('\0', "_")).map_err(|_| Error::InvalidSize(size))?;
        let fd = memfd_create(
            &cname,
            MemFdCreateFlag::MFD_CLOEXEC | MemFdCreateFlag::MFD_ALLOW_SEALING,
        )
        .map_err(Error::MemfdCreate)?;
        nix::unistd::ftruncate(&fd, size as i64)
            .map_err(|errno| Error::Truncate { size, errno })?;
        Ok(SharedMemory { fd, size })
    }

    /// Adopts an fd received from another process after checking that it is a regular file
    /// of at least `min_size` bytes. The size recorded is the file's real size.
    pub fn from_fd(fd: OwnedFd, min_size: u64) -> Result<Self> {
        let facts = file_facts(fd.as_fd())?;
        if !facts.is_regular() {
            return Err(Error::NotRegularFile { mode: facts.mode });
        }
        if facts.size < min_size {
            return Err(Error::FileTooSmall {
                need: min_size,
                have: facts.size,
            });
        }
        Ok(SharedMemory {
            fd,
            size: facts.size,
        })
    }

    /// Seals the size (F_SEAL_SHRINK | F_SEAL_GROW) so that a mapping of it can never
    /// turn into a SIGBUS hole.
    pub fn seal_size(&self) -> Result<()> {
        fcntl(
            self.fd.as_raw_fd(),
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW),
        )
        .map_err(Error::Seal)?;
        Ok(())
    }

    /// Seals what the VMM shares with the device (the hostmem window, guest RAM) for good:
    /// F_SEAL_SHRINK | F_SEAL_GROW, then F_SEAL_SEAL, so that nobody holding the fd can ever
    /// add a seal, in particular F_SEAL_WRITE / F_SEAL_FUTURE_WRITE, which would make the
    /// VMM's own read/write `MAP_SHARED` of it (restoring the window's background) fail.
    pub fn seal_for_sharing(&self) -> Result<()> {
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        if self.seals()? & want == want {
            return Ok(());
        }
        fcntl(
            self.fd.as_raw_fd(),
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL,
            ),
        )
        .map_err(Error::Seal)?;
        Ok(())
    }

    /// A memfd holding exactly `bytes` (written through the file with `write(2)`, no
    /// mapping), then sealed for good: F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE |
    /// F_SEAL_SEAL, so whoever receives it reads bytes nobody can change any more (a frame
    /// the device hands its supervisor).
    pub fn frozen_copy(name: &str, bytes: &[u8]) -> Result<Self> {
        let shm = SharedMemory::new(name, bytes.len() as u64)?;
        let mut done = 0usize;
        while let Some(rest) = bytes.get(done..).filter(|r| !r.is_empty()) {
            match nix::unistd::write(&shm.fd, rest) {
                Ok(0) => return Err(Error::Write(Errno::EIO)),
                Ok(n) => done += n,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::Write(e)),
            }
        }
        fcntl(
            shm.fd.as_raw_fd(),
            FcntlArg::F_ADD_SEALS(
                SealFlag::F_SEAL_SHRINK
                    | SealFlag::F_SEAL_GROW
                    | SealFlag::F_SEAL_WRITE
                    | SealFlag::F_SEAL_SEAL,
            ),
        )
        .map_err(Error::Seal)?;
        Ok(shm)
    }

    /// Current seals.
    pub fn seals(&self) -> Result<i32> {
        fcntl(self.fd.as_raw_fd(), FcntlArg::F_GET_SEALS).map_err(Error::Seal)
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// A new owned fd for the same file (CLOEXEC), e.g. to send to another process.
    pub fn try_clone_fd(&self) -> Result<OwnedFd> {
        self.fd.try_clone().map_err(|e| Error::Fd {
            op: "dup",
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(0)),
        })
    }

    /// The ranges of `offset..offset+len` that hold data (`SEEK_DATA`/`SEEK_HOLE`), at most
    /// `max` of them (`None`: more than that, or the file cannot say).
    pub fn data_extents(&self, offset: u64, len: u64, max: usize) -> Option<Vec<(u64, u64)>> {
        use nix::unistd::{lseek, Whence};
        let end = offset.checked_add(len)?;
        let mut out = Vec::new();
        let mut pos = offset;
        while pos < end {
            let at = i64::try_from(pos).ok()?;
            let data = match lseek(self.fd.as_raw_fd(), at, Whence::SeekData) {
                Ok(d) => u64::try_from(d).ok()?,
                Err(Errno::ENXIO) => break,
                Err(_) => return None,
            };
            if data >= end {
                break;
            }
            let hole = lseek(
                self.fd.as_raw_fd(),
                i64::try_from(data).ok()?,
                Whence::SeekHole,
            )
            .ok()
            .and_then(|h| u64::try_from(h).ok())?;
            if out.len() == max {
                return None;
            }
            out.push((data, hole.min(end) - data));
            pos = hole.max(data + 1);
        }
        Some(out)
    }

    /// Writes zeros over `offset..offset+len` through the file (no mapping is touched).
    pub fn write_zeros(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: usize = 64 * 1024;
        let zeros = [0u8; CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = usize::try_from(len - done).map_or(CHUNK, |l| l.min(CHUNK));
            let at = i64::try_from(offset + done).map_err(|_| Error::ZeroFill(Errno::EOVERFLOW))?;
            match nix::sys::uio::pwrite(&self.fd, &zeros[..n], at) {
                Ok(0) => return Err(Error::ZeroFill(Errno::EIO)),
                Ok(w) => done += w as u64,
                Err(Errno::EINTR) => {}
                Err(e) => return Err(Error::ZeroFill(e)),
            }
        }
        Ok(())
    }

    /// Frees the pages of `offset..offset+len` so they read as zeros again.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<()> {
        nix::fcntl::fallocate(
            self.fd.as_raw_fd(),
            nix::fcntl::FallocateFlags::FALLOC_FL_PUNCH_HOLE
                | nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
        .map_err(Error::PunchHole)
    }

    /// Gives up ownership of the fd.
    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }
}

impl AsFd for SharedMemory {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_is_cloexec_and_sealable() {
        let shm = SharedMemory::new("t", 8192).unwrap();
        let flags = fcntl(shm.as_fd().as_raw_fd(), FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & libc::FD_CLOEXEC, 0);
        shm.seal_size().unwrap();
        let facts = file_facts(shm.as_fd()).unwrap();
        assert!(facts.size_sealed());
        assert!(facts.is_regular());
        assert_eq!(facts.size, 8192);
        // A sealed memfd refuses to shrink.
        assert!(nix::unistd::ftruncate(shm.as_fd(), 4096).is_err());
    }

    #[test]
    fn sealed_for_sharing_takes_no_more_seals() {
        let shm = SharedMemory::new("t", 8192).unwrap();
        shm.seal_for_sharing().unwrap();
        shm.seal_for_sharing().unwrap(); // idempotent
        for seal in [SealFlag::F_SEAL_WRITE, SealFlag::F_SEAL_FUTURE_WRITE] {
            let r = fcntl(shm.as_fd().as_raw_fd(), FcntlArg::F_ADD_SEALS(seal));
            assert_eq!(r, Err(Errno::EPERM), "{seal:?}");
        }
        let facts = file_facts(shm.as_fd()).unwrap();
        assert!(facts.size_sealed() && !facts.write_sealed());
        assert!(facts.sealed_for_sharing());
        let fresh = SharedMemory::new("u", 4096).unwrap();
        fcntl(
            fresh.as_fd().as_raw_fd(),
            FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_FUTURE_WRITE),
        )
        .unwrap();
        assert!(file_facts(fresh.as_fd()).unwrap().write_sealed());
    }

    #[test]
    fn from_fd_checks_kind_and_size() {
        let shm = SharedMemory::new("t", 4096).unwrap();
        let err = SharedMemory::from_fd(shm.try_clone_fd().unwrap(), 8192).unwrap_err();
        assert!(matches!(
            err,
            Error::FileTooSmall {
                need: 8192,
                have: 4096
            }
        ));
        assert!(SharedMemory::from_fd(shm.try_clone_fd().unwrap(), 4096).is_ok());
        let (r, _w) = nix::unistd::pipe().unwrap();
        let err = SharedMemory::from_fd(r, 1).unwrap_err();
        assert!(matches!(err, Error::NotRegularFile { .. }));
    }

    #[test]
    fn zero_size_refused() {
        assert!(matches!(
            SharedMemory::new("t", 0),
            Err(Error::InvalidSize(0))
        ));
    }
}
