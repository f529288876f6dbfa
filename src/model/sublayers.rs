//! The two halves every architecture's decoder block is built from:
//! grouped-query attention with RoPE (optional q/k norms and biases), and a
//! gated MLP. `llama.rs` and `gemma3.rs` arrange them into blocks;
//! `transformer.rs` runs the blocks.

use mlx_rs::Array;

use super::ModelError;
use super::args::{Architecture, ModelArgs};
use super::attention::{AttentionMask, attend};
use super::kv_cache::KvCache;
use super::layers::{RmsNorm, Rope};
use super::linear::{Linear, ProjectionAdapter};
use super::weights::WeightMap;

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
    /// The attention of `arch`: Qwen2 adds q/k/v biases, Qwen3 and Gemma 3
    /// normalize q and k per head (Gemma with `1 + weight`), and Gemma 3
    /// scales by `query_pre_attn_scalar`.
    pub(crate) fn take(weights: &mut WeightMap, prefix: &str, args: &ModelArgs, arch: Architecture, rope: Rope) -> Result<Self, ModelError> {
        let (dim, heads, kv_heads, head_dim) = (args.hidden_size, args.num_attention_heads, args.num_kv_heads(), args.head_dim());
        let qkv_bias = args.attention_bias || arch == Architecture::Qwen2;
        let (q_norm, k_norm) = if matches!(arch, Architecture::Qwen3 | Architecture::Gemma3) {
            let gemma = arch == Architecture::Gemma3;
            (
                Some(RmsNorm::take(weights, &format!("{prefix}.q_norm"), head_dim, args.rms_norm_eps, gemma)?),
                Some(RmsNorm::take(weights, &format!("{prefix}.k_norm"), head_dim, args.rms_norm_eps, gemma)?),
            )
        } else {
            (None, None)
        };
        let scale = match (arch, args.query_pre_attn_scalar) {
            (Architecture::Gemma3, Some(scalar)) if scalar > 0.0 => scalar.powf(-0.5),
            _ => (head_dim as f32).powf(-0.5),
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
            scale,
            rope,
        })
    }

    pub(crate) fn forward(&self, x: &Array, mask: &AttentionMask, cache: Option<&mut KvCache>, adapter: Option<&dyn ProjectionAdapter>) -> Result<Array, ModelError> {
        let (batch, len) = (x.shape()[0], x.shape()[1]);
        let heads = |proj: &Linear, n: i32, norm: Option<&RmsNorm>| -> Result<Array, ModelError> {
            let mut h = proj.forward_adapted(x, adapter)?.reshape(&[batch, len, n, self.head_dim])?;
            if let Some(norm) = norm {
                h = norm.forward(&h)?;
            }
            Ok(h.transpose_axes(&[0, 2, 1, 3])?)
        };
        let q = heads(&self.q_proj, self.n_heads, self.q_norm.as_ref())?;
        let k = heads(&self.k_proj, self.n_kv_heads, self.k_norm.as_ref())?;
        let v = heads(&self.v_proj, self.n_kv_heads, None)?;
        let (q, k) = match mask {
            AttentionMask::Packed { positions, .. } => (self.rope.forward_at(&q, positions)?, self.rope.forward_at(&k, positions)?),
            _ => {
                let offset = cache.as_ref().map_or(0, |c| c.offset());
                (self.rope.forward(&q, offset)?, self.rope.forward(&k, offset)?)
            }
        };
        let (k, v) = match cache {
            Some(cache) => cache.update(k, v)?,
            None => (k, v),
        };
        let out = attend(&q, &k, &v, self.scale, mask)?
            .transpose_axes(&[0, 2, 1, 3])?
            .reshape(&[batch, len, self.n_heads * self.head_dim])?;
        self.o_proj.forward_adapted(&out, adapter)
    }

    pub(crate) fn store(&self, prefix: &str, out: &mut WeightMap) -> Result<(), ModelError> {
        self.q_proj.store(&format!("{prefix}.q_proj"), out);
        self.k_proj.store(&format!("{prefix}.k_proj"), out);
        self.v_proj.store(&format!("{prefix}.v_proj"), out);
        self.o_proj.store(&format!("{prefix}.o_proj"), out);
        if let (Some(q), Some(k)) = (&self.q_norm, &self.k_norm) {
            q.store(&format!("{prefix}.q_norm"), out)?;
            k.store(&format!("{prefix}.k_norm"), out)?;
        }
        Ok(())
    }

    /// The four projections with their names under the block's `self_attn`.
    pub(crate) fn linears(&self) -> [(&'static str, &Linear); 4] {
        [("q_proj", &self.q_proj), ("k_proj", &self.k_proj), ("v_proj", &self.v_proj), ("o_proj", &self.o_proj)]
    }

    pub(crate) fn map_linears(&mut self, f: &mut impl FnMut(&Linear) -> Result<Linear, ModelError>) -> Result<(), ModelError> {
        self.q_proj = f(&self.q_proj)?;
        self.k_proj = f(&self.k_proj)?;
        self.v_proj = f(&self.v_proj)?;
        self.o_proj = f(&self.o_proj)?;
        Ok(())
    }
}

/// The gate's activation in a gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateActivation {
    /// SwiGLU (Llama, Qwen, Mistral).
    Silu,
    /// GeGLU with the tanh approximation (Gemma).
    GeluApprox,
}

/// Gated MLP: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub activation: GateActivation,
}

impl Mlp {
    pub(crate) fn take(weights: &mut WeightMap, prefix: &str, dim: i32, hidden: i32, bias: bool, activation: GateActivation) -> Result<Self, ModelError> {
        Ok(Self {
            gate_proj: Linear::take(weights, &format!("{prefix}.gate_proj"), hidden, dim, bias)?,
            up_proj: Linear::take(weights, &format!("{prefix}.up_proj"), hidden, dim, bias)?,
            down_proj: Linear::take(weights, &format!("{prefix}.down_proj"), dim, hidden, bias)?,
            activation,
        })
    }

    pub(crate) fn forward(&self, x: &Array, adapter: Option<&dyn ProjectionAdapter>) -> Result<Array, ModelError> {
        let gate = self.gate_proj.forward_adapted(x, adapter)?;
        let gate = match self.activation {
            GateActivation::Silu => mlx_rs::nn::silu(gate)?,
            GateActivation::GeluApprox => mlx_rs::nn::gelu_approximate(gate)?,
        };
        self.down_proj.forward_adapted(&gate.multiply(self.up_proj.forward_adapted(x, adapter)?)?, adapter)
    }

    pub(crate) fn store(&self, prefix: &str, out: &mut WeightMap) {
        self.gate_proj.store(&format!("{prefix}.gate_proj"), out);
        self.up_proj.store(&format!("{prefix}.up_proj"), out);
        self.down_proj.store(&format!("{prefix}.down_proj"), out);
    }

    pub(crate) fn linears(&self) -> [(&'static str, &Linear); 3] {
        [("gate_proj", &self.gate_proj), ("up_proj", &self.up_proj), ("down_proj", &self.down_proj)]
    }

    pub(crate) fn map_linears(&mut self, f: &mut impl FnMut(&Linear) -> Result<Linear, ModelError>) -> Result<(), ModelError> {
        self.gate_proj = f(&self.gate_proj)?;
        self.up_proj = f(&self.up_proj)?;
        self.down_proj = f(&self.down_proj)?;
        Ok(())
    }
}
