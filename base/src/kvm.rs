//! KVM: a VM whose memslots are backed by host regions that stay mapped as long as the slot
//! exists, with every memslot change counted (invariant 3 in docs/invariants.md).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VcpuFd, VmFd};

pub use kvm_bindings;
pub use kvm_ioctls;
/// The eventfd type the ioeventfd and irqfd calls take (re-exported so callers need not
/// depend on vmm-sys-util themselves).
pub use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Borrows an [`EventFd`]'s descriptor, e.g. to send it over a tube (vmm-sys-util's
/// `EventFd` does not implement `AsFd`).
pub fn eventfd_as_fd(fd: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the EventFd owns its descriptor and closes it only when dropped; the borrow's
    // lifetime is tied to `&fd`, so the descriptor stays open while the BorrowedFd lives.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }
}

/// Takes an owned descriptor (e.g. a kick eventfd that arrived over a tube) as an
/// [`EventFd`], the type the ioeventfd/irqfd calls and the `vhost` crate take. A descriptor
/// that is not an eventfd only makes its reads and writes fail.
pub fn eventfd_from_fd(fd: std::os::fd::OwnedFd) -> EventFd {
    use std::os::fd::{FromRawFd, IntoRawFd};
    // SAFETY: `into_raw_fd` gives up the OwnedFd's sole ownership of an open descriptor,
    // which the EventFd takes over (and closes when dropped); nothing else owns it.
    unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) }
}

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

