//! The decoder skeleton every architecture shares: embed, run the blocks,
//! normalize, project to the vocabulary. An architecture supplies its block
//! type (llama.rs, gemma3.rs) and, where it needs one, an embedding scale.

use std::fmt::Debug;

use mlx_rs::Array;

use super::attention::{AttentionMask, Layout};
use super::kv_cache::KvCache;
use super::layers::{Embedding, RmsNorm};
use super::linear::{Linear, ProjectionAdapter};
use super::sublayers::{Attention, Mlp};
use super::weights::WeightMap;
use super::{CausalLm, ModelArgs, ModelError};

/// One transformer block of an architecture.
pub trait Block: Clone + Debug {
    /// `h` after this block; `cache` holds the earlier positions.
    fn forward(&self, h: &Array, mask: &AttentionMask, cache: Option<&mut KvCache>, adapter: Option<&dyn ProjectionAdapter>) -> Result<Array, ModelError>;
    fn attention(&self) -> &Attention;
    fn mlp(&self) -> &Mlp;
    /// Both at once, mutably (for swapping projections, e.g. LoRA).
    fn parts_mut(&mut self) -> (&mut Attention, &mut Mlp);
    /// The sliding attention window of a local layer; `None` for global attention.
    fn window(&self) -> Option<i32>;
    /// Writes the block's norm weights under `prefix` (`model.layers.{i}`).
    fn store_norms(&self, prefix: &str, out: &mut WeightMap) -> Result<(), ModelError>;
}

#[derive(Debug, Clone)]
pub struct Transformer<B: Block> {
    pub args: ModelArgs,
    pub embed_tokens: Embedding,
    pub layers: Vec<B>,
    pub norm: RmsNorm,
    /// `None` when the output head is tied to the embedding.
    pub lm_head: Option<Linear>,
    /// Factor on the token embeddings (Gemma: √hidden), else 1.
    pub embed_scale: f32,
}

impl<B: Block> CausalLm for Transformer<B> {
    fn args(&self) -> &ModelArgs {
        &self.args
    }

    fn hidden(
        &self,
        tokens: &Array,
        mut caches: Option<&mut [KvCache]>,
        layout: Layout<'_>,
        adapter: Option<&dyn ProjectionAdapter>,
    ) -> Result<Array, ModelError> {
        let len = tokens.shape()[1];
        let offset = caches.as_deref().and_then(|c| c.first()).map_or(0, KvCache::offset);
        let window = self.layers.iter().find_map(Block::window);
        let (global_mask, local_mask) = match layout {
            Layout::Rows { key_padding } => (
                AttentionMask::build(len, offset, None, key_padding)?,
                window.map(|w| AttentionMask::build(len, offset, Some(w), key_padding)).transpose()?,
            ),
            Layout::Packed(rows) => {
                if caches.is_some() {
                    return Err(ModelError::BadInput("packed rows cannot use a KV cache".into()));
                }
                (AttentionMask::packed(rows, None)?, window.map(|w| AttentionMask::packed(rows, Some(w))).transpose()?)
            }
        };
        let mut h = self.embed_tokens.forward(tokens)?;
        if self.embed_scale != 1.0 {
            h = h.multiply(Array::from_f32(self.embed_scale).as_dtype(h.dtype())?)?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            let mask = match (layer.window(), &local_mask) {
                (Some(_), Some(local)) => local,
                _ => &global_mask,
            };
            h = layer.forward(&h, mask, cache, adapter)?;
        }
        self.norm.forward(&h)
    }

    fn head(&self, h: &Array, adapter: Option<&dyn ProjectionAdapter>) -> Result<Array, ModelError> {
        match &self.lm_head {
            Some(head) => head.forward_adapted(h, adapter),
            None => self.embed_tokens.as_linear(h),
        }
    }

    fn embed_tokens(&self) -> &Embedding {
        &self.embed_tokens
    }

    fn embed_tokens_mut(&mut self) -> &mut Embedding {
        &mut self.embed_tokens
    }

    fn blocks(&self) -> Vec<(&Attention, &Mlp)> {
        self.layers.iter().map(|l| (l.attention(), l.mlp())).collect()
    }

    fn blocks_mut(&mut self) -> Vec<(&mut Attention, &mut Mlp)> {
        self.layers.iter_mut().map(Block::parts_mut).collect()
    }

    fn lm_head(&self) -> Option<&Linear> {
        self.lm_head.as_ref()
    }

    fn lm_head_mut(&mut self) -> Option<&mut Linear> {
        self.lm_head.as_mut()
    }

    fn store_norms(&self, out: &mut WeightMap) -> Result<(), ModelError> {
        for (i, layer) in self.layers.iter().enumerate() {
            layer.store_norms(&format!("model.layers.{i}"), out)?;
        }
        self.norm.store("model.norm", out)
    }
}
