//! The KVM guest probe: a real vCPU running tiny hand-assembled 64-bit routines in **ring 3**
//! (this machine's KVM emulates ring 0 instruction by instruction; ring 3 runs natively). The
//! host points RIP at a routine, passes arguments in registers, runs the vCPU until the
//! routine's `out` exits, and reads the result from registers. Page tables identity-map
//! guest RAM and the whole hostmem window with user-accessible 2 MiB pages.
//!
//! A guest access to guest-physical memory with no memslot behind it (a *hole*: in
//! per-blob-slot mode, the window between blobs) exits as MMIO; the probe answers reads with
//! zero, counts the hole and lets the routine continue, so a hole is reported, never fatal.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hostmem_base::kvm::kvm_ioctls::{VcpuExit, VcpuFd};
use hostmem_base::kvm::Vm;
use hostmem_base::mmap::MemoryMapping;

/// Memslot of the probe's guest RAM.
pub const RAM_SLOT: u32 = 0;
const GDT: u64 = 0x1000;
const PML4: u64 = 0x2000;
const PDPT: u64 = 0x3000;
const PD_BASE: u64 = 0x4000;
const CODE: u64 = 0x10_0000;
const STACK_TOP: u64 = 0x1f_f000;
/// Start of the guest RAM working set used by [`GuestProbe::touch_ram`].
const WORKING_SET: u64 = 0x20_0000;
const EXIT_PORT: u16 = 0x10;
const FNV_PRIME: u64 = 0x0100_0193;

/// Guest routines (x86-64 machine code; each ends with `out 0x10, al; jmp $`).
mod code {
    /// rdi = address, rsi = qwords → rax = hash (see `expected_hash`).
    pub const HASH: &[u8] = &[
        0x31, 0xC0, // xor eax, eax
        0x48, 0x85, 0xF6, // loop: test rsi, rsi
        0x74, 0x1A, // jz done
        0x48, 0x8B, 0x0F, // mov rcx, [rdi]
        0x48, 0x31, 0xC8, // xor rax, rcx
        0x48, 0xC1, 0xC0, 0x05, // rol rax, 5
        0x48, 0x69, 0xC0, 0x93, 0x01, 0x00, 0x01, // imul rax, rax, 0x01000193
        0x48, 0x83, 0xC7, 0x08, // add rdi, 8
        0x48, 0xFF, 0xCE, // dec rsi
        0xEB, 0xE1, // jmp loop
        0xE6, 0x10, 0xEB, 0xFE, // done: out 0x10, al; jmp $
    ];
    /// rdi = address → rax = [rdi].
    pub const READ: &[u8] = &[0x48, 0x8B, 0x07, 0xE6, 0x10, 0xEB, 0xFE];
    /// rdi = address, rsi = value: [rdi] = rsi.
    pub const WRITE: &[u8] = &[0x48, 0x89, 0x37, 0xE6, 0x10, 0xEB, 0xFE];
    /// rdi = address, rsi = pages (> 0): read one qword per 4 KiB page.
    pub const TOUCH: &[u8] = &[
        0x48, 0x8B, 0x0F, // loop: mov rcx, [rdi]
        0x48, 0x81, 0xC7, 0x00, 0x10, 0x00, 0x00, // add rdi, 4096
        0x48, 0xFF, 0xCE, // dec rsi
        0x75, 0xF1, // jnz loop
        0xE6, 0x10, 0xEB, 0xFE,
    ];
    /// rdi = address, rsi = iterations (> 0), r8 = initial value; counts zero reads in r9
    /// and value changes in r10; r8 ends as the last value.
    pub const SPIN: &[u8] = &[
        0x48, 0x8B, 0x07, // loop: mov rax, [rdi]
        0x48, 0x85, 0xC0, // test rax, rax
        0x75, 0x03, // jnz nz
        0x49, 0xFF, 0xC1, // inc r9
        0x4C, 0x39, 0xC0, // nz: cmp rax, r8
        0x74, 0x06, // je same
        0x49, 0xFF, 0xC2, // inc r10
        0x49, 0x89, 0xC0, // mov r8, rax
        0x48, 0xFF, 0xCE, // same: dec rsi
        0x75, 0xE5, // jnz loop
        0xE6, 0x10, 0xEB, 0xFE,
    ];
}

