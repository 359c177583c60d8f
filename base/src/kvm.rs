//! KVM: a VM whose memslots are backed by host regions that stay mapped as long as the slot
//! exists, with every memslot change counted (DESIGN.md invariant 3).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};

pub use kvm_bindings;
pub use kvm_ioctls;

/// A host memory range that stays mapped, at a fixed address, for as long as the object
/// lives.
///
/// # Safety
/// Implementers guarantee that `host_addr()..host_addr() + size()` is a valid mapping for
/// the object's whole lifetime (KVM reads and writes it while a memslot points at it).
pub unsafe trait HostRegion: Send + Sync {
    /// First byte.
    fn host_addr(&self) -> *mut u8;
    /// Length in bytes.
    fn size(&self) -> usize;
}

/// KVM failures, each with the errno.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// Opening `/dev/kvm` failed.
    #[error("opening /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    /// `KVM_CREATE_VM` failed.
    #[error("KVM_CREATE_VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("KVM_SET_USER_MEMORY_REGION slot {slot}: {err}")]
    SetRegion {
        /// Slot.
        slot: u32,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// The region range is outside the host region, misaligned or empty.
    #[error("bad region for slot {slot}: offset {offset:#x} size {size:#x} of {have:#x}")]
    BadRegion {
        /// Slot.
        slot: u32,
        /// Offset in the host region.
        offset: usize,
        /// Size.
        size: usize,
        /// Size of the host region.
        have: usize,
    },
    /// The slot is not in use.
    #[error("slot {0} is not in use")]
    NoSuchSlot(u32),
    /// `KVM_CREATE_VCPU` or CPUID setup failed.
    #[error("vCPU setup: {0}")]
    Vcpu(kvm_ioctls::Error),
}

struct Slot {
    _region: Arc<dyn HostRegion>,
}

/// A KVM VM.
pub struct Vm {
    kvm: Kvm,
    vm: VmFd,
    slots: Mutex<HashMap<u32, Slot>>,
    changes: AtomicU64,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("memslot_changes", &self.memslot_changes())
            .finish()
    }
}

impl Vm {
    /// `Ok` if `/dev/kvm` can create a VM here, else why not (for "skipped: <reason>").
    pub fn available() -> Result<(), String> {
        let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
        kvm.create_vm()
            .map(drop)
            .map_err(|e| format!("KVM_CREATE_VM: {e}"))
    }

    /// Opens `/dev/kvm` and creates a VM.
    pub fn open() -> Result<Vm, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let vm = kvm.create_vm().map_err(KvmError::CreateVm)?;
        Ok(Vm {
            kvm,
            vm,
            slots: Mutex::new(HashMap::new()),
            changes: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers `region[offset..offset+size]` as memslot `slot` at guest address `gpa`
    /// (replacing nothing: the slot must be free). Counts one memslot change.
    pub fn set_region(
        &self,
        slot: u32,
        gpa: u64,
        region: Arc<dyn HostRegion>,
        offset: usize,
        size: usize,
    ) -> Result<(), KvmError> {
        let bad = || KvmError::BadRegion {
            slot,
            offset,
            size,
            have: region.size(),
        };
        let end = offset.checked_add(size).ok_or_else(bad)?;
        if size == 0
            || end > region.size()
            || !offset.is_multiple_of(4096)
            || !size.is_multiple_of(4096)
        {
            return Err(bad());
        }
        let mut slots = self.lock();
        let mem = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size as u64,
            userspace_addr: region.host_addr() as u64 + offset as u64,
        };
        // SAFETY: the host range lies inside `region` (checked above), which by the
        // HostRegion contract stays mapped while the Arc lives; the Arc is kept in the slot
        // table until the slot is deleted, so KVM never sees a dangling address.
        unsafe { self.vm.set_user_memory_region(mem) }
            .map_err(|err| KvmError::SetRegion { slot, err })?;
        self.changes.fetch_add(1, Ordering::Relaxed);
        slots.insert(slot, Slot { _region: region });
        Ok(())
    }

    /// Deletes memslot `slot` and releases its region. Counts one memslot change.
    pub fn remove_region(&self, slot: u32) -> Result<(), KvmError> {
        let mut slots = self.lock();
        if !slots.contains_key(&slot) {
            return Err(KvmError::NoSuchSlot(slot));
        }
        let mem = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; no host memory is referenced.
        unsafe { self.vm.set_user_memory_region(mem) }
            .map_err(|err| KvmError::SetRegion { slot, err })?;
        self.changes.fetch_add(1, Ordering::Relaxed);
        // Only now, with KVM no longer pointing at it, may the region be dropped.
        slots.remove(&slot);
        Ok(())
    }

    /// Memslot changes (adds and deletes) so far.
    pub fn memslot_changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Slots in use.
    pub fn live_slots(&self) -> usize {
        self.lock().len()
    }

    /// KVM's limit on memslots (`KVM_CAP_NR_MEMSLOTS`).
    pub fn max_memslots(&self) -> usize {
        self.kvm.get_nr_memslots()
    }

    /// True if KVM reports `cap`.
    pub fn has_cap(&self, cap: Cap) -> bool {
        self.kvm.check_extension(cap)
    }

    /// Creates vCPU `id` with the host's supported CPUID.
    pub fn create_vcpu(&self, id: u64) -> Result<VcpuFd, KvmError> {
        let vcpu = self.vm.create_vcpu(id).map_err(KvmError::Vcpu)?;
        let cpuid: CpuId = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::Vcpu)?;
        vcpu.set_cpuid2(&cpuid).map_err(KvmError::Vcpu)?;
        Ok(vcpu)
    }
}

// SAFETY: the window's mapping stays at the same address for the Window's whole life (it
// is unmapped only in Drop); placements replace pages inside it, never the range itself.
unsafe impl HostRegion for crate::window::Window {
    fn host_addr(&self) -> *mut u8 {
        self.mapping().as_ptr()
    }
    fn size(&self) -> usize {
        self.mapping().size()
    }
}

// SAFETY: a MemoryMapping is unmapped only in Drop, so the range is valid while it lives.
unsafe impl HostRegion for crate::mmap::MemoryMapping {
    fn host_addr(&self) -> *mut u8 {
        self.as_ptr()
    }
    fn size(&self) -> usize {
        crate::mmap::MemoryMapping::size(self)
    }
}
