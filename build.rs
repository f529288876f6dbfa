//! Link settings for MLX on Linux (docs/MLX_ON_LINUX.md).
//!
//! mlx-sys builds mlx-c against the headers of the prebuilt MLX that
//! `scripts/setup.sh` unpacks into `.deps/mlx-cpu`. This script links the
//! `libmlx.so` that setup chose (`.deps/mlx-backend`): the CPU wheel's, or
//! with `setup.sh --cuda` the CUDA wheel's in `.deps/mlx-cuda` (the same C++
//! API and headers, so mlx-c is the same). It bakes an rpath to that library
//! into every binary and test of this package, and links OpenBLAS ahead of
//! the wheel's reference BLAS so that CPU matmuls run about 50x faster. On
//! macOS it does nothing: mlx-sys builds MLX with Metal and Accelerate there.
use std::env;
use std::path::PathBuf;

/// Where Debian's `libopenblas0-pthread` (or another OpenBLAS) puts the library.
const OPENBLAS_CANDIDATES: &[&str] = &[
    "/usr/lib/{triple}/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{triple}/libopenblas.so.0",
    "/usr/lib/{triple}/openblas-openmp/libopenblas.so.0",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    // A relay build (`--no-default-features`) has no MLX to link.
    if os != "linux" || env::var_os("CARGO_FEATURE_TRAIN").is_none() {
        return;
    }
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    // Written by every run of scripts/setup.sh: `cpu` or `cuda`.
    let choice_file = root.join(".deps/mlx-backend");
    if choice_file.is_file() {
        println!("cargo:rerun-if-changed={}", choice_file.display());
    }
    let backend = std::fs::read_to_string(&choice_file).map(|s| s.trim().to_owned()).unwrap_or_else(|_| "cpu".to_owned());
    let wheel_dir = match backend.as_str() {
        "cpu" => ".deps/mlx-cpu",
        "cuda" => ".deps/mlx-cuda",
        other => panic!("{} says `{other}`; expected cpu or cuda. Run `bash scripts/setup.sh` (or with --cuda) again.", choice_file.display()),
    };
    let mlx_lib = root.join(wheel_dir).join("mlx/lib");
    println!("cargo:rerun-if-changed={}", mlx_lib.join("libmlx.so").display());
    if !mlx_lib.join("libmlx.so").is_file() {
        panic!(
            "the MLX wheel is missing: {} does not exist. Run `bash scripts/setup.sh{}` first.",
            mlx_lib.join("libmlx.so").display(),
            if backend == "cuda" { " --cuda" } else { "" }
        );
    }
    println!("cargo:rustc-link-search=native={}", mlx_lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", mlx_lib.display());
    println!("cargo:rustc-env=BLOSSOM_MLX_BACKEND={backend}");
    if backend == "cuda" {
        // libmlx.so finds the NVIDIA libraries through its own rpath (the
        // wheels' site-packages layout in .deps/mlx-cuda) and libcuda.so.1
        // from the driver, at run time; a machine that only builds has no
        // driver, so the linker must not insist on them.
        println!("cargo:rustc-link-arg=-Wl,--allow-shlib-undefined");
    }

    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let triple = format!("{arch}-linux-gnu");
    let openblas = OPENBLAS_CANDIDATES
        .iter()
        .map(|pattern| PathBuf::from(pattern.replace("{triple}", &triple)))
        .find(|path| path.is_file());
    match openblas {
        Some(path) => {
            // The binary references no OpenBLAS symbol itself, so keep the
            // DT_NEEDED entry (--no-as-needed). Being a direct dependency puts
            // it ahead of libmlx.so's own libblas in symbol lookup, so MLX's
            // cblas_sgemm calls resolve to OpenBLAS.
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg={}", path.display());
            println!("cargo:rustc-link-arg=-Wl,--as-needed");
            println!("cargo:rustc-env=BLOSSOM_LINKED_BLAS={}", path.display());
        }
        None => {
            println!(
                "cargo:warning=OpenBLAS not found; MLX will use the wheel's slow reference BLAS. \
                 Install libopenblas0-pthread (bash scripts/setup.sh does)."
            );
            println!("cargo:rustc-env=BLOSSOM_LINKED_BLAS=");
        }
    }
}
