//! Softmax and log-sum-exp written with `power(2, ·)` for the CPU.
//!
//! The Linux mlx-cpu wheel builds for baseline x86-64, so its `exp` (and
//! with it `softmax` and `logsumexp`) is a scalar polynomial whose every
//! fused multiply-add is a call into libm: about 12 ns an element, where
//! `power` calls glibc's `powf`, about 5 ns. On 512-token rows the three
//! took 23% of a training step's CPU samples (attention's softmax most of
//! it). `exp(x) = 2^(x·log2 e)` is also how MLX's own `exp` reduces its
//! argument, and the error is the same: relative 3.8e-6 at most over
//! [-80, 80], as for MLX's `exp`. The argument is never positive here (the
//! row's maximum is subtracted first), so `power` never overflows and its
//! gradient (the output times ln 2) stays finite; masked scores are -inf,
//! whose power is exactly 0. GPUs keep MLX's fused kernels.

use mlx_rs::Array;

use super::ModelError;

/// Softmax over the last axis of `scores · log2 e` (the caller folds the
/// factor into a product it computes anyway).
pub fn softmax_of_log2(scores: &Array) -> Result<Array, ModelError> {
    // The maximum only keeps the powers in range; the softmax does not
    // depend on it, so no gradient goes through it.
    let max = mlx_rs::stop_gradient(scores.max_axis(-1, true)?)?;
    let powers = mlx_rs::ops::power(Array::from_f32(2.0), scores.subtract(&max)?)?;
    Ok(powers.divide(powers.sum_axis(-1, true)?)?)
}

/// `log Σ exp(x)` over the last axis, which it removes.
pub fn logsumexp(x: &Array) -> Result<Array, ModelError> {
    if crate::mlx_env::backend() != crate::mlx_env::Backend::Cpu {
        return Ok(x.logsumexp_axis(-1, None)?);
    }
    let max = mlx_rs::stop_gradient(x.max_axis(-1, true)?)?;
    let shifted = x.subtract(&max)?.multiply(Array::from_f32(std::f32::consts::LOG2_E))?;
    let sum = mlx_rs::ops::power(Array::from_f32(2.0), shifted)?.sum_axis(-1, true)?;
    Ok(sum.log()?.add(&max)?.squeeze_axes(&[-1])?)
}
