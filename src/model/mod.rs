//! Language models in MLX: the decoder architectures, loading from GGUF files,
//! Hugging Face folders and the built-in `tiny` model, tokenizers and chat
//! templates, and text generation. This layer knows nothing of training loops
//! or the network.

pub mod args;
pub mod attention;
pub mod chat;
pub mod export;
pub mod gemma3;
pub mod generate;
pub mod hub;
pub mod gguf;
pub mod gguf_header;
pub mod gguf_quants;
pub mod gguf_write;
pub mod kv_cache;
pub mod layers;
pub mod linear;
pub mod llama;
pub mod load;
pub mod softmax;
pub mod sublayers;
pub mod thread;
pub mod tiny;
pub mod tokenizer;
pub mod transformer;
pub mod weights;

use mlx_rs::{Array, Dtype};

pub use args::{Architecture, ModelArgs};
pub use kv_cache::KvCache;
pub use load::{LoadOptions, LoadedModel, QuantMode, load_model};
pub use tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported model architecture `{0}` (supported: llama, mistral, smollm, qwen2, qwen3, gemma3_text)")]
    UnsupportedArchitecture(String),
    #[error("bad model config: {0}")]
    BadConfig(String),
    #[error("the weights have no tensor `{0}`: wrong architecture, or an incomplete or corrupt file")]
    MissingTensor(String),
    #[error("the weights have {count} tensor(s) this architecture does not use, e.g. `{name}`: wrong architecture or config")]
    UnexpectedTensor { name: String, count: usize },
    #[error("tensor `{name}` has shape {actual:?}, but the config says {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<i32>,
        actual: Vec<i32>,
    },
    #[error("{0}")]
    BadInput(String),
    #[error("cannot read model {path}: {message}")]
    Load { path: String, message: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    ChatTemplate(String),
    #[error("MLX: {0}")]
    Mlx(#[from] mlx_rs::error::Exception),
    #[error("MLX value conversion: {0}")]
    Conversion(#[from] mlx_rs::error::ConversionError),
}

/// What every architecture provides; the rest (quantization, weight export,
/// the list of projections for LoRA) is built on it once, in `Decoder`.
pub trait CausalLm {
    fn args(&self) -> &ModelArgs;
    /// The final (normalized) hidden states `[batch, len, hidden]` for
    /// `tokens` `[batch, len]`.
    fn hidden(
        &self,
        tokens: &Array,
        caches: Option<&mut [KvCache]>,
        layout: attention::Layout<'_>,
        adapter: Option<&dyn linear::ProjectionAdapter>,
    ) -> Result<Array, ModelError>;
    /// Logits `[…, vocab]` of hidden states `[…, hidden]`.
    fn head(&self, h: &Array, adapter: Option<&dyn linear::ProjectionAdapter>) -> Result<Array, ModelError>;
    fn embed_tokens(&self) -> &layers::Embedding;
    fn embed_tokens_mut(&mut self) -> &mut layers::Embedding;
    /// The attention and MLP of each block, in order.
    fn blocks(&self) -> Vec<(&sublayers::Attention, &sublayers::Mlp)>;
    fn blocks_mut(&mut self) -> Vec<(&mut sublayers::Attention, &mut sublayers::Mlp)>;
    /// The separate output head; `None` when tied to the embedding.
    fn lm_head(&self) -> Option<&linear::Linear>;
    fn lm_head_mut(&mut self) -> Option<&mut linear::Linear>;
    /// Writes every RMSNorm weight, as the checkpoint names and stores it.
    fn store_norms(&self, out: &mut weights::WeightMap) -> Result<(), ModelError>;
}

/// A decoder-only language model of one of the supported architectures.
#[derive(Debug, Clone)]
pub enum Decoder {
    Llama(llama::Llama),
    Gemma3(gemma3::Gemma3),
}

impl Decoder {
    pub fn from_weights(args: ModelArgs, weights: weights::WeightMap) -> Result<Self, ModelError> {
        match args.architecture()? {
            Architecture::Llama | Architecture::Qwen2 | Architecture::Qwen3 => Ok(Decoder::Llama(llama::build(args, weights)?)),
            Architecture::Gemma3 => Ok(Decoder::Gemma3(gemma3::build(args, weights)?)),
        }
    }

    fn model(&self) -> &dyn CausalLm {
        match self {
            Decoder::Llama(m) => m,
            Decoder::Gemma3(m) => m,
        }
    }

    fn model_mut(&mut self) -> &mut dyn CausalLm {
        match self {
            Decoder::Llama(m) => m,
            Decoder::Gemma3(m) => m,
        }
    }

    pub fn args(&self) -> &ModelArgs {
        self.model().args()
    }

    pub fn num_layers(&self) -> usize {
        self.model().blocks().len()
    }

    /// A fresh, empty cache for each layer.
    pub fn new_cache(&self) -> Vec<KvCache> {
        (0..self.num_layers()).map(|_| KvCache::new()).collect()
    }

    /// Logits `[batch, len, vocab]` for `tokens` `[batch, len]` (int32).
    pub fn forward(&self, tokens: &Array, caches: Option<&mut [KvCache]>, key_padding: Option<&Array>) -> Result<Array, ModelError> {
        self.forward_adapted(tokens, caches, attention::Layout::Rows { key_padding }, None)
    }

    /// `forward` with `adapter` (LoRA, DoRA) applied to the projections.
    pub fn forward_adapted(
        &self,
        tokens: &Array,
        caches: Option<&mut [KvCache]>,
        layout: attention::Layout<'_>,
        adapter: Option<&dyn linear::ProjectionAdapter>,
    ) -> Result<Array, ModelError> {
        let h = self.hidden_states(tokens, caches, layout, adapter)?;
        self.logits(&h, adapter)
    }

    /// The final hidden states `[batch, len, hidden]`, before the output
    /// head: the trainer takes the head only where a target counts.
    pub fn hidden_states(
        &self,
        tokens: &Array,
        caches: Option<&mut [KvCache]>,
        layout: attention::Layout<'_>,
        adapter: Option<&dyn linear::ProjectionAdapter>,
    ) -> Result<Array, ModelError> {
        if tokens.ndim() != 2 {
            return Err(ModelError::BadInput(format!("tokens must be [batch, len], got {:?}", tokens.shape())));
        }
        if let Some(caches) = &caches
            && caches.len() != self.num_layers()
        {
            return Err(ModelError::BadInput(format!("{} caches for {} layers", caches.len(), self.num_layers())));
        }
        self.model().hidden(tokens, caches, layout, adapter)
    }

    /// Logits `[…, vocab]` of final hidden states `[…, hidden]`.
    pub fn logits(&self, h: &Array, adapter: Option<&dyn linear::ProjectionAdapter>) -> Result<Array, ModelError> {
        self.model().head(h, adapter)
    }

    /// Every projection with its mlx-lm module path, the output head last.
    pub fn linears(&self) -> Vec<(String, &linear::Linear)> {
        let model = self.model();
        let mut out = Vec::new();
        for (i, (attn, mlp)) in model.blocks().into_iter().enumerate() {
            for (name, linear) in attn.linears() {
                out.push((format!("model.layers.{i}.self_attn.{name}"), linear));
            }
            for (name, linear) in mlp.linears() {
                out.push((format!("model.layers.{i}.mlp.{name}"), linear));
            }
        }
        if let Some(head) = model.lm_head() {
            out.push(("lm_head".to_owned(), head));
        }
        out
    }

    /// Replaces every projection (and the output head) with `f` of it.
    pub fn map_linears(&mut self, mut f: impl FnMut(&linear::Linear) -> Result<linear::Linear, ModelError>) -> Result<(), ModelError> {
        let model = self.model_mut();
        for (attn, mlp) in model.blocks_mut() {
            attn.map_linears(&mut f)?;
            mlp.map_linears(&mut f)?;
        }
        if let Some(head) = model.lm_head_mut() {
            *head = f(head)?;
        }
        Ok(())
    }

    /// Replaces every quantized projection and the embedding with float weights.
    pub fn dequantize(&mut self, dtype: Dtype) -> Result<(), ModelError> {
        let embedding = self.model().embed_tokens().dequantized(dtype)?;
        *self.model_mut().embed_tokens_mut() = embedding;
        self.map_linears(|l| l.dequantized(dtype))
    }

    /// The same model with every float array (weights, norms, biases,
    /// quantization scales and biases) in `dtype`; packed quantized words
    /// stay as they are. Activations then flow in `dtype`.
    pub fn with_float_dtype(&self, dtype: Dtype) -> Result<Self, ModelError> {
        let is_float = |array: &Array| matches!(array.dtype(), Dtype::Float32 | Dtype::Float16 | Dtype::Bfloat16);
        let weights = self
            .weights()?
            .into_inner()
            .into_iter()
            .map(|(name, array)| Ok((name, if is_float(&array) { array.as_dtype(dtype)? } else { array })))
            .collect::<Result<weights::WeightMap, ModelError>>()?;
        Self::from_weights(self.args().clone(), weights)
    }

    /// Quantizes every float projection and the embedding (MLX affine).
    pub fn quantize(&mut self, group_size: i32, bits: i32) -> Result<(), ModelError> {
        let embedding = self.model().embed_tokens().quantized(group_size, bits)?;
        *self.model_mut().embed_tokens_mut() = embedding;
        self.map_linears(|l| l.quantized(group_size, bits))
    }

    /// The token embedding table (also the output head when tied).
    pub fn embed_matrix(&self) -> &linear::Matrix {
        &self.model().embed_tokens().table
    }

    /// `(module path, group size, bits)` of every quantized module.
    pub fn quantized_modules(&self) -> Vec<(String, i32, i32)> {
        let embedding = self.embed_matrix().quantization();
        let embedding = embedding.map(|(g, b)| ("model.embed_tokens".to_owned(), g, b));
        let linears = self
            .linears()
            .into_iter()
            .filter_map(|(name, l)| l.quantization().map(|(g, b)| (name, g, b)));
        embedding.into_iter().chain(linears).collect()
    }

    pub fn is_quantized(&self) -> bool {
        !self.quantized_modules().is_empty()
    }

    /// Parameters of the embedding and the projections (norms aside),
    /// counted from the matrices' shapes, so every architecture is right.
    pub fn parameter_count(&self) -> u64 {
        let (vocab, dims) = self.embed_matrix().shape();
        self.linears()
            .iter()
            .map(|(_, linear)| linear.weight.shape())
            .chain(std::iter::once((vocab, dims)))
            .map(|(rows, cols)| rows as u64 * cols as u64)
            .sum()
    }

    /// Whether the embedding or a projection is stored in float16 or
    /// bfloat16 (most Hugging Face checkpoints).
    pub fn has_half_precision(&self) -> bool {
        let half = |m: &linear::Matrix| matches!(m, linear::Matrix::Dense(w) if matches!(w.dtype(), mlx_rs::Dtype::Float16 | mlx_rs::Dtype::Bfloat16));
        half(self.embed_matrix()) || self.linears().iter().any(|(_, l)| half(&l.weight))
    }

    /// Weights under mlx-lm's parameter names (what `export` writes).
    pub fn weights(&self) -> Result<weights::WeightMap, ModelError> {
        let model = self.model();
        let mut out = weights::WeightMap::new();
        model.embed_tokens().store("model.embed_tokens", &mut out);
        for (i, (attn, mlp)) in model.blocks().into_iter().enumerate() {
            attn.store(&format!("model.layers.{i}.self_attn"), &mut out)?;
            mlp.store(&format!("model.layers.{i}.mlp"), &mut out);
        }
        model.store_norms(&mut out)?;
        if let Some(head) = model.lm_head() {
            head.store("lm_head", &mut out);
        }
        Ok(out)
    }
}

/// An MLX error as a person should read it: the message, without the C++
/// source location and quoting MLX wraps it in (`"[load_gguf] … at /…/io.cpp:40" at /…`).
pub fn mlx_message(error: &impl std::fmt::Display) -> String {
    let text = error.to_string();
    let message = text.split(" at /").next().unwrap_or(&text).trim_matches('"');
    match message.strip_prefix('[').and_then(|m| m.split_once("] ")) {
        Some((_, rest)) => rest.to_owned(),
        None => message.to_owned(),
    }
}