const ROUTINES: [&[u8]; 5] = [code::HASH, code::READ, code::WRITE, code::TOUCH, code::SPIN];

/// The hash the guest computes over qwords: `h = ((h ^ q) rotl 5) * 0x01000193`, from 0.
pub fn expected_hash(bytes: &[u8]) -> u64 {
    bytes.chunks_exact(8).fold(0u64, |h, q| {
        let q = u64::from_le_bytes(q.try_into().unwrap_or([0; 8]));
        (h ^ q).rotate_left(5).wrapping_mul(FNV_PRIME)
    })
}

/// What a guest read saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeRead {
    /// The value (or hash).
    Value(u64),
    /// The access hit guest-physical memory with no memslot behind it.
    Hole {
        /// First unbacked address hit.
        gpa: u64,
    },
}

/// Result of [`GuestProbe::spin_read`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpinStats {
    /// Reads done.
    pub reads: u64,
    /// Reads that returned zero.
    pub zero_reads: u64,
    /// Times the value read changed.
    pub changes: u64,
    /// Reads that hit unbacked memory (MMIO exits).
    pub holes: u64,
    /// The last value read.
    pub last: u64,
}

/// Probe failures.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Setting up KVM or guest memory failed.
    #[error("probe setup: {0}")]
    Setup(String),
    /// A vCPU ioctl failed.
    #[error("vCPU: {0}")]
    Vcpu(#[from] hostmem_base::kvm::kvm_ioctls::Error),
    /// The guest stopped in a way it never should (shutdown, internal error, …).
    #[error("guest stopped unexpectedly: {0}")]
    Guest(String),
    /// The offset/length lies outside the window.
    #[error("range {offset:#x}+{len:#x} outside the window")]
    Range {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// The guest probe: one vCPU, its RAM and the routines.
pub struct GuestProbe {
    vm: Arc<Vm>,
    vcpu: VcpuFd,
    _ram: Arc<MemoryMapping>,
    ram_size: u64,
    window_gpa: u64,
    window_size: u64,
    entry: [u64; 5],
}

impl std::fmt::Debug for GuestProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestProbe")
            .field("window_gpa", &self.window_gpa)
            .field("window_size", &self.window_size)
            .finish()
    }
}

fn setup<E: std::fmt::Display>(e: E) -> ProbeError {
    ProbeError::Setup(e.to_string())
}

