//! The Llama decoder (mlx-lm's `models/llama.py`), which also serves
//! SmolLM/SmolLM2, Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k
//! RMSNorm): pre-norm blocks of grouped-query attention with RoPE and a SwiGLU
//! MLP.

use mlx_rs::Array;

use super::args::{Architecture, ModelArgs};
use super::attention::{AttentionMask, attend};
use super::kv_cache::KvCache;
use super::layers::{Embedding, RmsNorm, Rope};
use super::linear::Linear;
use super::weights::WeightMap;
use super::ModelError;

#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub n_heads: i32,
    pub n_kv_heads: i32,
    pub head_dim: i32,
    pub scale: f32,
    pub rope: Rope,
}

impl Attention {
    fn take(weights: &mut WeightMap, prefix: &str, args: &ModelArgs, arch: Architecture) -> Result<Self, ModelError> {
        let (dim, heads, kv_heads, head_dim) = (args.hidden_size, args.num_attention_heads, args.num_kv_heads(), args.head_dim());
        let qkv_bias = args.attention_bias || arch == Architecture::Qwen2;
        let (q_norm, k_norm) = if arch == Architecture::Qwen3 {
            (
                Some(RmsNorm::take(weights, &format!("{prefix}.q_norm"), head_dim, args.rms_norm_eps, false)?),
                Some(RmsNorm::take(weights, &format!("{prefix}.k_norm"), head_dim, args.rms_norm_eps, false)?),
            )
        } else {
            (None, None)
        };
        Ok(Self {
            q_proj: Linear::take(weights, &format!("{prefix}.q_proj"), heads * head_dim, dim, qkv_bias)?,
            k_proj: Linear::take(weights, &format!("{prefix}.k_proj"), kv_heads * head_dim, dim, qkv_bias)?,
            v_proj: Linear::take(weights, &format!("{prefix}.v_proj"), kv_heads * head_dim, dim, qkv_bias)?,
            o_proj: Linear::take(weights, &format!("{prefix}.o_proj"), dim, heads * head_dim, args.attention_bias)?,
            q_norm,
            k_norm,
            n_heads: heads,
            n_kv_heads: kv_heads,
            head_dim,
            scale: (head_dim as f32).powf(-0.5),
            rope: Rope::new(head_dim, args.rope_traditional, args.rope_theta, args.rope_scaling.as_ref())?,
        })
    }

    fn forward(&self, x: &Array, mask: &AttentionMask, cache: Option<&mut KvCache>) -> Result<Array, ModelError> {
        let (batch, len) = (x.shape()[0], x.shape()[1]);
        let heads = |proj: &Linear, n: i32, norm: Option<&RmsNorm>| -> Result<Array, ModelError> {
            let mut h = proj.forward(x)?.reshape(&[batch, len, n, self.head_dim])?;
            if let Some(norm) = norm {
                h = norm.forward(&h)?;
            }
            Ok(h.transpose_axes(&[0, 2, 1, 3])?)
        };
        let q = heads(&self.q_proj, self.n_heads, self.q_norm.as_ref())?;
        let k = heads(&self.k_proj, self.n_kv_heads, self.k_norm.as_ref())?;
        let v = heads(&self.v_proj, self.n_kv_heads, None)?;
        let offset = cache.as_ref().map_or(0, |c| c.offset());
        let q = self.rope.forward(&q, offset)?;
        let k = self.rope.forward(&k, offset)?;
        let (k, v) = match cache {
            Some(cache) => cache.update(k, v)?,
            None => (k, v),
        };
        let out = attend(&q, &k, &v, self.scale, mask)?
            .transpose_axes(&[0, 2, 1, 3])?
            .reshape(&[batch, len, self.n_heads * self.head_dim])?;
        self.o_proj.forward(&out)
    }

    fn store(&self, prefix: &str, out: &mut WeightMap) {
        self.q_proj.store(&format!("{prefix}.q_proj"), out);
        self.k_proj.store(&format!("{prefix}.k_proj"), out);
        self.v_proj.store(&format!("{prefix}.v_proj"), out);
        self.o_proj.store(&format!("{prefix}.o_proj"), out);
        if let (Some(q), Some(k)) = (&self.q_norm, &self.k_norm) {
            out.insert(format!("{prefix}.q_norm.weight"), q.weight.clone());
            out.insert(format!("{prefix}.k_norm.weight"), k.weight.clone());
        }
    }
}

