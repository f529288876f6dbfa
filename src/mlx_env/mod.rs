//! What this process's MLX is: version, compute device, which BLAS serves its
//! CPU matmuls, and how fast a float32 matmul runs. `doctor` reports these.
//! Also the small platform shim that mlx-rs needs on Linux.

mod blas;
mod device;
#[cfg(target_os = "linux")]
mod linux_shims;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod malloc;
mod matmul_bench;

pub use blas::{BlasKind, BlasLibrary, BlasHold, blas_library};
pub use device::{DeviceChoice, GpuInfo, gpu_info, use_device};
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub use malloc::keep_freed_memory;
pub use matmul_bench::{MatmulBench, matmul_limit};

use std::ffi::CStr;

/// Where MLX runs its kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Cpu,
    Metal,
    Cuda,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Metal => "metal",
            Backend::Cuda => "cuda",
        }
    }
}

/// The MLX library version, as the linked library reports it.
pub fn mlx_version() -> String {
    // SAFETY: mlx_string_new returns an empty owned string, mlx_version fills
    // it, and we copy the data out before freeing it exactly once.
    unsafe {
        let string = mlx_sys::mlx_string_new();
        let status = mlx_sys::mlx_version(&string as *const _ as *mut _);
        let version = if status == 0 {
            let data = mlx_sys::mlx_string_data(string);
            if data.is_null() {
                "unknown".to_owned()
            } else {
                CStr::from_ptr(data).to_string_lossy().into_owned()
            }
        } else {
            "unknown".to_owned()
        };
        mlx_sys::mlx_string_free(string);
        version
    }
}

/// MLX settings read from the environment that this program gives its own
/// defaults, each kept where the user set it. MLX's CUDA backend caches one
/// CUDA graph per shape and, by default, throws once misses pass its cache
/// of 400: a node's shapes vary with every batch length and every decoding
/// step (the simulation's exact-match generation stopped every node of the
/// main job in round 2 on an H200), and a slower step beats a node that
/// stops. Metal and the CPU ignore these.
const MLX_ENV_DEFAULTS: &[(&str, &str)] = &[("MLX_CUDA_GRAPH_CACHE_SIZE", "4000"), ("MLX_ENABLE_CACHE_THRASHING_CHECK", "0")];

/// Applies `MLX_ENV_DEFAULTS`. Call first thing in `main`, before any
/// thread exists and before MLX computes anything.
pub fn set_env_defaults() {
    for (key, value) in MLX_ENV_DEFAULTS {
        if std::env::var_os(key).is_none() {
            // SAFETY: called at the start of `main`, while the process has
            // one thread, so nothing reads the environment concurrently.
            unsafe { std::env::set_var(key, value) };
        }
    }
}

/// The backend MLX computes on now: its default device (`use_device`).
pub fn backend() -> Backend {
    match device::gpu_backend() {
        Some(gpu) if device::default_is_gpu() => gpu,
        _ => Backend::Cpu,
    }
}

/// Waits until the default stream has computed everything queued on it
/// (`async_eval`). Nothing may still compute when a process exits: an
/// evaluation in flight then can hang OpenBLAS's shutdown (seen: `generate`
/// stopping at its end token with the next token queued).
pub fn wait_for_queued_work() -> Result<(), String> {
    // SAFETY: takes no arguments; MLX returns a status.
    match unsafe { mlx_sys::mlx_synchronize_default() } {
        0 => Ok(()),
        status => Err(format!("MLX could not synchronize its default stream (status {status})")),
    }
}
