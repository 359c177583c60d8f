//! The KVM guest probe: a real vCPU running a tiny hand-assembled 64-bit guest in **ring 3**
//! (this machine's KVM emulates ring 0 instruction by instruction; ring 3 runs natively:
//! CS has RPL/DPL 3, RFLAGS.IOPL is 3 so ring 3 may use port I/O, and every page-table entry
//! has the U/S bit).
//!
//! # How the host talks to the guest
//!
//! Guest RAM (memslot [`RAM_SLOT`] at GPA 0) holds the GDT, identity-mapping page tables
//! (2 MiB pages covering RAM and the whole hostmem window), a mailbox, the guest program
//! and a working-set area. The guest sits in a loop: it reads a request (op, address,
//! count, value) from the mailbox, executes it, writes the results back into the mailbox
//! and executes `out 0x10, al`. That port-I/O exit hands control to the host, which reads
//! the results, writes the next request and resumes the vCPU: one `KVM_RUN` per request,
//! no register ioctls.
//!
//! # Holes
//!
//! A guest access to guest-physical memory with no memslot behind it (a *hole*: in
//! per-blob-slot mode, the window between blobs or after an unmap) exits as MMIO. The probe
//! never treats that as fatal. For [`GuestProbe::spin_read`] it answers the read with 0,
//! counts it and lets the loop continue (up to [`SPIN_MAX_HOLES`]). Every other request stops at the first hole: the
//! host completes the pending access (a `KVM_RUN` with `immediate_exit`), points the vCPU
//! back at the request loop and returns [`ProbeRead::Hole`] / [`ProbeWrite::Hole`] with the
//! address. A vCPU that stops in any other way (shutdown, internal error, failed entry) is a
//! [`ProbeError::Guest`] with the exit reason; the probe then resets the vCPU's registers so
//! the next request can still run.
//!
//! # The hash
//!
//! [`GuestProbe::hash`] and [`expected_hash`] compute, over the little-endian qwords `q` of
//! the range, starting from `h = 0`: `h = ((h ^ q) rotl 5) * 0x0100_0193` (wrapping; the
//! multiplier is the odd 32-bit FNV prime). Trailing bytes that do not fill a qword are
//! ignored by both.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hostmem_base::kvm::kvm_bindings::{kvm_regs, kvm_sregs};
use hostmem_base::kvm::kvm_ioctls::VcpuExit;
use hostmem_base::kvm::{Vcpu, Vm};
use hostmem_base::mmap::MemoryMapping;

mod program;

use program::{mailbox, Op, DISPATCH, PROGRAM};

/// Memslot of the probe's guest RAM.
pub const RAM_SLOT: u32 = 0;
/// Holes after which [`GuestProbe::spin_read`] stops early (each hole is an exit).
pub const SPIN_MAX_HOLES: u64 = 1024;

// Guest-physical layout of guest RAM.
const GDT: u64 = 0x1000;
const PML4: u64 = 0x2000;
const PDPT: u64 = 0x3000;
/// Page directories, one per GiB that holds RAM or window (at most `MAX_PDS`).
const PD_BASE: u64 = 0x4000;
const MAX_PDS: usize = 32;
const MAILBOX: u64 = 0x8_0000;
const CODE: u64 = 0x10_0000;
const STACK_TOP: u64 = 0x1f_f000;
/// Start of the guest RAM working set used by [`GuestProbe::touch_ram`].
const WORKING_SET: u64 = 0x20_0000;
const MIN_RAM: usize = 4 << 20;
const EXIT_PORT: u16 = 0x10;
const FNV_PRIME: u64 = 0x0100_0193;

/// The hash the guest computes over qwords: `h = ((h ^ q) rotl 5) * 0x0100_0193`, from 0
/// (see the module docs). Trailing bytes that do not fill a qword are ignored.
pub fn expected_hash(bytes: &[u8]) -> u64 {
    bytes.chunks_exact(8).fold(0u64, |h, q| {
        let q = u64::from_le_bytes(q.try_into().unwrap_or([0; 8]));
        (h ^ q).rotate_left(5).wrapping_mul(FNV_PRIME)
    })
}