impl GuestProbe {
    /// Creates guest RAM (`ram_size` bytes, at least 4 MiB, as memslot 0 at GPA 0), page
    /// tables covering RAM and `window_gpa..+window_size`, and a vCPU in 64-bit ring 3.
    pub fn new(
        vm: Arc<Vm>,
        window_gpa: u64,
        window_size: u64,
        ram_size: usize,
    ) -> Result<Self, ProbeError> {
        let ram_size = ram_size.max(4 << 20).next_multiple_of(2 << 20);
        if window_gpa < ram_size as u64 || !window_gpa.is_multiple_of(2 << 20) {
            return Err(setup("window must be 2 MiB aligned and above guest RAM"));
        }
        let ram = Arc::new(MemoryMapping::anonymous(ram_size).map_err(setup)?);
        let w64 = |gpa: u64, v: u64| ram.write_slice(gpa as usize, &v.to_le_bytes());
        // Page tables: PML4[0] → PDPT; PDPT[i] → PD for each GiB that holds RAM or window.
        w64(PML4, PDPT | 7).map_err(setup)?;
        let mut gibs: Vec<u64> = vec![0];
        let (first, last) = (window_gpa >> 30, (window_gpa + window_size - 1) >> 30);
        gibs.extend((first..=last).filter(|g| *g != 0));
        if last >= 512 || gibs.len() > 32 {
            return Err(setup(
                "window too large or too high for the probe's page tables",
            ));
        }
        for (i, gib) in gibs.iter().enumerate() {
            let pd = PD_BASE + 0x1000 * i as u64;
            w64(PDPT + 8 * gib, pd | 7).map_err(setup)?;
            for e in 0..512u64 {
                // Present | writable | user | 2 MiB page.
                w64(pd + 8 * e, ((gib << 30) + (e << 21)) | 0x87).map_err(setup)?;
            }
        }
        // A GDT matching the segment registers (null, unused, unused, code64 DPL3, data DPL3).
        for (i, d) in [0u64, 0, 0, 0x00af_fb00_0000_ffff, 0x00cf_f300_0000_ffff]
            .iter()
            .enumerate()
        {
            w64(GDT + 8 * i as u64, *d).map_err(setup)?;
        }
        let mut entry = [0u64; 5];
        let mut at = CODE;
        for (i, r) in ROUTINES.iter().enumerate() {
            ram.write_slice(at as usize, r).map_err(setup)?;
            entry[i] = at;
            at += 0x100;
        }
        vm.set_region(RAM_SLOT, 0, ram.clone(), 0, ram_size)
            .map_err(setup)?;
        let vcpu = vm.create_vcpu(0).map_err(setup)?;
        let mut s = vcpu.get_sregs()?;
        s.cr3 = PML4;
        s.cr4 = 0x20; // PAE
        s.cr0 = 0x8000_0001 | 0x10 | 0x20; // PG | PE | ET | NE
        s.efer = 0x500; // LME | LMA
        s.gdt.base = GDT;
        s.gdt.limit = 5 * 8 - 1;
        s.cs.base = 0;
        s.cs.limit = 0xffff_ffff;
        s.cs.selector = (3 << 3) | 3;
        s.cs.type_ = 0xb;
        s.cs.present = 1;
        s.cs.dpl = 3;
        s.cs.db = 0;
        s.cs.s = 1;
        s.cs.l = 1;
        s.cs.g = 1;
        let mut data = s.cs;
        data.selector = (4 << 3) | 3;
        data.type_ = 0x3;
        data.l = 0;
        data.db = 1;
        s.ds = data;
        s.es = data;
        s.ss = data;
        s.fs = data;
        s.gs = data;
        s.tr.present = 1;
        s.tr.type_ = 0xb;
        s.tr.limit = 0x67;
        s.tr.s = 0;
        vcpu.set_sregs(&s)?;
        let probe = GuestProbe {
            vm,
            vcpu,
            _ram: ram,
            ram_size: ram_size as u64,
            window_gpa,
            window_size,
            entry,
        };
        Ok(probe)
    }

