//! Builds the guest driver (`guest/`: freestanding C, gcc) into a flat image that
//! `src/guest.rs` loads into guest RAM. Plain gcc and objcopy: no extra Rust target needed.

use std::path::PathBuf;
use std::process::Command;

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("running {cmd:?}: {e} (the guest driver needs gcc and objcopy)")
    });
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let elf = out.join("guest-driver.elf");
    let bin = out.join("guest-driver.bin");
    for f in [
        "guest/driver.c",
        "guest/abi.h",
        "guest/start.S",
        "guest/guest.ld",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    run(
        Command::new(std::env::var("HOSTMEM_GUEST_CC").unwrap_or_else(|_| "gcc".into()))
            .args([
                "-O2",
                "-ffreestanding",
                "-nostdlib",
                "-static",
                "-fno-pie",
                "-no-pie",
                "-fno-stack-protector",
                "-mno-red-zone",
                "-mgeneral-regs-only",
                "-fno-asynchronous-unwind-tables",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-Wl,--build-id=none",
                "-Wl,--no-warn-rwx-segments",
                "-T",
                "guest/guest.ld",
                "-o",
            ])
            .arg(&elf)
            .args(["guest/start.S", "guest/driver.c"]),
    );
    run(Command::new("objcopy")
        .args(["-O", "binary"])
        .arg(&elf)
        .arg(&bin));
}