/// The bytes [`GuestProbe::fill`] writes: `len / 8` little-endian qwords, qword `i` being
/// `value + i` (wrapping).
pub fn fill_pattern(len: u64, value: u64) -> Vec<u8> {
    (0..len / 8)
        .flat_map(|i| value.wrapping_add(i).to_le_bytes())
        .collect()
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

/// What a guest write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeWrite {
    /// Every byte was written to memory.
    Written,
    /// The write hit guest-physical memory with no memslot behind it (and stopped there).
    Hole {
        /// First unbacked address hit.
        gpa: u64,
    },
}

/// Result of [`GuestProbe::spin_read`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpinStats {
    /// Reads done: the iterations asked for, or fewer if the spin stopped early after
    /// [`SPIN_MAX_HOLES`] holes.
    pub reads: u64,
    /// Reads that returned zero (holes read as zero and count here too).
    pub zero_reads: u64,
    /// Times the value read differed from the one before (the first read compares with 0).
    pub changes: u64,
    /// Reads that hit unbacked memory (MMIO exits).
    pub holes: u64,
    /// The last value read.
    pub last: u64,
    /// How long the vCPU spent on the request.
    pub elapsed: Duration,
}

/// Probe failures.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// Setting up KVM or guest memory failed.
    #[error("probe setup: {0}")]
    Setup(String),
    /// A vCPU ioctl failed.
    #[error("vCPU ioctl: {0}")]
    Vcpu(#[from] hostmem_base::kvm::kvm_ioctls::Error),
    /// The guest stopped in a way it never should (shutdown, internal error, failed entry,
    /// unexpected exit); carries the exit reason.
    #[error("guest stopped unexpectedly: {0}")]
    Guest(String),
    /// The guest program did not answer as it should (mailbox protocol broken).
    #[error("guest protocol: {0}")]
    Protocol(String),
    /// The offset/length lies outside the window.
    #[error("range {offset:#x}+{len:#x} outside the window")]
    Range {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
}

/// How a request treats MMIO exits (holes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnHole {
    /// Stop the request at the first hole.
    Stop,
    /// Read zero, count it, carry on; after `max` holes, stop and report the partial
    /// results the guest holds in its registers.
    Continue { max: u64 },
}

/// What one request did.
struct Outcome {
    res: [u64; 3],
    first_hole: Option<u64>,
    holes: u64,
    /// Iterations the guest had not done when the request was cut short (`rsi`).
    remaining: u64,
}

/// The guest probe: one vCPU, its RAM and the guest program. `Send`: it may be moved to a
/// thread that runs requests while another thread changes memslots or window mappings.
pub struct GuestProbe {
    vm: Arc<Vm>,
    vcpu: Vcpu,
    ram: Arc<MemoryMapping>,
    ram_size: u64,
    window_gpa: u64,
    window_size: u64,
    sregs: kvm_sregs,
    requests: u64,
}

impl std::fmt::Debug for GuestProbe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestProbe")
            .field("ram_size", &self.ram_size)
            .field("window_gpa", &self.window_gpa)
            .field("window_size", &self.window_size)
            .field("requests", &self.requests)
            .finish()
    }
}

fn setup<E: std::fmt::Display>(e: E) -> ProbeError {
    ProbeError::Setup(e.to_string())
}