/// KVM failures: one variant per failed operation, each carrying the kernel's errno (see
/// [`KvmError::errno`]).
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
    /// The region range is outside the host region, misaligned or empty, or the guest
    /// address is misaligned or overflows.
    #[error(
        "bad region for slot {slot}: gpa {gpa:#x} offset {offset:#x} size {size:#x} of {have:#x}"
    )]
    BadRegion {
        /// Slot.
        slot: u32,
        /// Guest-physical address asked for.
        gpa: u64,
        /// Offset in the host region.
        offset: usize,
        /// Size.
        size: usize,
        /// Size of the host region.
        have: usize,
    },
    /// The slot is already in use (delete it first).
    #[error("slot {0} is already in use")]
    SlotInUse(u32),
    /// The slot is not in use.
    #[error("slot {0} is not in use")]
    NoSuchSlot(u32),
    /// `KVM_CREATE_VCPU` failed.
    #[error("KVM_CREATE_VCPU {id}: {err}")]
    CreateVcpu {
        /// vCPU id.
        id: u64,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    GetCpuid(kvm_ioctls::Error),
    /// `KVM_SET_CPUID2` failed.
    #[error("KVM_SET_CPUID2: {0}")]
    SetCpuid(kvm_ioctls::Error),
    /// `KVM_CREATE_IRQCHIP` failed (`EEXIST`: already created; `EINVAL`: a vCPU exists).
    #[error("KVM_CREATE_IRQCHIP: {0}")]
    CreateIrqchip(kvm_ioctls::Error),
    /// `KVM_IOEVENTFD` (assign) failed (`EEXIST`: the address already has one).
    #[error("KVM_IOEVENTFD assign at MMIO {gpa:#x}: {err}")]
    RegisterIoevent {
        /// Guest-physical address.
        gpa: u64,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// `KVM_IOEVENTFD` (deassign) failed (`ENOENT`: no such registration).
    #[error("KVM_IOEVENTFD deassign at MMIO {gpa:#x}: {err}")]
    UnregisterIoevent {
        /// Guest-physical address.
        gpa: u64,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// `KVM_IRQFD` (assign) failed (`EINVAL` without an in-kernel irqchip, `EBUSY` if the
    /// eventfd is already an irqfd).
    #[error("KVM_IRQFD assign on GSI {gsi}: {err}")]
    RegisterIrqfd {
        /// The GSI.
        gsi: u32,
        /// The error.
        err: kvm_ioctls::Error,
    },
    /// `KVM_IRQFD` (deassign) failed.
    #[error("KVM_IRQFD deassign on GSI {gsi}: {err}")]
    UnregisterIrqfd {
        /// The GSI.
        gsi: u32,
        /// The error.
        err: kvm_ioctls::Error,
    },
}

impl KvmError {
    /// The errno behind the failure, if it came from the kernel.
    pub fn errno(&self) -> Option<i32> {
        match self {
            KvmError::Open(e)
            | KvmError::CreateVm(e)
            | KvmError::SetRegion { err: e, .. }
            | KvmError::CreateVcpu { err: e, .. }
            | KvmError::GetCpuid(e)
            | KvmError::SetCpuid(e)
            | KvmError::CreateIrqchip(e)
            | KvmError::RegisterIoevent { err: e, .. }
            | KvmError::UnregisterIoevent { err: e, .. }
            | KvmError::RegisterIrqfd { err: e, .. }
            | KvmError::UnregisterIrqfd { err: e, .. } => Some(e.errno()),
            KvmError::BadRegion { .. } | KvmError::SlotInUse(_) | KvmError::NoSuchSlot(_) => None,
        }
    }
}

const PAGE: usize = 4096;

/// The regions behind live memslots, by slot. Shared (via `Arc`) by the [`Vm`] and every
/// [`Vcpu`], because the kernel VM lives as long as its last fd: a vCPU fd keeps it, and
/// with it every memslot, alive after the `Vm` is dropped.
type SlotTable = Arc<Mutex<HashMap<u32, Arc<dyn HostRegion>>>>;

/// A KVM VM whose memslots hold their host regions alive, with every memslot change
/// counted. `Send + Sync`: memslots may be changed from one thread while a vCPU runs on
/// another.
pub struct Vm {
    kvm: Kvm,
    // Declared before `slots`: the VM fd closes before the regions may be unmapped.
    vm: VmFd,
    slots: SlotTable,
    changes: AtomicU64,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("live_slots", &self.live_slots())
            .field("memslot_changes", &self.memslot_changes())
            .finish()
    }
}

fn lock_slots(slots: &SlotTable) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<dyn HostRegion>>> {
    slots.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vm {
    /// `Ok` if `/dev/kvm` can create a VM here, else why not (for `skipped: <reason>`).
    pub fn available() -> Result<(), String> {
        let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
        kvm.create_vm()
            .map(drop)
            .map_err(|e| format!("KVM_CREATE_VM: {e}"))
    }

    /// Opens `/dev/kvm` and creates a VM (no memslots, no vCPUs).
    pub fn open() -> Result<Vm, KvmError> {
        let kvm = Kvm::new().map_err(KvmError::Open)?;
        let vm = kvm.create_vm().map_err(KvmError::CreateVm)?;
        Ok(Vm {
            kvm,
            vm,
            slots: Arc::new(Mutex::new(HashMap::new())),
            changes: AtomicU64::new(0),
        })
    }

    /// Registers `region[offset..offset + size]` as memslot `slot` at guest-physical `gpa`.
    /// The slot must be free; `gpa`, `offset` and `size` page-aligned, `size > 0`, the range
    /// inside the region (checked arithmetic). The slot keeps `region` alive until
    /// [`Vm::remove_region`] (or until the VM and all its vCPUs are gone). Counts one
    /// memslot change.
    pub fn set_region(
        &self,
        slot: u32,
        gpa: u64,
        region: Arc<dyn HostRegion>,
        offset: usize,
        size: usize,
    ) -> Result<(), KvmError> {
        let have = region.size();
        let bad = || KvmError::BadRegion {
            slot,
            gpa,
            offset,
            size,
            have,
        };
        let end = offset.checked_add(size).ok_or_else(bad)?;
        let host = (region.host_addr() as usize)
            .checked_add(offset)
            .ok_or_else(bad)?;
        if size == 0
            || end > have
            || !offset.is_multiple_of(PAGE)
            || !size.is_multiple_of(PAGE)
            || !host.is_multiple_of(PAGE)
            || !gpa.is_multiple_of(PAGE as u64)
            || gpa.checked_add(size as u64).is_none()
        {
            return Err(bad());
        }
        let mut slots = lock_slots(&self.slots);
        if slots.contains_key(&slot) {
            return Err(KvmError::SlotInUse(slot));
        }
        let mem = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size as u64,
            userspace_addr: host as u64,
        };
        // SAFETY: the host range lies inside `region` (checked above), which by the
        // HostRegion contract stays mapped while the Arc lives. The Arc goes into the slot
        // table (shared with every vCPU) right below, under the same lock, and leaves it
        // only after KVM has deleted the slot, so KVM never holds a dangling address.
        unsafe { self.vm.set_user_memory_region(mem) }
            .map_err(|err| KvmError::SetRegion { slot, err })?;
        self.changes.fetch_add(1, Ordering::Relaxed);
        slots.insert(slot, region);
        Ok(())
    }

    /// Deletes memslot `slot` and releases its region. Counts one memslot change. When this
    /// returns, no vCPU can reach the region through the slot any more (KVM waits for its
    /// SRCU readers), so guest accesses to those addresses exit as MMIO.
    pub fn remove_region(&self, slot: u32) -> Result<(), KvmError> {
        let mut slots = lock_slots(&self.slots);
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
        lock_slots(&self.slots).len()
    }

    /// KVM's limit on memslots (`KVM_CAP_NR_MEMSLOTS`).
    pub fn max_memslots(&self) -> usize {
        self.kvm.get_nr_memslots()
    }

    /// True if KVM reports `cap`.
    pub fn has_cap(&self, cap: Cap) -> bool {
        self.kvm.check_extension(cap)
    }

    /// Creates the in-kernel irqchip (`KVM_CREATE_IRQCHIP`: PIC, IOAPIC and the local APICs
    /// of vCPUs created afterwards, with the default GSI routing, so GSI 0..24 reach the
    /// IOAPIC pins). Must come before any vCPU is created; the kernel refuses a second one.
    /// Irqfds need it.
    pub fn create_irqchip(&self) -> Result<(), KvmError> {
        self.vm.create_irq_chip().map_err(KvmError::CreateIrqchip)
    }

    /// Registers `fd` as an ioeventfd on the MMIO address `gpa`: a guest write of any length
    /// there (no datamatch, length 0 = any, `KVM_CAP_IOEVENTFD_ANY_LENGTH`) signals `fd`
    /// inside KVM instead of exiting to us. One registration per address.
    pub fn register_ioevent_mmio(&self, fd: &EventFd, gpa: u64) -> Result<(), KvmError> {
        self.vm
            .register_ioevent(fd, &IoEventAddress::Mmio(gpa), NoDatamatch)
            .map_err(|err| KvmError::RegisterIoevent { gpa, err })
    }

    /// Removes the registration [`Vm::register_ioevent_mmio`] made for `fd` at `gpa`.
    pub fn unregister_ioevent_mmio(&self, fd: &EventFd, gpa: u64) -> Result<(), KvmError> {
        self.vm
            .unregister_ioevent(fd, &IoEventAddress::Mmio(gpa), NoDatamatch)
            .map_err(|err| KvmError::UnregisterIoevent { gpa, err })
    }

    /// Registers `fd` as an irqfd: each signal of `fd` raises an edge on `gsi` (needs
    /// [`Vm::create_irqchip`]).
    pub fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), KvmError> {
        self.vm
            .register_irqfd(fd, gsi)
            .map_err(|err| KvmError::RegisterIrqfd { gsi, err })
    }

    /// Removes the irqfd registration of `fd` on `gsi`.
    pub fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> Result<(), KvmError> {
        self.vm
            .unregister_irqfd(fd, gsi)
            .map_err(|err| KvmError::UnregisterIrqfd { gsi, err })
    }

    /// Creates vCPU `id` with the host's supported CPUID.
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu, KvmError> {
        let fd = self
            .vm
            .create_vcpu(id)
            .map_err(|err| KvmError::CreateVcpu { id, err })?;
        let cpuid: CpuId = self
            .kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::GetCpuid)?;
        fd.set_cpuid2(&cpuid).map_err(KvmError::SetCpuid)?;
        Ok(Vcpu {
            fd,
            _slots: self.slots.clone(),
        })
    }
}

