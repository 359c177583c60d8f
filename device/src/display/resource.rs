//! 2D resources: their host copy, their guest-RAM backing, and the commands on them
//! (`RESOURCE_CREATE_2D`, `RESOURCE_ATTACH_BACKING`/`DETACH_BACKING`,
//! `TRANSFER_TO_HOST_2D`).

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::virtio::GuestMemoryMmap;
use crate::wire::{ErrorCode, MemEntry, ResourceAttachBacking, ResourceCreate2d, TransferToHost2d};

use super::{
    refuse, Display, Format, Refusal, BYTES_PER_PIXEL, MAX_2D_RESOURCES, MAX_BACKING_BYTES,
    MAX_BACKING_ENTRIES,
};

/// A 2D resource: its host copy and its guest backing.
#[derive(Debug)]
pub(super) struct Resource2d {
    pub(super) format: Format,
    pub(super) width: u32,
    pub(super) height: u32,
    pub(super) stride: u32,
    pub(super) data: Vec<u8>,
    /// Backing entries (guest address, length), checked at attach time.
    pub(super) backing: Option<Backing>,
}

/// Guest RAM ranges backing a 2D resource, in order.
#[derive(Debug)]
pub(super) struct Backing {
    entries: Vec<(u64, u64)>,
    /// Offset of each entry's first byte in the backing.
    starts: Vec<u64>,
    pub(super) len: u64,
}

impl Backing {
    /// Copies `dst.len()` bytes from backing offset `off` (the caller checked the range
    /// lies in the backing). Fails when guest RAM does not hold an entry any more.
    fn read(&self, mem: &GuestMemoryMmap, off: u64, dst: &mut [u8]) -> Result<(), String> {
        let mut off = off;
        let mut done = 0usize;
        // The entry holding `off`: the last one starting at or before it.
        let mut i = self.starts.partition_point(|s| *s <= off).saturating_sub(1);
        while done < dst.len() {
            let (Some(&(gpa, len)), Some(&start)) = (self.entries.get(i), self.starts.get(i))
            else {
                return Err(format!("backing offset {off:#x} past its end"));
            };
            let within = off - start;
            let n = usize::try_from((len - within).min((dst.len() - done) as u64))
                .unwrap_or(usize::MAX);
            let part = dst
                .get_mut(done..done + n)
                .ok_or_else(|| "backing read out of range".to_string())?;
            mem.read_slice(part, GuestAddress(gpa + within))
                .map_err(|e| format!("backing {gpa:#x}+{within:#x}: {e}"))?;
            done += n;
            off += n as u64;
            i += 1;
        }
        Ok(())
    }
}

impl Display {
    /// `RESOURCE_CREATE_2D` checks up to the memory bounds: the bytes the resource needs.
    /// `blob_taken`: the id is a blob's.
    pub fn check_create_2d(&self, c: &ResourceCreate2d, blob_taken: bool) -> Result<u64, Refusal> {
        let id = c.resource_id;
        if id == 0 {
            return refuse(ErrorCode::InvalidResourceId, "resource id 0");
        }
        if blob_taken || self.resources.contains_key(&id) {
            return refuse(
                ErrorCode::InvalidResourceId,
                format!("resource {id} exists"),
            );
        }
        let format = super::format_and_size(c.format, c.width, c.height)?;
        let bytes = u64::from(c.width)
            .checked_mul(u64::from(format.bytes_per_pixel()))
            .and_then(|s| s.checked_mul(u64::from(c.height)))
            .ok_or((ErrorCode::InvalidParameter, "size overflows".to_string()))?;
        if self.resources.len() >= MAX_2D_RESOURCES {
            return refuse(
                ErrorCode::OutOfMemory,
                format!("{} 2D resources: limit reached", self.resources.len()),
            );
        }
        match self.bytes.checked_add(bytes) {
            Some(after) if after <= self.budget => Ok(bytes),
            _ => refuse(
                ErrorCode::OutOfMemory,
                format!(
                    "2D memory budget: {} bytes live + {bytes} > {}",
                    self.bytes, self.budget
                ),
            ),
        }
    }