/// Writes the identity-mapping page tables and the GDT into `ram`: GiB 0 (RAM) and every
/// GiB that holds part of one of `ranges` (`start..end`, guest-physical).
pub(crate) fn write_tables(ram: &MemoryMapping, ranges: &[(u64, u64)]) -> Result<(), ProbeError> {
    let w64 = |gpa: u64, v: u64| {
        ram.write_slice(gpa as usize, &v.to_le_bytes())
            .map_err(setup)
    };
    // PML4[0] → PDPT (covers the low 512 GiB); PDPT[g] → a PD for each GiB g that holds
    // RAM (GiB 0) or part of the window.
    const P_RW_US: u64 = 0x7; // present | writable | user
    const PAGE_2M: u64 = 0x80;
    w64(PML4, PDPT | P_RW_US)?;
    let mut gibs: Vec<u64> = vec![0];
    for &(start, end) in ranges {
        if end <= start || (end - 1) >> 30 >= 512 {
            return Err(setup(format!(
                "range {start:#x}..{end:#x} is empty or above 512 GiB (the page tables' reach)"
            )));
        }
        gibs.extend((start >> 30)..=((end - 1) >> 30));
    }
    gibs.sort_unstable();
    gibs.dedup();
    if gibs.len() > MAX_PDS {
        return Err(setup(format!(
            "{} GiB to map: the page tables hold at most {MAX_PDS}",
            gibs.len()
        )));
    }
    for (i, gib) in gibs.iter().enumerate() {
        let pd = PD_BASE + 0x1000 * i as u64;
        w64(PDPT + 8 * gib, pd | P_RW_US)?;
        for e in 0..512u64 {
            w64(pd + 8 * e, ((gib << 30) + (e << 21)) | PAGE_2M | P_RW_US)?;
        }
    }
    // GDT: null, unused, unused, 64-bit code DPL 3 (selector 0x1b), data DPL 3 (0x23).
    for (i, d) in [0u64, 0, 0, 0x00af_fb00_0000_ffff, 0x00cf_f300_0000_ffff]
        .iter()
        .enumerate()
    {
        w64(GDT + 8 * i as u64, *d)?;
    }
    Ok(())
}

/// Long mode with paging, ring-3 code and data segments matching the GDT.
pub(crate) fn long_mode_sregs(mut s: kvm_sregs) -> kvm_sregs {
    s.cr3 = PML4;
    s.cr4 = 0x20; // PAE
    s.cr0 = 0x8000_0000 | 0x20 | 0x10 | 0x1; // PG | NE | ET | PE
    s.efer = 0x500; // LME | LMA
    s.gdt.base = GDT;
    s.gdt.limit = 5 * 8 - 1;
    s.cs.base = 0;
    s.cs.limit = 0xffff_ffff;
    s.cs.selector = (3 << 3) | 3;
    s.cs.type_ = 0xb; // execute/read, accessed
    s.cs.present = 1;
    s.cs.dpl = 3;
    s.cs.db = 0;
    s.cs.s = 1;
    s.cs.l = 1;
    s.cs.g = 1;
    let mut data = s.cs;
    data.selector = (4 << 3) | 3;
    data.type_ = 0x3; // read/write, accessed
    data.l = 0;
    data.db = 1;
    s.ds = data;
    s.es = data;
    s.ss = data;
    s.fs = data;
    s.gs = data;
    s.tr.present = 1;
    s.tr.type_ = 0xb; // busy 64-bit TSS
    s.tr.limit = 0x67;
    s.tr.s = 0;
    s
}

impl GuestProbe {
    /// Creates guest RAM (`ram_size` bytes rounded up to 2 MiB, at least 4 MiB, as memslot
    /// [`RAM_SLOT`] at GPA 0), page tables covering RAM and `window_gpa..+window_size`, and a
    /// vCPU in 64-bit ring 3 waiting for requests. The window must be 2 MiB-aligned, above
    /// RAM and below 512 GiB; the probe does not register it (the caller does, as one slot or
    /// one slot per blob).
    pub fn new(
        vm: Arc<Vm>,
        window_gpa: u64,
        window_size: u64,
        ram_size: usize,
    ) -> Result<Self, ProbeError> {
        let ram_size = ram_size.max(MIN_RAM).next_multiple_of(2 << 20);
        let window_end = window_gpa
            .checked_add(window_size)
            .filter(|_| window_size > 0)
            .ok_or_else(|| setup("empty or overflowing window"))?;
        if window_gpa < ram_size as u64 || !window_gpa.is_multiple_of(2 << 20) {
            return Err(setup("window must be 2 MiB aligned and above guest RAM"));
        }
        let ram = Arc::new(MemoryMapping::anonymous(ram_size).map_err(setup)?);
        write_tables(&ram, &[(window_gpa, window_end)])?;
        ram.write_slice(CODE as usize, PROGRAM).map_err(setup)?;
        vm.set_region(RAM_SLOT, 0, ram.clone(), 0, ram_size)
            .map_err(setup)?;
        let vcpu = vm.create_vcpu(0).map_err(setup)?;
        let sregs = long_mode_sregs(vcpu.get_sregs()?);
        vcpu.set_sregs(&sregs)?;
        let mut probe = GuestProbe {
            vm,
            vcpu,
            ram,
            ram_size: ram_size as u64,
            window_gpa,
            window_size,
            sregs,
            requests: 0,
        };
        probe.park()?;
        // One round trip proves the guest runs before anyone relies on it.
        probe.ping()?;
        Ok(probe)
    }