/// SwiGLU: `down(silu(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub(crate) fn take(weights: &mut WeightMap, prefix: &str, dim: i32, hidden: i32, bias: bool) -> Result<Self, ModelError> {
        Ok(Self {
            gate_proj: Linear::take(weights, &format!("{prefix}.gate_proj"), hidden, dim, bias)?,
            up_proj: Linear::take(weights, &format!("{prefix}.up_proj"), hidden, dim, bias)?,
            down_proj: Linear::take(weights, &format!("{prefix}.down_proj"), dim, hidden, bias)?,
        })
    }

    fn forward(&self, x: &Array) -> Result<Array, ModelError> {
        let gate = mlx_rs::nn::silu(self.gate_proj.forward(x)?)?;
        self.down_proj.forward(&gate.multiply(self.up_proj.forward(x)?)?)
    }

    pub(crate) fn store(&self, prefix: &str, out: &mut WeightMap) {
        self.gate_proj.store(&format!("{prefix}.gate_proj"), out);
        self.up_proj.store(&format!("{prefix}.up_proj"), out);
        self.down_proj.store(&format!("{prefix}.down_proj"), out);
    }

    pub(crate) fn map_linears(&mut self, f: &mut impl FnMut(&Linear) -> Result<Linear, ModelError>) -> Result<(), ModelError> {
        self.gate_proj = f(&self.gate_proj)?;
        self.up_proj = f(&self.up_proj)?;
        self.down_proj = f(&self.down_proj)?;
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

#[derive(Debug, Clone)]
pub struct Llama {
    pub args: ModelArgs,
    pub embed_tokens: Embedding,
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    /// `None` when the output head is tied to the embedding.
    pub lm_head: Option<Linear>,
}

impl Llama {
    /// Builds the model from mlx-lm-named weights, checking every shape and
    /// that no tensor is left over.
    pub fn from_weights(args: ModelArgs, mut weights: WeightMap) -> Result<Self, ModelError> {
        args.validate()?;
        let arch = args.architecture()?;
        let eps = args.rms_norm_eps;
        let embed_tokens = Embedding::take(&mut weights, "model.embed_tokens", args.vocab_size, args.hidden_size)?;
        let layers = (0..args.num_hidden_layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                Ok(Block {
                    input_layernorm: RmsNorm::take(&mut weights, &format!("{p}.input_layernorm"), args.hidden_size, eps, false)?,
                    self_attn: Attention::take(&mut weights, &format!("{p}.self_attn"), &args, arch)?,
                    post_attention_layernorm: RmsNorm::take(&mut weights, &format!("{p}.post_attention_layernorm"), args.hidden_size, eps, false)?,
                    mlp: Mlp::take(&mut weights, &format!("{p}.mlp"), args.hidden_size, args.intermediate_size, args.mlp_bias)?,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?;
        let norm = RmsNorm::take(&mut weights, "model.norm", args.hidden_size, eps, false)?;
        let lm_head = if weights.contains("lm_head.weight") {
            Some(Linear::take(&mut weights, "lm_head", args.vocab_size, args.hidden_size, false)?)
        } else if args.tie_word_embeddings {
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
        Ok(Self {
            args,
            embed_tokens,
            layers,
            norm,
            lm_head,
        })
    }

    /// Logits `[batch, len, vocab]` for `tokens` `[batch, len]`. With `caches`
    /// (one per layer) the tokens continue the cached sequence.
    pub fn forward(&self, tokens: &Array, mut caches: Option<&mut [KvCache]>, key_padding: Option<&Array>) -> Result<Array, ModelError> {
        let len = tokens.shape()[1];
        let offset = caches.as_deref().and_then(|c| c.first()).map_or(0, KvCache::offset);
        let mask = AttentionMask::build(len, offset, None, key_padding)?;
        let mut h = self.embed_tokens.forward(tokens)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            let attn = layer.self_attn.forward(&layer.input_layernorm.forward(&h)?, &mask, cache)?;
            h = h.add(attn)?;
            let mlp = layer.mlp.forward(&layer.post_attention_layernorm.forward(&h)?)?;
            h = h.add(mlp)?;
        }
        let h = self.norm.forward(&h)?;
        match &self.lm_head {
            Some(head) => head.forward(&h),
            None => self.embed_tokens.as_linear(&h),
        }
    }

    /// Applies `f` to every projection (attention and MLP) and the output head.
    pub fn map_linears(&mut self, mut f: impl FnMut(&Linear) -> Result<Linear, ModelError>) -> Result<(), ModelError> {
        for layer in &mut self.layers {
            let a = &mut layer.self_attn;
            a.q_proj = f(&a.q_proj)?;
            a.k_proj = f(&a.k_proj)?;
            a.v_proj = f(&a.v_proj)?;
            a.o_proj = f(&a.o_proj)?;
            layer.mlp.map_linears(&mut f)?;
        }
        if let Some(head) = &self.lm_head {
            self.lm_head = Some(f(head)?);
        }
        Ok(())
    }

    /// The weights under mlx-lm's names (what `export` writes).
    pub fn weights(&self) -> WeightMap {
        let mut out = WeightMap::new();
        self.embed_tokens.store("model.embed_tokens", &mut out);
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.insert(format!("{p}.input_layernorm.weight"), layer.input_layernorm.weight.clone());
            out.insert(format!("{p}.post_attention_layernorm.weight"), layer.post_attention_layernorm.weight.clone());
            layer.self_attn.store(&format!("{p}.self_attn"), &mut out);
            layer.mlp.store(&format!("{p}.mlp"), &mut out);
        }
        out.insert("model.norm.weight".into(), self.norm.weight.clone());
        if let Some(head) = &self.lm_head {
            head.store("lm_head", &mut out);
        }
        out
    }
}
