//! Issue 22 item 4: what the guest or the device can repeat at will is logged the 1st,
//! 2nd, 4th, … time of each kind and counted exactly: 3,000 bad BAR0 writes, 3,000 refused
//! placements and placements refused at the live limit give O(log n) WARN lines and the
//! exact counts that `hostmem run --json` reports under `"warnings"`.

use std::collections::HashSet;
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use hostmem_base::kvm::{EventFd, KvmError};
use hostmem_base::shm::SharedMemory;
use hostmem_ipc::protocol::GuestRegion;
use hostmem_vmm::hostmem::{Hostmem, Limits, MapEvent, Mode, DEFAULT_WINDOW_GPA};
use hostmem_vmm::virtio_pci::{EventBinder, PciLayout, VirtioPciGpu};

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static SERIAL: Mutex<()> = Mutex::new(());

struct Capture;
impl log::Log for Capture {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) {
            LINES.lock().unwrap().push(format!("{}", r.args()));
        }
    }
    fn flush(&self) {}
}

/// Serialises the tests and clears the captured lines.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static CAPTURE: Capture = Capture;
    let _ = log::set_logger(&CAPTURE);
    log::set_max_level(log::LevelFilter::Warn);
    let g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    LINES.lock().unwrap().clear();
    g
}

fn lines_with(what: &str) -> usize {
    LINES
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(what))
        .count()
}

#[derive(Debug, Default)]
struct FakeBinder {
    kicks: Mutex<HashSet<u64>>,
}

impl EventBinder for FakeBinder {
    fn bind_kick(&self, _fd: &EventFd, gpa: u64) -> Result<(), KvmError> {
        self.kicks.lock().unwrap().insert(gpa);
        Ok(())
    }
    fn unbind_kick(&self, _fd: &EventFd, gpa: u64) -> Result<(), KvmError> {
        self.kicks.lock().unwrap().remove(&gpa);
        Ok(())
    }
    fn bind_call(&self, _fd: &EventFd, _gsi: u32) -> Result<(), KvmError> {
        Ok(())
    }
    fn unbind_call(&self, _fd: &EventFd, _gsi: u32) -> Result<(), KvmError> {
        Ok(())
    }
}

/// ⌊log2 n⌋ + 1: the lines a flood of n of one kind may give.
fn log_lines(n: u64) -> usize {
    (64 - n.leading_zeros()) as usize
}

#[test]
fn bad_bar0_writes_give_log_n_lines_and_exact_counts() {
    let _s = serial();
    let ram = SharedMemory::new("floods-ram", 1 << 20).unwrap();
    ram.seal_for_sharing().unwrap();
    let region = GuestRegion {
        gpa: 0,
        size: 1 << 20,
        fd_offset: 0,
    };
    let layout = PciLayout::new(DEFAULT_WINDOW_GPA, 1 << 20);
    let mut gpu = VirtioPciGpu::with_binder(
        Arc::new(FakeBinder::default()),
        layout,
        vec![(region, ram.try_clone_fd().unwrap())],
    )
    .unwrap();
    // Memory decoding on (PCI command register, bus 0 device 1).
    let command_reg: u32 = 0x8000_0000 | (1 << 11) | 4;
    assert!(gpu.pio_write(0xcf8, &command_reg.to_le_bytes()));
    assert!(gpu.pio_write(0xcfc, &2u16.to_le_bytes()));
    // Writes to read-only common-cfg fields (num_queues at 0x12) and queue sizes that are
    // no power of two (queue_size at 0x18), 1,500 of each.
    for i in 0..1500u16 {
        assert!(gpu.mmio_write(layout.bar0_gpa + 0x12, &i.to_le_bytes()));
        assert!(gpu.mmio_write(layout.bar0_gpa + 0x18, &3u16.to_le_bytes()));
    }
    let w = gpu.warnings();
    assert_eq!(w.get("write to a read-only field"), Some(&1500), "{w:?}");
    assert_eq!(w.get("bad queue_size"), Some(&1500), "{w:?}");
    let (ro, qs) = (lines_with("read-only"), lines_with("queue_size 3"));
    assert_eq!(ro, log_lines(1500), "read-only lines");
    assert_eq!(qs, log_lines(1500), "queue_size lines");
    assert!(
        lines_with("1024 so far") == 2,
        "the line says the count: {:?}",
        LINES.lock().unwrap()
    );
}

fn ev(resource_id: u32, offset: u64) -> MapEvent {
    MapEvent {
        resource_id,
        offset,
        len: 4096,
        fd_offset: 0,
        prot: (libc::PROT_READ | libc::PROT_WRITE) as u32,
    }
}

#[test]
fn refused_events_give_log_n_lines_and_exact_counts() {
    let _s = serial();
    let hm = Hostmem::new(
        1 << 20,
        None,
        DEFAULT_WINDOW_GPA,
        Mode::Fixed,
        Limits {
            max_live: 1,
            ..Limits::default()
        },
    )
    .unwrap();
    let blob = SharedMemory::new("floods-blob", 4096).unwrap();
    blob.seal_size().unwrap();
    // 3,000 misaligned placements, then one good one and 1,000 refused at the live limit,
    // then 2,000 unmaps of nothing.
    for i in 0..3000 {
        let mut e = ev(i + 10, 0);
        e.offset = 100;
        hm.handle_map(&e, Some(blob.try_clone_fd().unwrap()));
    }
    assert_eq!(
        hm.handle_map(&ev(1, 0), Some(blob.try_clone_fd().unwrap())),
        hostmem_ipc::protocol::Outcome::Ok
    );
    for i in 0..1000 {
        hm.handle_map(
            &ev(5000 + i, 8192 + u64::from(i) * 4096 % (512 << 10)),
            Some(blob.as_fd().try_clone_to_owned().unwrap()),
        );
    }
    for i in 0..2000u64 {
        hm.handle_unmap(9, 4096 * (i % 100 + 1), 4096);
    }
    let w = hm.warnings();
    assert_eq!(
        w.get("map refused: invalid parameter"),
        Some(&3000),
        "{w:?}"
    );
    assert_eq!(w.get("map refused: out of memory"), Some(&1000), "{w:?}");
    assert_eq!(
        w.get("unmap refused: invalid parameter"),
        Some(&2000),
        "{w:?}"
    );
    assert_eq!(hm.counters().refused, 6000);
    assert_eq!(lines_with("not page-aligned"), log_lines(3000));
    assert_eq!(lines_with("live placements is the limit"), log_lines(1000));
    assert_eq!(lines_with("refused unmap"), log_lines(2000));
}
