//! The Llama decoder (mlx-lm's `models/llama.py`), which also serves
//! SmolLM/SmolLM2, Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k
//! RMSNorm): pre-norm blocks of grouped-query attention with RoPE and a SwiGLU
//! MLP.

use mlx_rs::Array;

use super::ModelError;
use super::args::{Architecture, ModelArgs};
use super::attention::AttentionMask;
use super::kv_cache::KvCache;
use super::layers::{Embedding, RmsNorm, Rope};
use super::linear::{Linear, ProjectionAdapter};
use super::sublayers::{Attention, GateActivation, Mlp};
use super::transformer::{Block, Transformer};
use super::weights::WeightMap;

/// A pre-norm block: `h + attn(norm(h))`, then `h + mlp(norm(h))`.
#[derive(Debug, Clone)]
pub struct LlamaBlock {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl Block for LlamaBlock {
    fn forward(&self, h: &Array, mask: &AttentionMask, cache: Option<&mut KvCache>, adapter: Option<&dyn ProjectionAdapter>) -> Result<Array, ModelError> {
        let h = h.add(self.self_attn.forward(&self.input_layernorm.forward(h)?, mask, cache, adapter)?)?;
        Ok(h.add(self.mlp.forward(&self.post_attention_layernorm.forward(&h)?, adapter)?)?)
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
        None
    }

    fn store_norms(&self, prefix: &str, out: &mut WeightMap) -> Result<(), ModelError> {
        self.input_layernorm.store(&format!("{prefix}.input_layernorm"), out)?;
        self.post_attention_layernorm.store(&format!("{prefix}.post_attention_layernorm"), out)
    }
}

pub type Llama = Transformer<LlamaBlock>;

/// Builds a Llama-family model from mlx-lm-named weights, checking every
/// shape and that no tensor is left over.
pub fn build(args: ModelArgs, mut weights: WeightMap) -> Result<Llama, ModelError> {
    args.validate()?;
    let arch = args.architecture()?;
    let (dim, eps) = (args.hidden_size, args.rms_norm_eps);
    let rope = Rope::new(args.head_dim(), args.rope_traditional, args.rope_theta, args.rope_scaling.as_ref())?;
    let embed_tokens = Embedding::take(&mut weights, "model.embed_tokens", args.vocab_size, dim)?;
    let layers = (0..args.num_hidden_layers)
        .map(|i| {
            let p = format!("model.layers.{i}");
            Ok(LlamaBlock {
                input_layernorm: RmsNorm::take(&mut weights, &format!("{p}.input_layernorm"), dim, eps, false)?,
                self_attn: Attention::take(&mut weights, &format!("{p}.self_attn"), &args, arch, rope.clone())?,
                post_attention_layernorm: RmsNorm::take(&mut weights, &format!("{p}.post_attention_layernorm"), dim, eps, false)?,
                mlp: Mlp::take(&mut weights, &format!("{p}.mlp"), dim, args.intermediate_size, args.mlp_bias, GateActivation::Silu)?,
            })
        })
        .collect::<Result<Vec<_>, ModelError>>()?;
    let norm = RmsNorm::take(&mut weights, "model.norm", dim, eps, false)?;
    let lm_head = take_output_head(&mut weights, &args)?;
    Ok(Transformer {
        args,
        embed_tokens,
        layers,
        norm,
        lm_head,
        embed_scale: 1.0,
    })
}

/// The separate output head if the weights have one; `None` means tied to the
/// embedding (which the config must allow). Then checks nothing is left over.
pub(crate) fn take_output_head(weights: &mut WeightMap, args: &ModelArgs) -> Result<Option<Linear>, ModelError> {
    let lm_head = if weights.contains("lm_head.weight") {
        Some(Linear::take(weights, "lm_head", args.vocab_size, args.hidden_size, false)?)
    } else if args.tie_word_embeddings || args.architecture()? == Architecture::Gemma3 {
        None
    } else {
        return Err(ModelError::MissingTensor("lm_head.weight".into()));
    };
    // Precomputed rotary tables some exporters include are not weights.
    let leftovers: Vec<String> = weights.names().filter(|n| n.contains("rotary_emb.inv_freq")).map(str::to_owned).collect();
    for name in leftovers {
        weights.take_optional(&name);
    }
    weights.expect_consumed()?;
    Ok(lm_head)
}
