//! Which library answers MLX's `cblas_sgemm` calls in this process.
//!
//! On Linux the MLX wheel bundles a reference BLAS that is about 50x slower
//! than OpenBLAS; build.rs links OpenBLAS first so that it wins symbol lookup.
//! Asking the dynamic linker which object provides `cblas_sgemm` is the same
//! lookup libmlx.so's calls go through, so it tells the truth.

use std::ffi::CStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlasKind {
    OpenBlas,
    Accelerate,
    /// The netlib reference BLAS bundled with the mlx-cpu wheel: correct but slow.
    Reference,
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlasLibrary {
    pub kind: BlasKind,
    /// The shared object that defines `cblas_sgemm`.
    pub path: String,
}

impl BlasKind {
    pub fn name(self) -> &'static str {
        match self {
            BlasKind::OpenBlas => "OpenBLAS",
            BlasKind::Accelerate => "Accelerate",
            BlasKind::Reference => "reference BLAS (slow)",
            BlasKind::Other => "other BLAS",
        }
    }
}

/// The library that provides `cblas_sgemm`, or `None` when no loaded object
/// does (MLX on Metal or CUDA may not need one).
pub fn blas_library() -> Option<BlasLibrary> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name only reads;
    // dladdr fills `info` for an address inside a loaded object, and
    // dli_fname then points at a NUL-terminated string owned by the loader.
    let path = unsafe {
        let symbol = libc::dlsym(libc::RTLD_DEFAULT, c"cblas_sgemm".as_ptr());
        if symbol.is_null() {
            return None;
        }
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(symbol, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned()
    };
    Some(BlasLibrary {
        kind: classify(&path),
        path,
    })
}

fn classify(path: &str) -> BlasKind {
    let lower = path.to_ascii_lowercase();
    if lower.contains("openblas") {
        BlasKind::OpenBlas
    } else if lower.contains("accelerate") || lower.contains("veclib") {
        BlasKind::Accelerate
    } else if lower.contains("libblas") || lower.contains("libmlx") {
        BlasKind::Reference
    } else {
        BlasKind::Other
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_known_libraries() {
        assert_eq!(
            classify("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"),
            BlasKind::OpenBlas
        );
        assert_eq!(
            classify("/repo/.deps/mlx-cpu/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0"),
            BlasKind::Reference
        );
        assert_eq!(
            classify("/System/Library/Frameworks/Accelerate.framework/Versions/A/Accelerate"),
            BlasKind::Accelerate
        );
        assert_eq!(classify("/opt/intel/libmkl_rt.so"), BlasKind::Other);
    }
}
