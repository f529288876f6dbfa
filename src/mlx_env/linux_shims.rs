//! mlx-rs seeds its random key from `mach_approximate_time`, a macOS symbol
//! (docs/MLX_ON_LINUX.md). On Linux we provide it.

/// Monotonic nanoseconds, standing in for the macOS tick counter.
#[unsafe(no_mangle)]
pub extern "C" fn mach_approximate_time() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64).wrapping_mul(1_000_000_000).wrapping_add(now.tv_nsec as u64)
}
