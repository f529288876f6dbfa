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
pub mod kv_cache;
pub mod layers;
pub mod linear;
pub mod llama;
pub mod load;
pub mod tiny;
pub mod tokenizer;
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

/// A decoder-only language model of one of the supported architectures.
#[derive(Debug, Clone)]
pub enum Decoder {
    Llama(llama::Llama),
    Gemma3(gemma3::Gemma3),
}

impl Decoder {
    pub fn from_weights(args: ModelArgs, weights: weights::WeightMap) -> Result<Self, ModelError> {
        match args.architecture()? {
            Architecture::Llama | Architecture::Qwen2 | Architecture::Qwen3 => Ok(Decoder::Llama(llama::Llama::from_weights(args, weights)?)),
            Architecture::Gemma3 => Ok(Decoder::Gemma3(gemma3::Gemma3::from_weights(args, weights)?)),
        }
    }

    pub fn args(&self) -> &ModelArgs {
        match self {
            Decoder::Llama(m) => &m.args,
            Decoder::Gemma3(m) => &m.args,
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Decoder::Llama(m) => m.layers.len(),
            Decoder::Gemma3(m) => m.layers.len(),
        }
    }

    /// A fresh, empty cache for each layer.
    pub fn new_cache(&self) -> Vec<KvCache> {
        (0..self.num_layers()).map(|_| KvCache::new()).collect()
    }

    /// Logits `[batch, len, vocab]` for `tokens` `[batch, len]` (int32).
    pub fn forward(&self, tokens: &Array, caches: Option<&mut [KvCache]>, key_padding: Option<&Array>) -> Result<Array, ModelError> {
        if tokens.ndim() != 2 {
            return Err(ModelError::BadInput(format!("tokens must be [batch, len], got {:?}", tokens.shape())));
        }
        if let Some(caches) = &caches
            && caches.len() != self.num_layers()
        {
            return Err(ModelError::BadInput(format!("{} caches for {} layers", caches.len(), self.num_layers())));
        }
        match self {
            Decoder::Llama(m) => m.forward(tokens, caches, key_padding),
            Decoder::Gemma3(m) => m.forward(tokens, caches, key_padding),
        }
    }

    /// Replaces every quantized projection and embedding with float weights.
    pub fn dequantize(&mut self, dtype: Dtype) -> Result<(), ModelError> {
        match self {
            Decoder::Llama(m) => {
                m.embed_tokens = m.embed_tokens.dequantized(dtype)?;
                m.map_linears(|l| l.dequantized(dtype))
            }
            Decoder::Gemma3(m) => {
                m.embed_tokens = m.embed_tokens.dequantized(dtype)?;
                m.map_linears(|l| l.dequantized(dtype))
            }
        }
    }

    /// Quantizes every float projection and the embedding (MLX affine).
    pub fn quantize(&mut self, group_size: i32, bits: i32) -> Result<(), ModelError> {
        match self {
            Decoder::Llama(m) => {
                m.embed_tokens = m.embed_tokens.quantized(group_size, bits)?;
                m.map_linears(|l| l.quantized(group_size, bits))
            }
            Decoder::Gemma3(m) => {
                m.embed_tokens = m.embed_tokens.quantized(group_size, bits)?;
                m.map_linears(|l| l.quantized(group_size, bits))
            }
        }
    }

    pub fn is_quantized(&self) -> bool {
        !self.quantized_modules().is_empty()
    }

    /// `(module path, group size, bits)` of every quantized module.
    pub fn quantized_modules(&self) -> Vec<(String, i32, i32)> {
        let (linears, embedding) = match self {
            Decoder::Llama(m) => (m.linears(), &m.embed_tokens),
            Decoder::Gemma3(m) => (m.linears(), &m.embed_tokens),
        };
        let mut out: Vec<(String, i32, i32)> = linears
            .into_iter()
            .filter_map(|(name, l)| l.quantization().map(|(g, b)| (name, g, b)))
            .collect();
        if let layers::Embedding::Quantized { group_size, bits, .. } = embedding {
            out.insert(0, ("model.embed_tokens".to_owned(), *group_size, *bits));
        }
        out
    }

    /// Weights under mlx-lm's parameter names.
    pub fn weights(&self) -> Result<weights::WeightMap, ModelError> {
        match self {
            Decoder::Llama(m) => m.weights(),
            Decoder::Gemma3(m) => m.weights(),
        }
    }
}
