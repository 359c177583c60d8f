//! lavapipe's real OPAQUE `VkDeviceMemory` fds (the host's Mesa, no render server): the
//! device's recogniser accepts them at data offset 4096, and the bytes there are exactly what
//! Vulkan's own mapping wrote; wrong sizes are refused. Needs `cc` and lavapipe
//! (`mesa-vulkan-drivers`); prints `skipped:` otherwise.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};

use hostmem_device::backend::opaque::{lavapipe_data_offset, LAVAPIPE_DATA_OFFSET};
use std::os::fd::AsFd;

const ICD: &str = "/usr/share/vulkan/icd.d/lvp_icd.x86_64.json";

#[test]
fn lavapipe_opaque_fds_place_from_their_data_offset() {
    if !Path::new(ICD).exists() {
        println!("skipped: no lavapipe ICD at {ICD} (mesa-vulkan-drivers)");
        return;
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/lavapipe/export_memfd.c");
    let bin = std::env::temp_dir().join(format!("hostmem-export-memfd-{}", std::process::id()));
    match Command::new("cc")
        .args(["-O1", "-Wall", "-o"])
        .arg(&bin)
        .arg(&src)
        .arg("-ldl")
        .status()
    {
        Ok(s) if s.success() => {}
        other => {
            println!("skipped: cannot build {} with cc: {other:?}", src.display());
            return;
        }
    }
    // vkr rounds host-visible allocations up to pages before it allocates (the guest's blob
    // is page-rounded); 12345 is lavapipe's layout without that rounding, whose data is
    // shorter than the page-rounded blob: it must be refused.
    let sizes: [u64; 5] = [4096, 65536, 16384, 8 << 20, 12345];
    let mut child = Command::new(&bin)
        .args(sizes.iter().map(u64::to_string))
        .env("VK_ICD_FILENAMES", ICD)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn export_memfd");
    let _ = std::fs::remove_file(&bin);
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let mut checked = 0;
    for (i, &asked) in sizes.iter().enumerate() {
        let line = match lines.next() {
            Some(Ok(l)) => l,
            other => {
                drop(child.stdin.take());
                let status = child.wait().unwrap();
                if status.code() == Some(3) {
                    println!("skipped: lavapipe gives no Vulkan device here ({other:?})");
                    return;
                }
                panic!("export_memfd printed nothing for {asked}: {other:?}, {status}");
            }
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        let path = format!("/proc/{}/fd/{}", f[0], f[1]);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        // What the guest's blob is: the allocation rounded up to pages (virtio-gpu, vkr).
        let blob = asked.div_ceil(4096) * 4096;
        if asked % 4096 != 0 {
            let err = lavapipe_data_offset(file.as_fd(), blob).unwrap_err();
            assert!(err.contains("does not fit"), "{err}");
            checked += 1;
            continue;
        }
        let offset = lavapipe_data_offset(file.as_fd(), blob)
            .unwrap_or_else(|e| panic!("allocation of {asked}: refused: {e}"));
        assert_eq!(offset, LAVAPIPE_DATA_OFFSET);
        // The bytes from the offset are Vulkan's view: word k is k ^ (i << 24).
        let mut buf = vec![0u8; asked as usize / 4 * 4];
        file.read_exact_at(&mut buf, offset).unwrap();
        let tag = ((i + 1) as u32) << 24;
        for (k, w) in buf.chunks_exact(4).enumerate() {
            let got = u32::from_le_bytes(w.try_into().unwrap());
            assert_eq!(got, k as u32 ^ tag, "allocation {i} word {k}");
        }
        // A blob larger than the file's data is refused.
        let too_big = blob + 2 * 4096;
        assert!(lavapipe_data_offset(file.as_fd(), too_big).is_err());
        checked += 1;
    }
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success());
    assert_eq!(checked, sizes.len());
}
