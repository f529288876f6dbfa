//! Matrix-multiply work of one trained token, the yardstick `bench train`
//! holds its speed against: tokens/s × FLOPs per token is the rate the
//! trainer achieves, the matmul rate `doctor` measures the limit.
//!
//! Counted: every projection, the output head, attention's two products
//! (scores and values, over the keys that `attend` multiplies: all of them
//! in MLX's GPU kernels, those up to each block's last query on the CPU),
//! and LoRA's own small products. Backward passes are counted only
//! where gradients flow: from the output down to the first adapted block
//! (the frozen weights need no gradient of their own, only their inputs do).
//! Element-wise work (norms, activations, softmax, the optimizer) is left
//! out: it is what a faster trainer removes, not work it must do.

use super::lora::LoraSettings;
use crate::model::Decoder;

/// FLOPs of the forward and backward passes for one token of a sequence of
/// `seq_len` tokens.
pub fn per_token(decoder: &Decoder, settings: &LoraSettings, seq_len: usize) -> f64 {
    let args = decoder.args();
    let layers = decoder.num_layers();
    let first_adapted = layers.saturating_sub(settings.num_layers);
    let layer_of = |path: &str| path.strip_prefix("model.layers.").and_then(|rest| rest.split('.').next()).and_then(|i| i.parse::<usize>().ok());
    let adapted = |path: &str| {
        layer_of(path).is_some_and(|layer| layer >= first_adapted) && settings.keys.iter().any(|key| path.ends_with(&format!(".{key}")))
    };
    let linears = decoder.linears();
    let mut total = 0.0;
    for (path, linear) in &linears {
        let (out_features, in_features) = linear.weight.shape();
        let dense = 2.0 * f64::from(in_features) * f64::from(out_features);
        // The head (no layer) and the blocks from the first adapted one pass gradients back.
        let backward = layer_of(path).is_none_or(|layer| layer >= first_adapted);
        total += if backward { 2.0 * dense } else { dense };
        if adapted(path) {
            // x·Aᵀ then ·Bᵀ forward; their input and weight gradients backward.
            total += 3.0 * 2.0 * f64::from(settings.rank) * f64::from(in_features + out_features);
        }
    }
    if !linears.iter().any(|(path, _)| path == "lm_head") {
        // The tied output head: forward and the gradient of its input.
        total += 2.0 * 2.0 * f64::from(args.hidden_size) * f64::from(args.vocab_size);
    }
    let keys_computed = crate::model::attention::computed_key_share(seq_len as i32, crate::mlx_env::backend() == crate::mlx_env::Backend::Cpu);
    let attention = 2.0 * 2.0 * seq_len as f64 * keys_computed * f64::from(args.num_attention_heads) * f64::from(args.head_dim());
    let backward_layers = layers - first_adapted;
    // Forward in every layer; backward (four products) where gradients flow.
    total += attention * layers as f64 + 2.0 * attention * backward_layers as f64;
    total
}
