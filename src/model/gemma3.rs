//! Gemma 3 text decoder (mlx-lm's `models/gemma3_text.py`). It differs from
//! Llama in: q/k RMSNorm, RMSNorm with `1 + weight`, four norms a block
//! (around attention and around the MLP), a GELU-gated MLP, embeddings scaled
//! by √hidden, and sliding-window attention on all but every
//! `sliding_window_pattern`-th layer, with its own RoPE base.

use mlx_rs::Array;

use super::args::{Architecture, ModelArgs};
use super::attention::AttentionMask;
use super::kv_cache::KvCache;
use super::layers::{Embedding, RmsNorm, Rope};
use super::linear::Linear;
use super::llama::{Attention, GateActivation, Mlp, named_linears, take_output_head};
use super::weights::WeightMap;
use super::ModelError;

#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub pre_feedforward_layernorm: RmsNorm,
    pub post_feedforward_layernorm: RmsNorm,
    pub mlp: Mlp,
    /// Local (sliding-window) attention, or global.
    pub sliding: bool,
}

#[derive(Debug, Clone)]
pub struct Gemma3 {
    pub args: ModelArgs,
    pub embed_tokens: Embedding,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    pub lm_head: Option<Linear>,
    /// √hidden rounded to bfloat16, exactly as the reference multiplies.
    embed_scale: f32,
    window: i32,
}

/// Rounds to the nearest bfloat16 (ties to even), kept as f32.
fn round_to_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
    f32::from_bits(rounded)
}

impl Gemma3 {
    pub fn from_weights(args: ModelArgs, mut weights: WeightMap) -> Result<Self, ModelError> {
        args.validate()?;
        let eps = args.rms_norm_eps;
        let dim = args.hidden_size;
        let pattern = args.sliding_window_pattern.unwrap_or(6).max(1);
        let window = args.sliding_window.unwrap_or(512);
        if window < 1 {
            return Err(ModelError::BadConfig(format!("sliding_window = {window} must be positive")));
        }
        let head_dim = args.head_dim();
        let global_rope = Rope::new(head_dim, false, args.rope_theta, args.rope_scaling.as_ref())?;
        let local_rope = Rope::new(head_dim, false, args.rope_local_base_freq.unwrap_or(10_000.0), None)?;
        let embed_tokens = Embedding::take(&mut weights, "model.embed_tokens", args.vocab_size, dim)?;
        let layers = (0..args.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                let sliding = (i + 1) % pattern != 0;
                let rope = if sliding { local_rope.clone() } else { global_rope.clone() };
                let norm = |weights: &mut WeightMap, name: &str| RmsNorm::take(weights, &format!("{p}.{name}"), dim, eps, true);
                Ok(Block {
                    input_layernorm: norm(&mut weights, "input_layernorm")?,
                    self_attn: Attention::take(&mut weights, &format!("{p}.self_attn"), &args, Architecture::Gemma3, rope)?,
                    post_attention_layernorm: norm(&mut weights, "post_attention_layernorm")?,
                    pre_feedforward_layernorm: norm(&mut weights, "pre_feedforward_layernorm")?,
                    post_feedforward_layernorm: norm(&mut weights, "post_feedforward_layernorm")?,
                    mlp: Mlp::take(&mut weights, &format!("{p}.mlp"), dim, args.intermediate_size, false, GateActivation::GeluApprox)?,
                    sliding,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let norm = RmsNorm::take(&mut weights, "model.norm", dim, eps, true)?;
        let lm_head = take_output_head(&mut weights, &args)?;
        Ok(Self {
            embed_scale: round_to_bf16((dim as f32).sqrt()),
            window,
            args,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    pub fn forward(&self, tokens: &Array, mut caches: Option<&mut [KvCache]>, key_padding: Option<&Array>) -> Result<Array, ModelError> {
        let len = tokens.shape()[1];
        let offset = caches.as_deref().and_then(|c| c.first()).map_or(0, KvCache::offset);
        let global_mask = AttentionMask::build(len, offset, None, key_padding)?;
        let local_mask = AttentionMask::build(len, offset, Some(self.window), key_padding)?;
        let mut h = self.embed_tokens.forward(tokens)?.multiply(Array::from_f32(self.embed_scale))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            let mask = if layer.sliding { &local_mask } else { &global_mask };
            let attn = layer.self_attn.forward(&layer.input_layernorm.forward(&h)?, mask, cache)?;
            h = h.add(layer.post_attention_layernorm.forward(&attn)?)?;
            let mlp = layer.mlp.forward(&layer.pre_feedforward_layernorm.forward(&h)?)?;
            h = h.add(layer.post_feedforward_layernorm.forward(&mlp)?)?;
        }
        let h = self.norm.forward(&h)?;
        match &self.lm_head {
            Some(head) => head.forward(&h),
            None => self.embed_tokens.as_linear(&h),
        }
    }

    pub fn map_linears(&mut self, mut f: impl FnMut(&Linear) -> Result<Linear, ModelError>) -> Result<(), ModelError> {
        for layer in &mut self.layers {
            layer.self_attn.map_linears(&mut f)?;
            layer.mlp.map_linears(&mut f)?;
        }
        if let Some(head) = &self.lm_head {
            self.lm_head = Some(f(head)?);
        }
        Ok(())
    }

    pub fn linears(&self) -> Vec<(String, &Linear)> {
        named_linears(self.layers.iter().map(|l| (&l.self_attn, &l.mlp)), self.lm_head.as_ref())
    }

    pub fn weights(&self) -> Result<WeightMap, ModelError> {
        let mut out = WeightMap::new();
        self.embed_tokens.store("model.embed_tokens", &mut out);
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            for (name, norm) in [
                ("input_layernorm", &layer.input_layernorm),
                ("post_attention_layernorm", &layer.post_attention_layernorm),
                ("pre_feedforward_layernorm", &layer.pre_feedforward_layernorm),
                ("post_feedforward_layernorm", &layer.post_feedforward_layernorm),
            ] {
                norm.store(&format!("{p}.{name}"), &mut out)?;
            }
            layer.self_attn.store(&format!("{p}.self_attn"), &mut out)?;
            layer.mlp.store(&format!("{p}.mlp"), &mut out);
        }
        self.norm.store("model.norm", &mut out)?;
        if let Some(head) = &self.lm_head {
            head.store("lm_head", &mut out);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::round_to_bf16;

    #[test]
    fn bf16_rounding_matches_the_reference_scale() {
        // mx.array(640 ** 0.5, mx.bfloat16) == 25.25 (gemma-3-270m's hidden size).
        assert_eq!(round_to_bf16(640f32.sqrt()), 25.25);
        assert_eq!(round_to_bf16(1.0), 1.0);
    }
}
