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

/// Read-only bind mounts virglrenderer's render server needs beyond the device's: the
/// Vulkan loader's driver list (lavapipe's ICD file), since venus creates Vulkan instances
/// there.
pub fn render_server_ro_binds() -> Vec<PathBuf> {
    ["/usr/share/vulkan/icd.d"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect()
}

/// Read-only bind mounts the virgl backend needs beyond [`loader_ro_binds`] (which already
/// holds `/usr/lib/x86_64-linux-gnu` through `/lib -> usr/lib`: libvirglrenderer, libglvnd,
/// Mesa's `dri/swrast_dri.so`, libLLVM). Found with the log mode and strace of
/// `hostmem run --backend virgl` (see `jail-policies/x86_64/gpu_device_virgl.policy`):
/// libglvnd reads its EGL vendor list, Mesa its drirc defaults. Nothing else is opened
/// successfully outside the loader's paths. (A venus guest that creates a VkInstance would
/// also need `/usr/share/vulkan/icd.d` for lavapipe; the run does not, so it is not bound.)
pub fn virgl_ro_binds() -> Vec<PathBuf> {
    ["/usr/share/glvnd/egl_vendor.d", "/usr/share/drirc.d"]
        .iter()
        .map(PathBuf::from)
        .filter(|p| p.exists())
        .collect()
}
