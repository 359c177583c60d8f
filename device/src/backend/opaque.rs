//! Which OPAQUE blob fds the device places, and from where in the file.
//!
//! Without udmabuf (this machine kind), lavapipe exports host-visible `VkDeviceMemory` —
//! what a venus guest maps at `vkMapMemory` — only as `VK_EXTERNAL_MEMORY_HANDLE_TYPE_OPAQUE_FD`:
//! a memfd named `llvmpipe memory fd` whose first page is a header (Mesa's
//! `os_malloc_aligned_fd`) and whose data starts at the offset the header names. An OPAQUE
//! fd has no defined layout in general, so the device places one only when it is exactly
//! that layout ([`lavapipe_data_offset`]), measured in `docs/lavapipe-opaque-fd.md` on Mesa
//! 22.3.6 and 26.2.6. Anything else is refused with the reason: the guest gets an error,
//! never a mapping of the wrong bytes (a header page where its data should be).
//!
//! The VMM does not trust this: it checks the placement's `fd_offset + len` against the file
//! and the seals like for any blob.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;

use hostmem_base::shm::file_facts;

/// The name lavapipe gives the memfd (`/proc/self/fd/N` reads `/memfd:<name> (deleted)`).
pub const LAVAPIPE_MEMFD_NAME: &str = "llvmpipe memory fd";
/// Where lavapipe's data starts (its alignment, one page).
pub const LAVAPIPE_DATA_OFFSET: u64 = 4096;

/// The file offset at which the blob's `blob_size` bytes start in `fd`, if `fd` is a
/// lavapipe OPAQUE memory fd that holds them; otherwise why not.
///
/// Accepted only when all hold: the memfd's name is [`LAVAPIPE_MEMFD_NAME`]; it is sealed
/// against shrinking and growing (else the file could shrink under the window: SIGBUS);
/// header `u64[0]` equals the file's size; header `u64[1]` is [`LAVAPIPE_DATA_OFFSET`] and
/// the 8 bytes just before the data repeat it; `offset + blob_size` fits in the file.
pub fn lavapipe_data_offset(fd: BorrowedFd<'_>, blob_size: u64) -> Result<u64, String> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| format!("cannot read the fd's name: {e}"))?;
    let link = link.to_string_lossy();
    let name = link
        .strip_prefix("/memfd:")
        .map(|n| n.strip_suffix(" (deleted)").unwrap_or(n));
    if name != Some(LAVAPIPE_MEMFD_NAME) {
        return Err(format!(
            "not lavapipe's memory memfd (it is {link:?}): its layout is unknown"
        ));
    }
    let facts = file_facts(fd).map_err(|e| format!("fstat: {e}"))?;
    if !facts.is_regular() || !facts.size_sealed() {
        return Err("the memfd is not sealed against shrinking and growing".into());
    }
    let file = File::from(
        fd.try_clone_to_owned()
            .map_err(|e| format!("dup of the fd: {e}"))?,
    );
    let mut header = [0u8; 16];
    file.read_exact_at(&mut header, 0)
        .map_err(|e| format!("reading the header: {e}"))?;
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
    let (size, offset) = (word(&header[..8]), word(&header[8..]));
    if size != facts.size {
        return Err(format!(
            "header size {size:#x} is not the file's size {:#x}",
            facts.size
        ));
    }
    if offset != LAVAPIPE_DATA_OFFSET {
        return Err(format!(
            "header data offset {offset:#x}, not {LAVAPIPE_DATA_OFFSET:#x}"
        ));
    }
    let mut trailer = [0u8; 8];
    file.read_exact_at(&mut trailer, offset - 8)
        .map_err(|e| format!("reading the offset before the data: {e}"))?;
    if word(&trailer) != offset {
        return Err("the offset before the data does not repeat the header's".into());
    }
    match offset.checked_add(blob_size) {
        Some(end) if blob_size > 0 && end <= facts.size => Ok(offset),
        _ => Err(format!(
            "a blob of {blob_size:#x} bytes from {offset:#x} does not fit a file of {:#x}",
            facts.size
        )),
    }
}

/// [`lavapipe_data_offset`] for anything that holds an fd.
pub fn data_offset_of(fd: &impl AsFd, blob_size: u64) -> Result<u64, String> {
    lavapipe_data_offset(fd.as_fd(), blob_size)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hostmem_base::shm::SharedMemory;

    /// A memfd laid out as lavapipe lays out `asked` bytes (header, data at 4096, 40 more).
    fn lavapipe_like(name: &str, asked: u64) -> SharedMemory {
        let size = asked + 4096 + 40;
        let shm = SharedMemory::new(name, size).unwrap();
        let file = File::from(shm.try_clone_fd().unwrap());
        file.write_all_at(&size.to_le_bytes(), 0).unwrap();
        file.write_all_at(&4096u64.to_le_bytes(), 8).unwrap();
        file.write_all_at(&4096u64.to_le_bytes(), 4088).unwrap();
        shm.seal_size().unwrap();
        shm
    }

    fn write_at(shm: &SharedMemory, off: u64, v: u64) {
        let file = File::from(shm.try_clone_fd().unwrap());
        file.write_all_at(&v.to_le_bytes(), off).unwrap();
    }

    #[test]
    fn accepts_lavapipe_layout() {
        let shm = lavapipe_like(LAVAPIPE_MEMFD_NAME, 65536);
        assert_eq!(
            data_offset_of(&shm.try_clone_fd().unwrap(), 65536),
            Ok(4096)
        );
    }

    #[test]
    fn refuses_other_names_sizes_and_headers() {
        let fd = |s: &SharedMemory| s.try_clone_fd().unwrap();
        let other = lavapipe_like("hostmem-blob", 65536);
        assert!(data_offset_of(&fd(&other), 65536)
            .unwrap_err()
            .contains("not lavapipe"));

        let shm = lavapipe_like(LAVAPIPE_MEMFD_NAME, 65536);
        assert!(data_offset_of(&fd(&shm), 65536 + 4096)
            .unwrap_err()
            .contains("does not fit"));
        assert!(data_offset_of(&fd(&shm), 0).is_err());
        assert!(data_offset_of(&fd(&shm), u64::MAX).is_err());

        write_at(&shm, 0, 12345);
        assert!(data_offset_of(&fd(&shm), 4096)
            .unwrap_err()
            .contains("header size"));

        let shm = lavapipe_like(LAVAPIPE_MEMFD_NAME, 65536);
        write_at(&shm, 8, 8192);
        assert!(data_offset_of(&fd(&shm), 4096)
            .unwrap_err()
            .contains("data offset"));

        let shm = lavapipe_like(LAVAPIPE_MEMFD_NAME, 65536);
        write_at(&shm, 4088, 0);
        assert!(data_offset_of(&fd(&shm), 4096)
            .unwrap_err()
            .contains("repeat"));
    }

    #[test]
    fn refuses_unsealed() {
        let size = 4096 + 4096 + 40u64;
        let shm = SharedMemory::new(LAVAPIPE_MEMFD_NAME, size).unwrap();
        write_at(&shm, 0, size);
        write_at(&shm, 8, 4096);
        write_at(&shm, 4088, 4096);
        let err = data_offset_of(&shm.try_clone_fd().unwrap(), 4096).unwrap_err();
        assert!(err.contains("sealed"), "{err}");
    }
}
