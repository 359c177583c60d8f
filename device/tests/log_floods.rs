//! Issue 22 item 4, the device's side: 3,500 bad commands give O(log n) WARN lines per
//! kind and exact counts, which the device sends the VMM with its virtqueue stats.

use std::sync::Mutex;

use hostmem_device::backend::shm::ShmBackend;
use hostmem_device::gpu::{Gpu, MapRequest, PlaceError, Placer, COMMAND_WARNINGS};
use hostmem_device::virtio::VirtioGpu;
use hostmem_device::wire::Command;

static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

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

struct NoPlacer;
impl Placer for NoPlacer {
    fn map(&mut self, _req: &MapRequest<'_>) -> Result<(), PlaceError> {
        Err(PlaceError::Unspec("no window".into()))
    }
    fn unmap(&mut self, _r: u32, _o: u64, _l: u64) -> Result<(), PlaceError> {
        Err(PlaceError::Unspec("no window".into()))
    }
    fn window_size(&self) -> u64 {
        1 << 20
    }
}

#[test]
fn a_flood_of_bad_commands_gives_log_n_lines_and_the_exact_count() {
    static CAPTURE: Capture = Capture;
    log::set_logger(&CAPTURE).unwrap();
    log::set_max_level(log::LevelFilter::Warn);
    let backend: Box<dyn hostmem_device::backend::Backend> = Box::new(ShmBackend::new());
    let mut gpu = Gpu::new(backend, NoPlacer);
    // 2,000 UNREFs of resources that do not exist, 1,000 MAP_BLOBs of them, 500 requests
    // too short to be a header.
    for i in 0..2000 {
        gpu.handle(&Command::unref(100 + i).encode());
    }
    for i in 0..1000 {
        gpu.handle(&Command::map_blob(1, 100 + i, 0).encode());
    }
    for _ in 0..500 {
        gpu.handle(&[1, 2, 3]);
    }
    let counts = COMMAND_WARNINGS.counts();
    assert_eq!(counts.get("RESOURCE_UNREF"), Some(&2000), "{counts:?}");
    assert_eq!(counts.get("RESOURCE_MAP_BLOB"), Some(&1000), "{counts:?}");
    assert_eq!(counts.get("unparsable command"), Some(&500), "{counts:?}");
    let lines = LINES.lock().unwrap().clone();
    let with = |w: &str| lines.iter().filter(|l| l.contains(w)).count();
    // ⌊log2 n⌋ + 1 lines per kind: 11, 10, 9.
    assert_eq!(with("RESOURCE_UNREF"), 11, "{lines:#?}");
    assert_eq!(with("RESOURCE_MAP_BLOB"), 10, "{lines:#?}");
    assert_eq!(with("control command refused"), 9, "{lines:#?}");
    assert_eq!(lines.len(), 30);
    // The counts travel with the virtqueue stats.
    let dev = VirtioGpu::new(gpu);
    let stats = dev.stats();
    assert_eq!(stats.warnings.get("RESOURCE_UNREF"), Some(&2000));
    assert_eq!(stats.warnings.values().sum::<u64>(), 3500);
}
