//! What this process's MLX is: version, compute device, which BLAS serves its
//! CPU matmuls, and how fast a float32 matmul runs. `doctor` reports these.
//! Also the small platform shim that mlx-rs needs on Linux.

mod blas;
#[cfg(target_os = "linux")]
mod linux_shims;
mod matmul_bench;

pub use blas::{BlasKind, BlasLibrary, blas_library};
pub use matmul_bench::{MatmulBench, bench_matmul};

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

/// The accelerator MLX uses by default: Metal or CUDA where the build has it
/// and the machine offers it, else the CPU.
pub fn backend() -> Backend {
    let mut metal = false;
    let mut cuda = false;
    // SAFETY: both functions only write a bool through the given pointer.
    let (metal_status, cuda_status) = unsafe {
        (
            mlx_sys::mlx_metal_is_available(&mut metal),
            mlx_sys::mlx_cuda_is_available(&mut cuda),
        )
    };
    if metal_status == 0 && metal {
        Backend::Metal
    } else if cuda_status == 0 && cuda {
        Backend::Cuda
    } else {
        Backend::Cpu
    }
}