/// A vCPU of a [`Vm`]. Derefs to [`VcpuFd`] for the register and run ioctls. It holds the
/// VM's slot table, so the regions behind the memslots stay mapped as long as the vCPU can
/// run, even if the [`Vm`] itself is dropped first.
pub struct Vcpu {
    // Declared first: the vCPU fd closes before the regions may be unmapped.
    fd: VcpuFd,
    _slots: SlotTable,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").finish_non_exhaustive()
    }
}

impl std::ops::Deref for Vcpu {
    type Target = VcpuFd;
    fn deref(&self) -> &VcpuFd {
        &self.fd
    }
}

impl std::ops::DerefMut for Vcpu {
    fn deref_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmap::MemoryMapping;

    fn vm() -> Option<Vm> {
        match Vm::available() {
            Ok(()) => Some(Vm::open().unwrap()),
            Err(why) => {
                println!("skipped: /dev/kvm unusable ({why})");
                None
            }
        }
    }

    #[test]
    fn slots_are_checked_and_every_change_counted() {
        let Some(vm) = vm() else { return };
        let mem: Arc<dyn HostRegion> = Arc::new(MemoryMapping::anonymous(16 * PAGE).unwrap());
        let bad = [
            (0x10_0000, 0, 0),                 // empty
            (0x10_0000, 1, PAGE),              // misaligned offset
            (0x10_0000, 0, PAGE + 1),          // misaligned size
            (0x10_0001, 0, PAGE),              // misaligned gpa
            (0x10_0000, 8 * PAGE, 9 * PAGE),   // past the end
            (0x10_0000, usize::MAX - 1, PAGE), // overflow
            (!0xfff, 0, 2 * PAGE),             // gpa overflow
        ];
        for (gpa, offset, size) in bad {
            let e = vm
                .set_region(1, gpa, mem.clone(), offset, size)
                .unwrap_err();
            assert!(matches!(e, KvmError::BadRegion { .. }), "{e}");
            assert_eq!(e.errno(), None);
        }
        assert_eq!((vm.memslot_changes(), vm.live_slots()), (0, 0));

        vm.set_region(1, 0x10_0000, mem.clone(), 4 * PAGE, 4 * PAGE)
            .unwrap();
        assert!(matches!(
            vm.set_region(1, 0x20_0000, mem.clone(), 0, PAGE),
            Err(KvmError::SlotInUse(1))
        ));
        // KVM itself refuses an overlapping slot: the error carries the errno.
        let e = vm
            .set_region(2, 0x10_1000, mem.clone(), 0, PAGE)
            .unwrap_err();
        assert!(matches!(e, KvmError::SetRegion { slot: 2, .. }), "{e}");
        assert_eq!(e.errno(), Some(libc::EEXIST));
        assert_eq!((vm.memslot_changes(), vm.live_slots()), (1, 1));
        // The slot holds the region: 2 strong refs (ours + the slot's).
        assert_eq!(Arc::strong_count(&mem), 2);

        vm.remove_region(1).unwrap();
        assert!(matches!(vm.remove_region(1), Err(KvmError::NoSuchSlot(1))));
        assert_eq!((vm.memslot_changes(), vm.live_slots()), (2, 0));
        assert_eq!(Arc::strong_count(&mem), 1, "the slot released the region");
        assert!(vm.max_memslots() >= 32);
    }