    /// Counts a creation refused at a memory bound.
    pub fn note_budget_refusal(&mut self) {
        self.stats.budget_refusals += 1;
    }

    /// `RESOURCE_CREATE_2D` after [`Display::check_create_2d`] and the handler's shared
    /// budget: allocates the host copy (zeroed). A failed allocation is `ERR_OUT_OF_MEMORY`.
    pub fn create_2d(&mut self, c: &ResourceCreate2d, bytes: u64) -> Result<(), Refusal> {
        let format = Format::from_u32(c.format)
            .ok_or((ErrorCode::InvalidParameter, "format".to_string()))?;
        let len = usize::try_from(bytes)
            .map_err(|_| (ErrorCode::OutOfMemory, format!("{bytes} bytes")))?;
        let mut data = Vec::new();
        data.try_reserve_exact(len)
            .map_err(|e| (ErrorCode::OutOfMemory, format!("{bytes} bytes: {e}")))?;
        data.resize(len, 0);
        self.resources.insert(
            c.resource_id,
            Resource2d {
                format,
                width: c.width,
                height: c.height,
                stride: c.width.saturating_mul(BYTES_PER_PIXEL),
                data,
                backing: None,
            },
        );
        self.bytes = self.bytes.saturating_add(bytes);
        self.bytes_max = self.bytes_max.max(self.bytes);
        log::debug!(
            "resource {}: 2D {}x{} {format:?}",
            c.resource_id,
            c.width,
            c.height
        );
        Ok(())
    }

    fn resource_2d(&mut self, id: u32) -> Result<&mut Resource2d, Refusal> {
        self.resources
            .get_mut(&id)
            .ok_or((ErrorCode::InvalidResourceId, format!("no 2D resource {id}")))
    }

    /// `RESOURCE_ATTACH_BACKING` against guest RAM `mem` (see the module docs).
    pub fn attach_backing(
        &mut self,
        c: &ResourceAttachBacking,
        mem: Option<&GuestMemoryMmap>,
    ) -> Result<(), Refusal> {
        let id = c.resource_id;
        let excluded = self.excluded.clone();
        let res = self.resource_2d(id)?;
        if res.backing.is_some() {
            return refuse(
                ErrorCode::Unspec,
                format!("resource {id} has backing already"),
            );
        }
        let n = c.entries.len();
        if n == 0 || n > MAX_BACKING_ENTRIES {
            return refuse(
                ErrorCode::InvalidParameter,
                format!("{n} mem entries (1 to {MAX_BACKING_ENTRIES})"),
            );
        }
        let Some(mem) = mem else {
            return refuse(ErrorCode::Unspec, "no guest memory yet");
        };
        let mut entries = Vec::with_capacity(n);
        let mut starts = Vec::with_capacity(n);
        let mut total: u64 = 0;
        for (i, e) in c.entries.iter().enumerate() {
            let (addr, len) = check_entry(i, e, mem, &excluded)?;
            starts.push(total);
            total = match total.checked_add(len) {
                Some(t) if t <= MAX_BACKING_BYTES => t,
                _ => {
                    return refuse(
                        ErrorCode::InvalidParameter,
                        format!("backing larger than {MAX_BACKING_BYTES} bytes"),
                    )
                }
            };
            entries.push((addr, len));
        }
        res.backing = Some(Backing {
            entries,
            starts,
            len: total,
        });
        log::debug!("resource {id}: {n} backing entries, {total} bytes");
        Ok(())
    }

    /// `RESOURCE_DETACH_BACKING`.
    pub fn detach_backing(&mut self, id: u32) -> Result<(), Refusal> {
        let res = self.resource_2d(id)?;
        if res.backing.take().is_none() {
            return refuse(ErrorCode::Unspec, format!("resource {id} has no backing"));
        }
        Ok(())
    }

