//! `MemoryMapping`: an RAII `mmap` of a fd or of anonymous memory, accessed only through
//! bounds-checked copies (never through references, because another process or a vCPU may
//! write the same pages at any time).

use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd};
use std::ptr::NonNull;

use nix::sys::mman::{MapFlags, ProtFlags};

use crate::{Error, Result};

/// Protection of a mapping or placement: READ, or READ|WRITE. EXEC does not exist here on
/// purpose: nothing hostmem maps is ever executable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prot(u32);

impl Prot {
    /// `PROT_READ`.
    pub const READ: Prot = Prot(libc::PROT_READ as u32);
    /// `PROT_READ | PROT_WRITE`.
    pub const READ_WRITE: Prot = Prot((libc::PROT_READ | libc::PROT_WRITE) as u32);

    /// Checks raw protection bits from an untrusted source: READ or READ|WRITE only.
    pub fn from_bits(bits: u32) -> Result<Prot> {
        match bits {
            b if b == Self::READ.0 => Ok(Self::READ),
            b if b == Self::READ_WRITE.0 => Ok(Self::READ_WRITE),
            b => Err(Error::BadProtection(b)),
        }
    }
    /// The raw bits.
    pub fn bits(self) -> u32 {
        self.0
    }
    pub(crate) fn flags(self) -> ProtFlags {
        ProtFlags::from_bits_truncate(self.0 as i32)
    }
}

/// The system page size.
pub fn page_size() -> u64 {
    // sysconf(_SC_PAGESIZE) cannot fail on Linux; 4096 is the x86-64 value.
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u64)
}

/// True if `v` is a multiple of the page size.
pub fn is_page_aligned(v: u64) -> bool {
    v.is_multiple_of(page_size())
}

/// Checks that `offset..offset+len` lies inside `0..limit`, with checked arithmetic.
pub fn check_range(offset: u64, len: u64, limit: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= limit => Ok(()),
        _ => Err(Error::OutOfRange { offset, len, limit }),
    }
}

/// An owned memory mapping, unmapped on drop.
#[derive(Debug)]
pub struct MemoryMapping {
    addr: NonNull<u8>,
    size: usize,
}

// SAFETY: the mapping is plain memory owned by this object; it is only accessed through
// copies with bounds checks (no references are handed out), so moving it to or sharing it
// with another thread cannot create aliasing references. Concurrent writers (other threads,
// other processes, vCPUs) race at the byte level exactly as they would through the kernel.
unsafe impl Send for MemoryMapping {}
// SAFETY: see `Send` above; all methods take `&self` and copy bytes with raw pointers.
unsafe impl Sync for MemoryMapping {}