    #[test]
    fn irqchip_ioeventfds_and_irqfds() {
        let Some(vm) = vm() else { return };
        let call = EventFd::new(EFD_NONBLOCK).unwrap();
        // No irqchip yet: KVM refuses irqfds.
        let e = vm.register_irqfd(&call, 10).unwrap_err();
        assert!(matches!(e, KvmError::RegisterIrqfd { gsi: 10, .. }), "{e}");
        vm.create_irqchip().unwrap();
        let e = vm.create_irqchip().unwrap_err();
        assert!(matches!(e, KvmError::CreateIrqchip(_)), "{e}");
        vm.register_irqfd(&call, 10).unwrap();
        vm.unregister_irqfd(&call, 10).unwrap();
        vm.register_irqfd(&call, 10).unwrap();

        let kick = EventFd::new(EFD_NONBLOCK).unwrap();
        let other = EventFd::new(EFD_NONBLOCK).unwrap();
        vm.register_ioevent_mmio(&kick, 0xC000_3000).unwrap();
        let e = vm.register_ioevent_mmio(&other, 0xC000_3000).unwrap_err();
        assert!(
            matches!(
                e,
                KvmError::RegisterIoevent {
                    gpa: 0xC000_3000,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(e.errno(), Some(libc::EEXIST));
        vm.register_ioevent_mmio(&other, 0xC000_3004).unwrap();
        vm.unregister_ioevent_mmio(&kick, 0xC000_3000).unwrap();
        let e = vm.unregister_ioevent_mmio(&kick, 0xC000_3000).unwrap_err();
        assert!(matches!(e, KvmError::UnregisterIoevent { .. }), "{e}");
        // The address is free again.
        vm.register_ioevent_mmio(&kick, 0xC000_3000).unwrap();

        // After a vCPU exists, KVM refuses an irqchip.
        let vm2 = Vm::open().unwrap();
        let _vcpu = vm2.create_vcpu(0).unwrap();
        assert!(vm2.create_irqchip().is_err());
    }

    #[test]
    fn a_vcpu_keeps_the_regions_alive_after_the_vm_is_dropped() {
        let Some(vm) = vm() else { return };
        let mem: Arc<dyn HostRegion> = Arc::new(MemoryMapping::anonymous(4 * PAGE).unwrap());
        vm.set_region(0, 0, mem.clone(), 0, 4 * PAGE).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        drop(vm);
        assert_eq!(
            Arc::strong_count(&mem),
            2,
            "the vCPU still holds the slot table"
        );
        assert!(vcpu.get_regs().is_ok());
        drop(vcpu);
        assert_eq!(Arc::strong_count(&mem), 1);
    }
}
