//! Link settings for MLX on Linux (docs/MLX_ON_LINUX.md).
//!
//! mlx-sys builds mlx-c against the prebuilt `libmlx.so` that
//! `scripts/setup.sh` unpacks into `.deps/mlx-cpu`. This script tells the
//! linker where that library is, bakes an rpath to it into every binary and
//! test of this package, and links OpenBLAS ahead of the wheel's reference
//! BLAS so that matmul runs about 50x faster. On macOS it does nothing: mlx-sys
//! builds MLX with Metal and Accelerate there.
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
    let mlx_lib = root.join(".deps/mlx-cpu/mlx/lib");
    println!("cargo:rerun-if-changed={}", mlx_lib.join("libmlx.so").display());
    if !mlx_lib.join("libmlx.so").is_file() {
        panic!(
            "the MLX wheel is missing: {} does not exist. Run `bash scripts/setup.sh` first.",
            mlx_lib.join("libmlx.so").display()
        );
    }
    println!("cargo:rustc-link-search=native={}", mlx_lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", mlx_lib.display());

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
