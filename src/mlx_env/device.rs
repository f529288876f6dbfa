//! Which device MLX computes on, and what that device is.
//!
//! MLX keeps one process-wide default device, which every mlx-rs operation
//! without an explicit stream uses; `use_device` sets it once, before any
//! compute thread starts. A CUDA or Metal build defaults to its GPU when one
//! is present; `--device cpu` keeps the same binary on the CPU (the mixed
//! CPU/GPU run in README.md relies on that).

use std::ffi::{CStr, CString};

use mlx_rs::{Device, DeviceType};

use super::Backend;

/// The `--device` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceChoice {
    /// The GPU where this build and machine have one, else the CPU.
    #[default]
    Auto,
    Cpu,
    Gpu,
}

/// Makes `choice` MLX's default device and returns the backend that now
/// computes. Asking for a GPU that is not there is an error that says why.
pub fn use_device(choice: DeviceChoice) -> Result<Backend, String> {
    match choice {
        DeviceChoice::Auto => {}
        DeviceChoice::Cpu => Device::set_default(&Device::cpu()),
        DeviceChoice::Gpu => {
            if gpu_backend().is_none() {
                return Err(format!("--device gpu: MLX {} finds no GPU here: {}", super::mlx_version(), no_gpu_fix()));
            }
            Device::set_default(&Device::gpu());
        }
    }
    Ok(super::backend())
}

/// What to do about a missing GPU, for the MLX this binary links.
fn no_gpu_fix() -> &'static str {
    match option_env!("BLOSSOM_MLX_BACKEND") {
        Some("cuda") => {
            "this binary links the CUDA MLX, but no CUDA device answers; check `nvidia-smi` (CUDA 13 needs an NVIDIA driver 580 or newer), or use --device cpu"
        }
        Some(_) => "this binary links the CPU-only MLX; on a machine with an NVIDIA GPU run `bash scripts/setup.sh --cuda`, which installs the CUDA MLX and rebuilds, or leave out --device",
        None => "this build finds no Metal device; leave out --device or use --device cpu",
    }
}

/// The GPU backend this build and machine offer, if any.
pub(super) fn gpu_backend() -> Option<Backend> {
    let mut metal = false;
    let mut cuda = false;
    // SAFETY: both functions only write a bool through the given pointer.
    let (metal_status, cuda_status) = unsafe { (mlx_sys::mlx_metal_is_available(&mut metal), mlx_sys::mlx_cuda_is_available(&mut cuda)) };
    if metal_status == 0 && metal {
        Some(Backend::Metal)
    } else if cuda_status == 0 && cuda {
        Some(Backend::Cuda)
    } else {
        None
    }
}

/// Whether MLX's default device is a GPU.
pub(super) fn default_is_gpu() -> bool {
    Device::try_default().and_then(|device| device.get_type()).is_ok_and(|kind| matches!(kind, DeviceType::Gpu))
}

/// What the GPU says of itself (MLX's device info).
#[derive(Debug, Clone, serde::Serialize)]
pub struct GpuInfo {
    pub name: String,
    pub architecture: Option<String>,
    pub memory_bytes: Option<u64>,
}

/// The GPU's name, architecture and memory, where there is a GPU.
pub fn gpu_info() -> Option<GpuInfo> {
    gpu_backend()?;
    // SAFETY: the device and the info object are created, the info filled
    // for that device and read (strings copied out), and both freed once.
    unsafe {
        let device = mlx_sys::mlx_device_new_type(mlx_sys::mlx_device_type__MLX_GPU, 0);
        let mut info = mlx_sys::mlx_device_info_new();
        let filled = mlx_sys::mlx_device_info_get(&mut info, device) == 0;
        let found = filled.then(|| GpuInfo {
            name: info_string(info, "device_name").unwrap_or_else(|| "unknown GPU".to_owned()),
            architecture: info_string(info, "architecture"),
            memory_bytes: ["total_memory", "memory_size"].iter().find_map(|key| info_size(info, key)),
        });
        mlx_sys::mlx_device_info_free(info);
        mlx_sys::mlx_device_free(device);
        found
    }
}

/// SAFETY: `info` must be a live, filled device info object.
unsafe fn info_string(info: mlx_sys::mlx_device_info, key: &str) -> Option<String> {
    let key = CString::new(key).ok()?;
    let mut value: *const std::os::raw::c_char = std::ptr::null();
    // SAFETY: the caller's contract; the returned string is owned by `info`
    // and copied before `info` is freed.
    unsafe {
        if mlx_sys::mlx_device_info_get_string(&mut value, info, key.as_ptr()) != 0 || value.is_null() {
            return None;
        }
        Some(CStr::from_ptr(value).to_string_lossy().into_owned())
    }
}

/// SAFETY: `info` must be a live, filled device info object.
unsafe fn info_size(info: mlx_sys::mlx_device_info, key: &str) -> Option<u64> {
    let key = CString::new(key).ok()?;
    let mut value: usize = 0;
    // SAFETY: the caller's contract; only a usize is written.
    let status = unsafe { mlx_sys::mlx_device_info_get_size(&mut value, info, key.as_ptr()) };
    (status == 0).then_some(value as u64)
}