impl MemoryMapping {
    /// Maps `size` bytes of anonymous, private, zero-filled memory (read/write).
    pub fn anonymous(size: usize) -> Result<Self> {
        let len = NonZeroUsize::new(size).ok_or(Error::InvalidSize(0))?;
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses cannot alias
        // any existing Rust object; the result is owned by the returned MemoryMapping.
        let addr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE | MapFlags::MAP_NORESERVE,
            )
        }
        .map_err(|errno| Error::Mmap { len: size, errno })?;
        Ok(MemoryMapping {
            addr: addr.cast(),
            size,
        })
    }

    /// Maps `size` bytes of anonymous, shared, zero-filled memory (read/write): shared with
    /// children forked afterwards (e.g. `seccomp::kernel_verdicts`'s).
    pub fn shared_anonymous(size: usize) -> Result<Self> {
        let len = NonZeroUsize::new(size).ok_or(Error::InvalidSize(0))?;
        // SAFETY: a fresh anonymous mapping at an address the kernel chooses cannot alias
        // any existing Rust object; the result is owned by the returned MemoryMapping.
        let addr = unsafe {
            nix::sys::mman::mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
            )
        }
        .map_err(|errno| Error::Mmap { len: size, errno })?;
        Ok(MemoryMapping {
            addr: addr.cast(),
            size,
        })
    }

    /// Maps `size` bytes of `fd` from `offset`, MAP_SHARED, with `prot`. The file must be at
    /// least `offset + size` long (checked with fstat, so a short file is an error here and
    /// not a SIGBUS later).
    pub fn from_fd(fd: BorrowedFd<'_>, offset: u64, size: usize, prot: Prot) -> Result<Self> {
        let len = NonZeroUsize::new(size).ok_or(Error::InvalidSize(0))?;
        if !is_page_aligned(offset) {
            return Err(Error::Misaligned {
                what: "file offset",
                value: offset,
            });
        }
        let facts = crate::shm::file_facts(fd)?;
        if !facts.is_regular() {
            return Err(Error::NotRegularFile { mode: facts.mode });
        }
        let need = offset
            .checked_add(size as u64)
            .ok_or(Error::InvalidSize(offset))?;
        if facts.size < need {
            return Err(Error::FileTooSmall {
                need,
                have: facts.size,
            });
        }
        let off = i64::try_from(offset).map_err(|_| Error::InvalidSize(offset))?;
        // SAFETY: the kernel picks a fresh address (no MAP_FIXED), so no existing Rust
        // object is affected; the mapping is owned by the returned MemoryMapping.
        let addr = unsafe {
            nix::sys::mman::mmap(
                None,
                len,
                prot.flags(),
                MapFlags::MAP_SHARED,
                fd.as_fd(),
                off,
            )
        }
        .map_err(|errno| Error::Mmap { len: size, errno })?;
        Ok(MemoryMapping {
            addr: addr.cast(),
            size,
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Host address of the first byte (for KVM and MAP_FIXED inside base only).
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    fn check(&self, offset: usize, len: usize) -> Result<()> {
        check_range(offset as u64, len as u64, self.size as u64)
    }

    /// Copies `buf.len()` bytes from `offset` into `buf`.
    pub fn read_slice(&self, offset: usize, buf: &mut [u8]) -> Result<()> {
        self.check(offset, buf.len())?;
        // SAFETY: offset..offset+len was checked to lie inside the live mapping, and `buf`
        // is a distinct Rust buffer, so the regions cannot overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.addr.as_ptr().add(offset),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        Ok(())
    }

    /// Copies `data` to `offset`. Only for mappings created writable.
    pub fn write_slice(&self, offset: usize, data: &[u8]) -> Result<()> {
        self.check(offset, data.len())?;
        // SAFETY: offset..offset+len was checked to lie inside the live mapping and `data`
        // is a distinct Rust buffer. The mapping was created writable by every caller in
        // this crate's API except `from_fd(.., Prot::READ)`, whose users never write.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.addr.as_ptr().add(offset), data.len())
        };
        Ok(())
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<()> {
        self.check(offset, len)?;
        // SAFETY: the range was checked to lie inside the live, writable mapping.
        unsafe { std::ptr::write_bytes(self.addr.as_ptr().add(offset), byte, len) };
        Ok(())
    }
}

impl Drop for MemoryMapping {
    fn drop(&mut self) {
        // SAFETY: addr/size describe a mapping this object created and still owns; nothing
        // else refers to it (all access goes through &self methods that have ended).
        if let Err(e) = unsafe { nix::sys::mman::munmap(self.addr.cast(), self.size) } {
            log::error!("munmap of {} bytes failed: {e}", self.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::SharedMemory;

    #[test]
    fn shared_mapping_sees_the_same_pages() {
        let shm = SharedMemory::new("t", 8192).unwrap();
        let a = MemoryMapping::from_fd(shm.as_fd(), 0, 8192, Prot::READ_WRITE).unwrap();
        let b = MemoryMapping::from_fd(shm.as_fd(), 4096, 4096, Prot::READ).unwrap();
        a.write_slice(4096 + 10, b"hello").unwrap();
        let mut buf = [0u8; 5];
        b.read_slice(10, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
    }

    #[test]
    fn bounds_are_checked() {
        let m = MemoryMapping::anonymous(4096).unwrap();
        let mut buf = [0u8; 8];
        assert!(m.read_slice(4090, &mut buf).is_err());
        assert!(m.read_slice(usize::MAX - 2, &mut buf).is_err());
        assert!(m.write_slice(4089, &buf).is_err());
        assert!(m.fill(0, 4097, 1).is_err());
        m.write_slice(4088, &buf).unwrap();
    }

    #[test]
    fn short_file_is_refused_not_sigbus() {
        let shm = SharedMemory::new("t", 4096).unwrap();
        let err = MemoryMapping::from_fd(shm.as_fd(), 0, 8192, Prot::READ).unwrap_err();
        assert!(matches!(err, Error::FileTooSmall { .. }));
    }

    #[test]
    fn exec_protection_refused() {
        assert!(Prot::from_bits((libc::PROT_READ | libc::PROT_EXEC) as u32).is_err());
        assert!(Prot::from_bits(0).is_err());
        assert_eq!(Prot::from_bits(3).unwrap(), Prot::READ_WRITE);
    }
}