    /// Points the vCPU at the request loop with a clean register file.
    fn park(&mut self) -> Result<(), ProbeError> {
        let regs = kvm_regs {
            rip: DISPATCH,
            rbx: MAILBOX,
            rsp: STACK_TOP,
            rflags: 0x3002, // IOPL 3 so ring 3 may `out`; IF clear; bit 1 reserved
            ..Default::default()
        };
        self.vcpu.set_regs(&regs)?;
        Ok(())
    }

    /// Completes whatever exit is pending (a `KVM_RUN` with `immediate_exit` finishes the
    /// interrupted instruction and returns at once; KVM requires that before registers
    /// change).
    fn complete_pending(&mut self) -> Result<(), ProbeError> {
        self.vcpu.set_kvm_immediate_exit(1);
        let r = self.vcpu.run().map(drop);
        self.vcpu.set_kvm_immediate_exit(0);
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ok(()),
            Err(e) => Err(ProbeError::Vcpu(e)),
        }
    }

    /// Completes whatever exit is pending and parks the vCPU at the request loop.
    fn abandon_request(&mut self) -> Result<(), ProbeError> {
        self.complete_pending()?;
        self.park()
    }

    /// After a failure: restore the segment/control registers too, then park.
    fn recover(&mut self) {
        let sregs = self.sregs;
        let r = self
            .vcpu
            .set_sregs(&sregs)
            .map_err(ProbeError::Vcpu)
            .and_then(|()| self.abandon_request());
        if let Err(e) = r {
            log::warn!("guest probe: resetting the vCPU failed: {e}");
        }
    }

    fn gpa(&self, offset: u64, len: u64) -> Result<u64, ProbeError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.window_size => Ok(self.window_gpa + offset),
            _ => Err(ProbeError::Range { offset, len }),
        }
    }

    /// Runs one request through the mailbox.
    fn request(
        &mut self,
        op: Op,
        addr: u64,
        count: u64,
        value: u64,
        on_hole: OnHole,
    ) -> Result<Outcome, ProbeError> {
        let mut mb = [0u8; mailbox::LEN];
        for (at, v) in [
            (mailbox::OP, op as u64),
            (mailbox::ADDR, addr),
            (mailbox::COUNT, count),
            (mailbox::VALUE, value),
        ] {
            mb[at..at + 8].copy_from_slice(&v.to_le_bytes());
        }
        self.ram.write_slice(MAILBOX as usize, &mb).map_err(setup)?;
        self.requests += 1;
        let mut first_hole = None;
        let mut holes = 0u64;
        enum Ev {
            Done,
            Hole(u64),
            Again,
            Stopped(String),
        }
        loop {
            let ev = match self.vcpu.run() {
                Ok(VcpuExit::IoOut(EXIT_PORT, _)) => Ev::Done,
                Ok(VcpuExit::MmioRead(gpa, data)) => {
                    data.fill(0);
                    Ev::Hole(gpa)
                }
                Ok(VcpuExit::MmioWrite(gpa, _)) => Ev::Hole(gpa),
                Ok(VcpuExit::Intr) => Ev::Again,
                Ok(other) => Ev::Stopped(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Ev::Again,
                Err(e) => {
                    self.recover();
                    return Err(ProbeError::Vcpu(e));
                }
            };
            match ev {
                Ev::Done => break,
                Ev::Again => {}
                Ev::Hole(gpa) => match on_hole {
                    OnHole::Stop => {
                        self.abandon_request()?;
                        return Ok(Outcome {
                            res: [0; 3],
                            first_hole: Some(gpa),
                            holes: 1,
                            remaining: 0,
                        });
                    }
                    OnHole::Continue { max } if holes >= max => {
                        // Cut the loop short; this access (not counted) completes as a
                        // zero read before the loop's counters see it.
                        self.complete_pending()?;
                        let r = self.vcpu.get_regs()?;
                        self.park()?;
                        return Ok(Outcome {
                            res: [r.r8, r.r9, r.r10],
                            first_hole,
                            holes,
                            remaining: r.rsi,
                        });
                    }
                    OnHole::Continue { .. } => {
                        holes += 1;
                        first_hole.get_or_insert(gpa);
                    }
                },
                Ev::Stopped(why) => {
                    self.recover();
                    return Err(ProbeError::Guest(why));
                }
            }
        }
        let mut out = [0u8; mailbox::LEN];
        self.ram
            .read_slice(MAILBOX as usize, &mut out)
            .map_err(setup)?;
        let q = |at: usize| u64::from_le_bytes(out[at..at + 8].try_into().unwrap_or([0; 8]));
        Ok(Outcome {
            res: [q(mailbox::RES0), q(mailbox::RES1), q(mailbox::RES2)],
            first_hole,
            holes,
            remaining: 0,
        })
    }

    /// One empty request (the guest answers `u64::MAX`); returns the round-trip time.
    pub fn ping(&mut self) -> Result<Duration, ProbeError> {
        let t = Instant::now();
        let out = self.request(Op::Ping, 0, 0, 0, OnHole::Stop)?;
        let took = t.elapsed();
        if out.res[0] != u64::MAX {
            return Err(ProbeError::Protocol(format!(
                "ping answered {:#x}, not u64::MAX",
                out.res[0]
            )));
        }
        Ok(took)
    }

    /// The guest reads `len` bytes at window `offset` qword by qword and hashes them (see
    /// [`expected_hash`]; a trailing partial qword is ignored). Stops at the first hole.
    pub fn hash(&mut self, offset: u64, len: u64) -> Result<ProbeRead, ProbeError> {
        let gpa = self.gpa(offset, len)?;
        let out = self.request(Op::Hash, gpa, len / 8, 0, OnHole::Stop)?;
        Ok(read_result(&out))
    }

    /// The guest reads the qword at window `offset`.
    pub fn read_u64(&mut self, offset: u64) -> Result<ProbeRead, ProbeError> {
        let gpa = self.gpa(offset, 8)?;
        let out = self.request(Op::Read, gpa, 1, 0, OnHole::Stop)?;
        Ok(read_result(&out))
    }

    /// The guest writes `value` at window `offset`.
    pub fn write_u64(&mut self, offset: u64, value: u64) -> Result<ProbeWrite, ProbeError> {
        let gpa = self.gpa(offset, 8)?;
        let out = self.request(Op::Write, gpa, 1, value, OnHole::Stop)?;
        Ok(write_result(&out))
    }

    /// The guest writes `len / 8` qwords at window `offset`, qword `i` being `value + i`
    /// (see [`fill_pattern`]). Stops at the first hole.
    pub fn fill(&mut self, offset: u64, len: u64, value: u64) -> Result<ProbeWrite, ProbeError> {
        let gpa = self.gpa(offset, len)?;
        let out = self.request(Op::Fill, gpa, len / 8, value, OnHole::Stop)?;
        Ok(write_result(&out))
    }

    /// The guest reads one qword per 4 KiB page of the first `bytes` of its working set (its
    /// own RAM above the program; clamped to [`GuestProbe::working_set_capacity`], at least
    /// one page) and returns how long the request took, round trip included. This is the
    /// bench's refault measure: after a memslot change KVM zaps far more than the slot and
    /// the guest refaults its working set.
    pub fn touch_ram(&mut self, bytes: u64) -> Result<Duration, ProbeError> {
        let pages = (bytes / 4096).clamp(1, self.working_set_capacity() / 4096);
        let t = Instant::now();
        let out = self.request(Op::Touch, WORKING_SET, pages, 0, OnHole::Stop)?;
        let took = t.elapsed();
        if let Some(gpa) = out.first_hole {
            return Err(ProbeError::Protocol(format!(
                "guest RAM at {gpa:#x} is not backed"
            )));
        }
        Ok(took)
    }

    /// Bytes of guest RAM available to [`GuestProbe::touch_ram`].
    pub fn working_set_capacity(&self) -> u64 {
        self.ram_size - WORKING_SET
    }

    /// The vCPU reads the qword at window `offset` `iterations` times (at least once) in a
    /// tight loop, while the host may remap it from another thread, and reports what it
    /// saw. Holes read as zero and are counted; the loop carries on through them, but each
    /// one is a full exit to the host (tens of µs here), so after [`SPIN_MAX_HOLES`] holes
    /// the request ends early and [`SpinStats::reads`] says how many reads were done.
    pub fn spin_read(&mut self, offset: u64, iterations: u64) -> Result<SpinStats, ProbeError> {
        let gpa = self.gpa(offset, 8)?;
        let iterations = iterations.max(1);
        let t = Instant::now();
        let on_hole = OnHole::Continue {
            max: SPIN_MAX_HOLES,
        };
        let out = self.request(Op::Spin, gpa, iterations, 0, on_hole)?;
        Ok(SpinStats {
            reads: iterations - out.remaining.min(iterations),
            zero_reads: out.res[1],
            changes: out.res[2],
            holes: out.holes,
            last: out.res[0],
            elapsed: t.elapsed(),
        })
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Guest RAM size in bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// The VM the probe runs in.
    pub fn vm(&self) -> &Arc<Vm> {
        &self.vm
    }
}

fn read_result(out: &Outcome) -> ProbeRead {
    out.first_hole
        .map_or(ProbeRead::Value(out.res[0]), |gpa| ProbeRead::Hole { gpa })
}

fn write_result(out: &Outcome) -> ProbeWrite {
    out.first_hole
        .map_or(ProbeWrite::Written, |gpa| ProbeWrite::Hole { gpa })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_pattern_and_hash_agree_on_layout() {
        let p = fill_pattern(24, u64::MAX);
        assert_eq!(p.len(), 24);
        assert_eq!(&p[..8], &u64::MAX.to_le_bytes());
        assert_eq!(&p[8..16], &0u64.to_le_bytes());
        assert_eq!(&p[16..], &1u64.to_le_bytes());
        // Trailing bytes are ignored; order matters.
        assert_eq!(
            expected_hash(&p),
            expected_hash(&[&p[..], &[1, 2, 3]].concat())
        );
        assert_ne!(expected_hash(&p), expected_hash(&fill_pattern(24, 0)));
        assert_eq!(expected_hash(&[]), 0);
        let one = 7u64.rotate_left(5).wrapping_mul(0x0100_0193);
        assert_eq!(expected_hash(&7u64.to_le_bytes()), one);
    }

    /// A guest fault (a non-canonical address: #GP with no IDT, so a triple fault) is an
    /// error carrying the exit reason, and the probe resets the vCPU so it keeps working.
    #[test]
    fn guest_failure_is_an_error_and_the_probe_recovers() {
        if let Err(why) = Vm::available() {
            println!("skipped: /dev/kvm unusable ({why})");
            return;
        }
        let vm = Arc::new(Vm::open().unwrap());
        let mut probe = GuestProbe::new(vm, 1 << 32, 2 << 20, 4 << 20).unwrap();
        let r = probe.request(Op::Read, 1 << 63, 1, 0, OnHole::Stop);
        match r {
            Err(ProbeError::Guest(why)) => println!("guest stopped as expected: {why}"),
            other => panic!("expected a guest failure, got {:?}", other.map(|o| o.res)),
        }
        probe.ping().unwrap();
        assert_eq!(probe.read_u64(0).unwrap(), ProbeRead::Hole { gpa: 1 << 32 });
        assert!(probe.touch_ram(4096).is_ok());
        assert!(matches!(
            probe.read_u64(2 << 20),
            Err(ProbeError::Range { .. })
        ));
    }
}
