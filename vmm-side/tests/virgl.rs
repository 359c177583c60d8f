//! The `virgl` backend across the two processes (feature `virgl`): real virglrenderer in the
//! jailed device under `gpu_device_virgl.policy` with the kill action.
//!
//! * `hostmem run --backend virgl`: venus SHM blobs created, filled through the renderer's
//!   own mapping, placed, read by the KVM guest, written by the guest and read back through
//!   the renderer, unmapped to zeros; zero seccomp violations.
//! * A vrend pointer-only blob answers MAP_BLOB with `ERR_UNSPEC`; unknown resource ids are
//!   refused before they reach the library; the device keeps serving and exits cleanly.
#![cfg(feature = "virgl")]

use hostmem_base::kvm::Vm;
use hostmem_vmm::device::DeviceConfig;
use hostmem_vmm::hostmem::Mode;
use hostmem_vmm::queue_driver::CmdError;
use hostmem_vmm::run::{run, Restart, RunOptions};

mod common;
use common::{device_config_for, hostmem, serial, start_device};

/// `hostmem run`'s virgl device config (jailed, kill action, `--test-ops`, the virgl
/// read-only binds), with the test's `hostmem` binary in device mode.
fn virgl_device() -> DeviceConfig {
    let cfg = device_config_for(hostmem_vmm::run::BackendKind::Virgl);
    assert!(cfg.extra_args.iter().any(|a| a == "--test-ops"));
    cfg
}

#[test]
fn virgl_run_jailed_guest_sees_what_the_renderer_sees() {
    let r = virgl_run(virgl_device());
    assert!(
        r.device_fills,
        "the fills and checksums went through the renderer"
    );
}

/// The user's virgl run (a build without the cargo feature `fault-injection`): the device
/// has no `--test-ops`, so the guest writes each blob's pattern itself (`OPS_NONE`) and
/// checks it through the window; every blob is still mapped and every unmap reads zeros.
#[test]
fn virgl_run_without_test_ops_maps_every_blob_and_says_sharing_was_not_checked() {
    let mut cfg = virgl_device();
    cfg.extra_args.retain(|a| a != "--test-ops");
    let r = virgl_run(cfg);
    assert!(!r.device_fills);
}

/// A jailed virgl `hostmem run` of 150 blobs with `device`: no errors, no device exit, no
/// seccomp violation, every blob mapped, no mismatch.
fn virgl_run(device: DeviceConfig) -> hostmem_vmm::run::Report {
    let _serial = serial();
    let kvm = match Vm::available() {
        Ok(()) => true,
        Err(why) => {
            println!("skipped: /dev/kvm unusable ({why}): no guest checks in the virgl run");
            false
        }
    };
    let opts = RunOptions {
        transport: Default::default(),
        mode: Mode::Fixed,
        window: 64 << 20,
        blobs: 150,
        seed: 11,
        max_live: 16,
        device,
        restart: Restart::Never,
        kill_after: None,
        show_progress: false,
        command_timeout: hostmem_vmm::queue_driver::COMMAND_TIMEOUT,
        guest_event_flood: 0,
        screenshot: None,
    };
    let jailed = opts.device.jailed;
    let r = run(&opts).unwrap();
    println!(
        "virgl run: {} blobs mapped, {} guest checks, {} mismatches, jailed {}, violations {:?}, \
         MAP_BLOB p50 {:.1} µs, UNMAP_BLOB p50 {:.1} µs",
        r.blobs_mapped,
        r.guest_verified,
        r.guest_mismatches,
        r.device.jailed,
        r.seccomp_violations,
        r.map_latency_us.p50,
        r.unmap_latency_us.p50
    );
    assert_eq!(r.backend, "virgl");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.device_exits.is_empty(), "{:?}", r.device_exits);
    assert!(
        r.seccomp_violations.is_empty(),
        "{:?}",
        r.seccomp_violations
    );
    assert_eq!(r.blobs_mapped, 150);
    assert_eq!(r.guest_mismatches, 0);
    assert_eq!(r.guest_holes, 0);
    if kvm {
        // Every blob: pattern seen; every unmap: zeros; with test ops every 4th: the guest's write read
        // back through the renderer.
        assert!(r.guest_verified >= 2 * 150, "{}", r.guest_verified);
        assert_eq!(r.memslot_changes, 1);
    }
    if jailed {
        assert!(r.device.jailed && r.device.seccomp == 2 && r.device.no_new_privs);
    }
    r
}

fn code(r: Result<impl std::fmt::Debug, CmdError>) -> String {
    match r {
        Err(CmdError::Device(c)) => format!("{c:?}"),
        other => format!("unexpected {other:?}"),
    }
}

/// The vrend stream that makes a MAP_PERSISTENT|MAP_COHERENT buffer named by `blob_id`:
/// `VIRGL_CCMD_PIPE_RESOURCE_CREATE` (48) with its 11 dwords (target, format, bind,
/// width, height, depth, array size, last level, samples, flags, blob id).
fn pipe_resource_create(blob_id: u32, size: u32) -> Vec<u8> {
    let dwords = [
        48 | (11 << 16),
        0,       // PIPE_BUFFER
        64,      // VIRGL_FORMAT_R8_UNORM
        1 << 4,  // VIRGL_BIND_VERTEX_BUFFER
        size,    // width
        1,       // height
        1,       // depth
        1,       // array size
        0,       // last level
        0,       // samples
        0b110,   // VIRGL_RESOURCE_FLAG_MAP_PERSISTENT | MAP_COHERENT
        blob_id, // blob id
    ];
    dwords.iter().flat_map(|d| d.to_le_bytes()).collect()
}

#[test]
fn virgl_pointer_only_blob_and_unknown_ids_are_answered_with_errors() {
    let _serial = serial();
    let hm = hostmem(16 << 20);
    let (dev, mut d) = start_device(&virgl_device(), &hm);
    const P: u64 = 4096;
    d.ctx_create(1, 4).unwrap(); // venus
    d.ctx_create(3, 2).unwrap(); // vrend (VIRGL2)

    // A venus SUBMIT_3D completes after its context fence signalled, inside the jail.
    d.submit_3d(1, vec![]).unwrap();

    // Unknown ids: refused before the library sees them.
    assert_eq!(code(d.map_blob(1, 99, 0)), "InvalidResourceId");
    assert_eq!(code(d.unmap_blob(1, 99)), "InvalidResourceId");
    assert_eq!(code(d.unref(99)), "InvalidResourceId");

    // vrend HOST3D blob: pointer-only, MAP_BLOB answers ERR_UNSPEC, nothing is placed.
    d.submit_3d(3, pipe_resource_create(7, 16 * P as u32))
        .unwrap();
    d.create_blob(3, 2, 7, 16 * P).unwrap();
    assert_eq!(code(d.map_blob(3, 2, 0)), "Unspec");
    assert_eq!(hm.live(), 0);

    // The device keeps serving: a venus SHM blob maps at the same offset.
    d.create_blob(1, 1, 0, 16 * P).unwrap();
    d.map_blob(1, 1, 0).unwrap();
    assert_eq!(hm.live(), 1);
    d.unmap_blob(1, 1).unwrap();
    d.unref(1).unwrap();
    d.unref(2).unwrap();
    assert_eq!(hm.live(), 0);
    assert_eq!(hm.counters().refused, 0, "the device refused it all itself");
    drop(d);
    let exit = dev.finish("test done");
    println!("virgl errors test: device exit {exit:?}");
    assert_eq!(exit.code, Some(0), "{exit:?}");
    assert!(
        exit.seccomp_violations.is_empty(),
        "{:?}",
        exit.seccomp_violations
    );
}