    fn gpa(&self, offset: u64, len: u64) -> Result<u64, ProbeError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.window_size => Ok(self.window_gpa + offset),
            _ => Err(ProbeError::Range { offset, len }),
        }
    }

    /// Runs routine `idx` with the given registers until its `out`; returns the registers
    /// and the first hole hit (and how many).
    fn call(
        &mut self,
        idx: usize,
        set: impl FnOnce(&mut hostmem_base::kvm::kvm_bindings::kvm_regs),
    ) -> Result<(hostmem_base::kvm::kvm_bindings::kvm_regs, Option<u64>, u64), ProbeError> {
        let mut r = self.vcpu.get_regs()?;
        r.rip = self.entry[idx];
        r.rsp = STACK_TOP;
        r.rflags = 0x3002; // IOPL 3 so ring 3 may `out`; IF clear
        set(&mut r);
        self.vcpu.set_regs(&r)?;
        let mut first_hole = None;
        let mut holes = 0u64;
        loop {
            match self.vcpu.run()? {
                VcpuExit::IoOut(port, _) if port == EXIT_PORT => break,
                VcpuExit::MmioRead(addr, data) => {
                    data.fill(0);
                    holes += 1;
                    first_hole.get_or_insert(addr);
                }
                VcpuExit::MmioWrite(addr, _) => {
                    holes += 1;
                    first_hole.get_or_insert(addr);
                }
                other => return Err(ProbeError::Guest(format!("{other:?}"))),
            }
        }
        Ok((self.vcpu.get_regs()?, first_hole, holes))
    }

    /// The guest reads `len` bytes (a multiple of 8) at window `offset` and hashes them.
    /// It first touches one qword per page, so unbacked memory costs one exit per page, not
    /// one per qword.
    pub fn hash(&mut self, offset: u64, len: u64) -> Result<ProbeRead, ProbeError> {
        let gpa = self.gpa(offset, len)?;
        let (_, hole, _) = self.call(3, |r| {
            r.rdi = gpa;
            r.rsi = len.div_ceil(4096).max(1);
        })?;
        if let Some(gpa) = hole {
            return Ok(ProbeRead::Hole { gpa });
        }
        let (r, hole, _) = self.call(0, |r| {
            r.rdi = gpa;
            r.rsi = len / 8;
        })?;
        Ok(hole.map_or(ProbeRead::Value(r.rax), |gpa| ProbeRead::Hole { gpa }))
    }

    /// The guest reads the qword at window `offset`.
    pub fn read_u64(&mut self, offset: u64) -> Result<ProbeRead, ProbeError> {
        let gpa = self.gpa(offset, 8)?;
        let (r, hole, _) = self.call(1, |r| r.rdi = gpa)?;
        Ok(hole.map_or(ProbeRead::Value(r.rax), |gpa| ProbeRead::Hole { gpa }))
    }

    /// The guest writes `value` at window `offset`. `Ok(Some(gpa))` if it hit a hole.
    pub fn write_u64(&mut self, offset: u64, value: u64) -> Result<Option<u64>, ProbeError> {
        let gpa = self.gpa(offset, 8)?;
        let (_, hole, _) = self.call(2, |r| {
            r.rdi = gpa;
            r.rsi = value;
        })?;
        Ok(hole)
    }

    /// The guest reads one qword per page of `bytes` of its own RAM; returns how long the
    /// vCPU took (the bench's refault measure: after a memslot change KVM zaps and the
    /// guest refaults its working set).
    pub fn touch_ram(&mut self, bytes: u64) -> Result<Duration, ProbeError> {
        let pages = (bytes / 4096).clamp(1, (self.ram_size - WORKING_SET) / 4096);
        let t = Instant::now();
        self.call(3, |r| {
            r.rdi = WORKING_SET;
            r.rsi = pages;
        })?;
        Ok(t.elapsed())
    }

    /// Bytes of guest RAM available to [`GuestProbe::touch_ram`].
    pub fn working_set_capacity(&self) -> u64 {
        self.ram_size - WORKING_SET
    }

    /// The vCPU reads the qword at `offset` `iterations` times in a tight loop (while the
    /// host may remap it from another thread) and reports what it saw.
    pub fn spin_read(&mut self, offset: u64, iterations: u64) -> Result<SpinStats, ProbeError> {
        let gpa = self.gpa(offset, 8)?;
        let iterations = iterations.max(1);
        let (r, _, holes) = self.call(4, |r| {
            r.rdi = gpa;
            r.rsi = iterations;
            r.r8 = 0;
            r.r9 = 0;
            r.r10 = 0;
        })?;
        Ok(SpinStats {
            reads: iterations,
            zero_reads: r.r9,
            changes: r.r10,
            holes,
            last: r.r8,
        })
    }

    /// The VM the probe runs in.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }
}
