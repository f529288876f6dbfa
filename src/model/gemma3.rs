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
use super::linear::ProjectionAdapter;
use super::llama::take_output_head;
use super::sublayers::{Attention, GateActivation, Mlp};
use super::transformer::{Block, Transformer};
use super::weights::WeightMap;
use super::ModelError;

/// Norms around both halves: `h + post(attn(pre(h)))`, then
/// `h + post_ff(mlp(pre_ff(h)))`.
#[derive(Debug, Clone)]
pub struct Gemma3Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub pre_feedforward_layernorm: RmsNorm,
    pub post_feedforward_layernorm: RmsNorm,
    pub mlp: Mlp,
    /// The sliding window of a local layer; `None` on global layers.
    pub window: Option<i32>,
}

impl Block for Gemma3Block {
    fn forward(&self, h: &Array, mask: &AttentionMask, cache: Option<&mut KvCache>, adapter: Option<&dyn ProjectionAdapter>) -> Result<Array, ModelError> {
        let attn = self.self_attn.forward(&self.input_layernorm.forward(h)?, mask, cache, adapter)?;
        let h = h.add(self.post_attention_layernorm.forward(&attn)?)?;
        let mlp = self.mlp.forward(&self.pre_feedforward_layernorm.forward(&h)?, adapter)?;
        Ok(h.add(self.post_feedforward_layernorm.forward(&mlp)?)?)
    }

    fn attention(&self) -> &Attention {
        &self.self_attn
    }

    fn mlp(&self) -> &Mlp {
        &self.mlp
    }

    fn parts_mut(&mut self) -> (&mut Attention, &mut Mlp) {
        (&mut self.self_attn, &mut self.mlp)
    }

    fn window(&self) -> Option<i32> {
        self.window
    }

    fn store_norms(&self, prefix: &str, out: &mut WeightMap) -> Result<(), ModelError> {
        for (name, norm) in [
            ("input_layernorm", &self.input_layernorm),
            ("post_attention_layernorm", &self.post_attention_layernorm),
            ("pre_feedforward_layernorm", &self.pre_feedforward_layernorm),
            ("post_feedforward_layernorm", &self.post_feedforward_layernorm),
        ] {
            norm.store(&format!("{prefix}.{name}"), out)?;
        }
        Ok(())
    }
}

pub type Gemma3 = Transformer<Gemma3Block>;

/// Rounds to the nearest bfloat16 (ties to even), kept as f32.
fn round_to_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
    f32::from_bits(rounded)
}

pub fn build(args: ModelArgs, mut weights: WeightMap) -> Result<Gemma3, ModelError> {
    args.validate()?;
    let (dim, eps) = (args.hidden_size, args.rms_norm_eps);
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
            Ok(Gemma3Block {
                input_layernorm: norm(&mut weights, "input_layernorm")?,
                self_attn: Attention::take(&mut weights, &format!("{p}.self_attn"), &args, Architecture::Gemma3, rope)?,
                post_attention_layernorm: norm(&mut weights, "post_attention_layernorm")?,
                pre_feedforward_layernorm: norm(&mut weights, "pre_feedforward_layernorm")?,
                post_feedforward_layernorm: norm(&mut weights, "post_feedforward_layernorm")?,
                mlp: Mlp::take(&mut weights, &format!("{p}.mlp"), dim, args.intermediate_size, false, GateActivation::GeluApprox)?,
                window: sliding.then_some(window),
            })
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    let norm = RmsNorm::take(&mut weights, "model.norm", dim, eps, true)?;
    let lm_head = take_output_head(&mut weights, &args)?;
    Ok(Transformer {
        // The reference multiplies by √hidden rounded to bfloat16.
        embed_scale: round_to_bf16((dim as f32).sqrt()),
        args,
        embed_tokens,
        layers,
        norm,
        lm_head,
    })
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
