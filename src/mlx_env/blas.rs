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

/// A training evaluation's hold on BLAS: evaluations that hold it run one
/// at a time in this process, each at the thread count it asks for.
///
/// Parts of a batch computed on several MLX CPU streams at once
/// (`train.cpu_streams`) each call BLAS from their own thread, and one core
/// each beats every call fanning out over all cores while its workers spin
/// through MLX's single-threaded element-wise work: those run OpenBLAS
/// single-threaded. OpenBLAS's results depend on its thread count for some
/// shapes (a long inner dimension: 8×2000 by 2000×64 differs in the last
/// bit), and the count is global to the process, so two trainers in one
/// process (tests, a simulation's nodes) must not change it under each
/// other's evaluation: hence the lock. Where the BLAS is not OpenBLAS
/// (Accelerate has no such knob) only the lock remains.
pub struct BlasHold {
    _held: std::sync::MutexGuard<'static, ()>,
    restore: Option<(SetThreads, i32)>,
}

type SetThreads = unsafe extern "C" fn(i32);
type GetThreads = unsafe extern "C" fn() -> i32;

/// OpenBLAS's thread-count setter and the count the process started with.
fn openblas_threads() -> Option<(SetThreads, i32)> {
    static THREADS: std::sync::OnceLock<Option<(SetThreads, i32)>> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        // SAFETY: dlsym with RTLD_DEFAULT and NUL-terminated names only
        // reads; the symbols, where present, are OpenBLAS's own functions
        // with these C signatures (openblas_config.h).
        unsafe {
            let set = libc::dlsym(libc::RTLD_DEFAULT, c"openblas_set_num_threads".as_ptr());
            let get = libc::dlsym(libc::RTLD_DEFAULT, c"openblas_get_num_threads".as_ptr());
            if set.is_null() || get.is_null() {
                return None;
            }
            let set = std::mem::transmute::<*mut libc::c_void, SetThreads>(set);
            let get = std::mem::transmute::<*mut libc::c_void, GetThreads>(get);
            Some((set, get()))
        }
    })
}

impl BlasHold {
    /// Waits for the other holders, then runs BLAS single-threaded until
    /// dropped where `single_threaded`, at the process's count otherwise.
    pub fn new(single_threaded: bool) -> Self {
        static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let held = LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let restore = openblas_threads().filter(|&(_, threads)| single_threaded && threads > 1);
        if let Some((set, _)) = restore {
            // SAFETY: `set` is openblas_set_num_threads (above).
            unsafe { set(1) };
        }
        Self { _held: held, restore }
    }
}

impl Drop for BlasHold {
    fn drop(&mut self) {
        if let Some((set, threads)) = self.restore {
            // SAFETY: `set` is openblas_set_num_threads (above).
            unsafe { set(threads) };
        }
    }
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
