//! The device's seccomp policy: where the policy files are, and compiling one into the BPF
//! program the launcher hands to the device.

use std::path::{Path, PathBuf};

use anyhow::Context;
use hostmem_jail::compiler::{compile_file, CompileOptions};

/// The checkout's `jail-policies/x86_64` (compiled into the binary as a default).
pub fn default_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../jail-policies/x86_64")
}

/// Compiles `path`; with `log`, violations are reported instead of killing.
pub fn compile_device_policy(path: &Path, log: bool) -> anyhow::Result<Vec<u8>> {
    let opts = CompileOptions::for_device(log);
    let prog = compile_file(path, &opts)
        .with_context(|| format!("compiling seccomp policy {}", path.display()))?;
    Ok(hostmem_base::seccomp::program_to_bytes(&prog))
}

/// Read-only bind mounts every device needs: the dynamic loader and the C runtime (the
/// device is a dynamically linked glibc program). Symlinks on the way (`/lib64 -> usr/lib64`,
/// `/lib -> usr/lib`) are recreated inside the jail's root.
pub fn loader_ro_binds() -> Vec<PathBuf> {
    ["/lib64", "/lib/x86_64-linux-gnu"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect()
}

/// Read-only bind mounts the virgl backend needs (Mesa's drivers and data), found with the
/// log mode: see `jail-policies/x86_64/gpu_device_virgl.policy`.
pub fn virgl_ro_binds() -> Vec<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/share/vulkan",
        "/usr/share/glvnd",
        "/usr/share/drirc.d",
    ]
    .iter()
    .map(PathBuf::from)
    .filter(|p| p.exists())
    .collect()
}
