//! The frame leaves the jail without widening it (issue 26, part 2): the real jailed device
//! sends each flushed frame to the VMM over its mapping tube ([`DeviceMsg::Frame`], a
//! sealed memfd), the VMM checks it and keeps a copy byte for byte, and its PNG decodes to
//! the same pixels; forged frames on the mapping tube (a short fd, an unsealed one, one
//! the VMM gave the device, none) are refused and counted, and the service keeps serving.

use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostmem_base::shm::SharedMemory;
use hostmem_device::wire::{Command, Rect, Response, VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM};
use hostmem_ipc::protocol::{DeviceMsg, FrameMsg};
use hostmem_ipc::Tube;
use hostmem_vmm::display::PixelFormat;
use hostmem_vmm::queue_driver::SCRATCH_GPA;

mod common;
use common::{device_config, hostmem, serial, start_device};

fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1] ^ 0x5a)
        .collect()
}

#[test]
fn a_flushed_2d_frame_reaches_the_vmm_byte_for_byte_and_as_png() {
    let _serial = serial();
    let hm = hostmem(16 << 20);
    let (dev, mut d) = start_device(&device_config(), &hm);
    let (w, h) = (64u32, 32u32);
    let img = pattern((w * h * 4) as usize);
    d.write_scratch(0, &img).unwrap();
    let ok = |r: Response| assert!(matches!(r, Response::OkNoData { .. }), "{r:?}");
    let full = Rect::new(0, 0, w, h);
    ok(d.command(&Command::create_2d(
        1,
        VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM,
        w,
        h,
    ))
    .unwrap());
    ok(
        d.command(&Command::attach_backing(1, &[(SCRATCH_GPA, w * h * 4)]))
            .unwrap(),
    );
    ok(d.command(&Command::transfer_to_host_2d(1, full, 0))
        .unwrap());
    ok(d.command(&Command::set_scanout(0, 1, full)).unwrap());
    ok(d.command(&Command::resource_flush(1, full)).unwrap());
    let t0 = Instant::now();
    let kept = loop {
        if let Some(f) = hm.frames().latest(0) {
            break f;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no frame reached the VMM"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(
        kept.pixels, img,
        "the VMM's copy is the pattern byte for byte"
    );
    assert_eq!((kept.msg.width, kept.msg.height, kept.msg.seq), (w, h, 1));
    assert_eq!(kept.format, PixelFormat::B8G8R8X8);
    let dir = std::env::temp_dir().join(format!("hostmem-frames-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("shot.png");
    assert!(hm.frames().screenshot(&path).unwrap());
    let mut r = png::Decoder::new(std::fs::File::open(&path).unwrap())
        .read_info()
        .unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (w, h));
    let want: Vec<u8> = img
        .chunks_exact(4)
        .flat_map(|p| [p[2], p[1], p[0], 0xff])
        .collect();
    assert_eq!(
        &buf[..info.buffer_size()],
        &want[..],
        "PNG pixels (B8G8R8X8 → RGBA)"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let rep = hm.frames().report();
    assert_eq!(
        (rep.frames, rep.refused, rep.width, rep.height),
        (1, 0, w, h)
    );
    drop(d);
    let exit = dev.finish("test done");
    assert_eq!(exit.code, Some(0), "{exit:?}");
}

#[test]
fn forged_frames_on_the_mapping_tube_are_refused_and_counted() {
    let hm = hostmem(1 << 20);
    let (vmm, device) = Tube::pair().unwrap();
    let vmm = Arc::new(vmm);
    let service = {
        let (hm, vmm) = (hm.clone(), vmm.clone());
        std::thread::spawn(move || hostmem_vmm::service::serve(&hm, &vmm))
    };
    let msg = FrameMsg {
        scanout_id: 0,
        resource_id: 1,
        width: 16,
        height: 16,
        stride: 64,
        format: VIRTIO_GPU_FORMAT_B8G8R8X8_UNORM,
        offset: 0,
        rect: [0, 0, 16, 16],
        seq: 1,
        blob: false,
    };
    let bytes = vec![7u8; 1024];
    // Short by one byte; not sealed; an fd the VMM gave the device; a JSON Frame without
    // its fd (the tube drops it: fd count).
    let short = SharedMemory::frozen_copy("short", &bytes[..1023]).unwrap();
    let loose = SharedMemory::new("loose", 1024).unwrap();
    let given = SharedMemory::frozen_copy("given", &bytes).unwrap();
    hm.note_given("guest RAM", given.as_fd()).unwrap();
    for fd in [short.as_fd(), loose.as_fd(), given.as_fd()] {
        device.send(&DeviceMsg::Frame(msg), &[fd]).unwrap();
    }
    let json = serde_json::to_vec(&DeviceMsg::Frame(msg)).unwrap();
    device.send_bytes(&json, &[]).unwrap();
    // Then a good one: the service still serves, and keeps only it.
    let good = SharedMemory::frozen_copy("good", &bytes).unwrap();
    device
        .send(
            &DeviceMsg::Frame(FrameMsg { seq: 2, ..msg }),
            &[good.as_fd()],
        )
        .unwrap();
    drop(device);
    let _ = service.join().unwrap();
    let r = hm.frames().report();
    assert_eq!((r.refused, r.frames, r.seq), (3, 1, 2), "{r:?}");
    assert_eq!(hm.counters().protocol_errors, 1, "the frame without its fd");
    assert_eq!(hm.frames().latest(0).unwrap().pixels, bytes);
}
