//! Helpers shared by this crate's cross-process suites (each uses a subset).
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use hostmem_base::kvm::Vm;
use hostmem_vmm::device::{Device, DeviceConfig};
use hostmem_vmm::hostmem::{Hostmem, Limits, Mode, DEFAULT_WINDOW_GPA};
use hostmem_vmm::queue_driver::QueueDriver;

static SERIAL: Mutex<()> = Mutex::new(());

/// The suites compare the VMM's process-wide fd and VMA counts (and one lowers
/// RLIMIT_NOFILE), so their tests run one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether user namespaces work here (else the device runs unjailed, and we say so).
pub fn jail_works() -> bool {
    let ok = std::fs::read_to_string("/proc/sys/user/max_user_namespaces")
        .map(|s| s.trim() != "0")
        .unwrap_or(false);
    if !ok {
        println!("skipped: user namespaces unavailable, the device runs unjailed in this test");
    }
    ok
}

/// Whether `/dev/kvm` works here (else we say what is skipped).
pub fn kvm() -> bool {
    match Vm::available() {
        Ok(()) => true,
        Err(why) => {
            println!("skipped: /dev/kvm unusable ({why})");
            false
        }
    }
}

/// `hostmem run`'s device config for `backend`, with this test's `hostmem` binary in its
/// device mode: jailed under `gpu_device_{backend}.policy` where namespaces work.
pub fn device_config_for(backend: hostmem_vmm::run::BackendKind) -> DeviceConfig {
    let mut cfg = hostmem_vmm::run::device_config(
        PathBuf::from(env!("CARGO_BIN_EXE_hostmem")),
        vec!["device".into()],
        backend,
        None,
    );
    cfg.log_filter = Some(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()));
    if !jail_works() {
        cfg.jailed = false;
        cfg.policy = None;
    }
    cfg
}

/// The shm device config ([`device_config_for`]).
pub fn device_config() -> DeviceConfig {
    device_config_for(hostmem_vmm::run::BackendKind::Shm)
}

/// A window of `size` bytes without KVM, in fixed mode, for command-level checks.
pub fn hostmem(size: u64) -> Arc<Hostmem> {
    Arc::new(
        Hostmem::new(
            size,
            None,
            DEFAULT_WINDOW_GPA,
            Mode::Fixed,
            Limits::default(),
        )
        .expect("hostmem window"),
    )
}

/// Starts the device of `cfg` on `hm` and a host-side driver on its virtqueues.
pub fn start_device(cfg: &DeviceConfig, hm: &Arc<Hostmem>) -> (Device, QueueDriver) {
    let dev = Device::start(cfg, hm.clone()).expect("device start");
    let drv = QueueDriver::new(dev.transport(), hm).expect("queue driver");
    (dev, drv)
}