    /// `TRANSFER_TO_HOST_2D` from guest RAM `mem`.
    pub fn transfer_to_host_2d(
        &mut self,
        c: &TransferToHost2d,
        mem: Option<&GuestMemoryMmap>,
    ) -> Result<(), Refusal> {
        let id = c.resource_id;
        let res = self.resource_2d(id)?;
        let r = c.r;
        if !r.within(res.width, res.height) {
            return refuse(
                ErrorCode::InvalidParameter,
                format!(
                    "rect {r:?} outside resource {id} of {}x{}",
                    res.width, res.height
                ),
            );
        }
        let Some(backing) = res.backing.as_ref() else {
            return refuse(ErrorCode::Unspec, format!("resource {id} has no backing"));
        };
        if r.is_empty() {
            return Ok(());
        }
        let bpp = u64::from(BYTES_PER_PIXEL);
        let stride = u64::from(res.stride);
        let row = u64::from(r.width) * bpp;
        // The last byte read: offset + stride × (height − 1) + row.
        match super::rows_end(c.offset, stride, r.height, row) {
            Some(end) if end <= backing.len => {}
            _ => {
                return refuse(
                    ErrorCode::InvalidParameter,
                    format!(
                        "offset {:#x} + {} rows of stride {stride}: past the backing's {} bytes",
                        c.offset, r.height, backing.len
                    ),
                )
            }
        }
        let Some(mem) = mem else {
            return refuse(ErrorCode::Unspec, "no guest memory");
        };
        let row_len = usize::try_from(row).unwrap_or(usize::MAX);
        let full_rows = r.x == 0 && r.width == res.width;
        let rows: Vec<(u64, u64, usize)> = if full_rows {
            // Whole rows are contiguous on both sides: one read.
            let len = usize::try_from(stride * u64::from(r.height)).unwrap_or(usize::MAX);
            vec![(c.offset, u64::from(r.y) * stride, len)]
        } else {
            (0..u64::from(r.height))
                .map(|h| {
                    (
                        c.offset + stride * h,
                        (u64::from(r.y) + h) * stride + u64::from(r.x) * bpp,
                        row_len,
                    )
                })
                .collect()
        };
        for (src, dst, len) in rows {
            let dst = usize::try_from(dst).unwrap_or(usize::MAX);
            let Some(part) = dst
                .checked_add(len)
                .and_then(|end| res.data.get_mut(dst..end))
            else {
                return refuse(ErrorCode::Unspec, "transfer outside the host copy");
            };
            backing
                .read(mem, src, part)
                .map_err(|e| (ErrorCode::Unspec, format!("resource {id}: {e}")))?;
        }
        self.stats.transfers += 1;
        self.stats.transferred_bytes = self
            .stats
            .transferred_bytes
            .saturating_add(row * u64::from(r.height));
        Ok(())
    }
}

/// One backing entry checked: `(addr, len)`.
fn check_entry(
    i: usize,
    e: &MemEntry,
    mem: &GuestMemoryMmap,
    excluded: &[(u64, u64)],
) -> Result<(u64, u64), Refusal> {
    let (addr, len) = (e.addr, u64::from(e.length));
    if len == 0 {
        return refuse(
            ErrorCode::InvalidParameter,
            format!("mem entry {i}: length 0"),
        );
    }
    let Some(end) = addr.checked_add(len) else {
        return refuse(
            ErrorCode::InvalidParameter,
            format!("mem entry {i}: {addr:#x}+{len:#x} wraps"),
        );
    };
    for &(start, size) in excluded {
        let x_end = start.saturating_add(size);
        if addr < x_end && start < end {
            return refuse(
                ErrorCode::InvalidParameter,
                format!("mem entry {i}: {addr:#x}+{len:#x} is in the hostmem window {start:#x}+{size:#x}"),
            );
        }
    }
    if !mem.check_range(
        GuestAddress(addr),
        e.length as usize,
        vm_memory::Permissions::Read,
    ) {
        return refuse(
            ErrorCode::InvalidParameter,
            format!("mem entry {i}: {addr:#x}+{len:#x} is not guest RAM"),
        );
    }
    Ok((addr, len))
}
