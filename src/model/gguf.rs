//! GGUF files (llama.cpp): the model config from the metadata, the tensors
//! renamed to mlx-lm's names, and what the tokenizer needs.
//!
//! MLX's loader returns Q4_0/Q4_1/Q8_0 tensors already as MLX affine triples
//! (`weight`, `scales`, `biases`, group size 32), which is an exact mapping;
//! they stay quantized here. F32 and F16 come as plain arrays. A file with
//! other types (llama.cpp's K-quant mixes, Q5_0, Q5_1, BF16) is read here
//! instead and dequantized to float32 (`gguf_quants.rs`).
//!
//! llama.cpp's converter permutes the rows of Q and K of `llama` models for
//! its interleaved RoPE. We undo the permutation at load time, so the weights
//! are in the Hugging Face layout, RoPE is the usual half-rotation, and
//! `export` writes a folder any mlx-lm or transformers user can read.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use mlx_rs::io::GgufFile;
use mlx_rs::{Array, Dtype};

use super::gguf_header::{GgufHeader, MetaValue};
use super::gguf_quants::{Affine4, GgmlType, dequantize, q4_k_as_affine};

use super::args::ModelArgs;
use super::tokenizer::GgufVocab;
use super::weights::WeightMap;
use super::ModelError;

pub struct GgufModel {
    pub args: ModelArgs,
    pub weights: WeightMap,
    pub vocab: GgufVocab,
}

pub fn load_gguf(path: &Path) -> Result<GgufModel, ModelError> {
    let load_err = |message: String| ModelError::Load {
        path: path.display().to_string(),
        message,
    };
    let header = super::gguf_header::read_header(path).map_err(|e| load_err(format!("not a valid GGUF file: {e}")))?;
    let meta = Metadata { header: &header, path };
    let arch = meta.string("general.architecture")?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let args = ModelArgs {
        model_type: match arch.as_str() {
            "llama" | "qwen2" | "qwen3" => arch.clone(),
            other => return Err(ModelError::UnsupportedArchitecture(format!("{other} (from GGUF)"))),
        },
        hidden_size: meta.int(&format!("{arch}.embedding_length"))?,
        num_hidden_layers: meta.int(&format!("{arch}.block_count"))?,
        intermediate_size: meta.int(&format!("{arch}.feed_forward_length"))?,
        num_attention_heads: meta.int(&format!("{arch}.attention.head_count"))?,
        num_key_value_heads: meta.int_optional(&format!("{arch}.attention.head_count_kv"))?,
        head_dim: meta.int_optional(&format!("{arch}.attention.key_length"))?,
        rms_norm_eps: meta.float(&format!("{arch}.attention.layer_norm_rms_epsilon"))?,
        vocab_size: match meta.int_optional(&format!("{arch}.vocab_size"))? {
            Some(v) => v,
            None => i32::try_from(tokens.len()).map_err(|_| load_err("vocabulary too large".into()))?,
        },
        rope_theta: meta.float_optional(&format!("{arch}.rope.freq_base"))?.unwrap_or(10_000.0),
        rope_traditional: false,
        rope_scaling: None,
        tie_word_embeddings: !header.tensors.iter().any(|t| t.name == "output.weight"),
        attention_bias: false,
        mlp_bias: false,
        max_position_embeddings: meta.int_optional(&format!("{arch}.context_length"))?,
        query_pre_attn_scalar: None,
        sliding_window: None,
        sliding_window_pattern: None,
        rope_local_base_freq: None,
        quantization: None,
    };
    args.validate()?;

    let mut weights = WeightMap::new();
    for (key, array) in read_tensors(path, &header)? {
        let name = hf_name(&key).ok_or_else(|| load_err(format!("unknown GGUF tensor `{key}` for a {arch} model")))?;
        let array = if arch == "llama" && (key.starts_with("blk.") && (key.contains(".attn_q.") || key.contains(".attn_k."))) {
            let heads = if key.contains(".attn_q.") { args.num_attention_heads } else { args.num_kv_heads() };
            unpermute_rows(&array, heads, &key)?
        } else {
            array
        };
        // Norm weights and biases may be F16 in GGUF; keep the float tensors in
        // float32 so the dequantized model is uniformly float32.
        let array = match array.dtype() {
            Dtype::Float16 | Dtype::Bfloat16 if !name.ends_with(".scales") && !name.ends_with(".biases") => array.as_dtype(Dtype::Float32)?,
            _ => array,
        };
        weights.insert(name, array);
    }

    let vocab = GgufVocab {
        model: meta.string("tokenizer.ggml.model")?,
        pre: meta.string_optional("tokenizer.ggml.pre")?.unwrap_or_else(|| "default".into()),
        tokens,
        merges: meta.strings_optional("tokenizer.ggml.merges")?.unwrap_or_default(),
        token_types: meta.int_vec_optional("tokenizer.ggml.token_type")?,
        bos_token_id: meta.int_optional("tokenizer.ggml.bos_token_id")?.map(|v| v as u32),
        eos_token_id: meta.int_optional("tokenizer.ggml.eos_token_id")?.map(|v| v as u32),
        add_bos_token: meta.bool_optional("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
        chat_template: meta.string_optional("tokenizer.chat_template")?,
    };
    Ok(GgufModel { args, weights, vocab })
}

/// The file's tensors by their GGUF names. Where MLX reads every type in
/// the file, MLX loads them (Q4_0, Q4_1 and Q8_0 stay quantized, as MLX
/// affine groups of 32: an exact mapping). Otherwise (K-quants, Q5_0,
/// Q5_1, BF16) every tensor is read here: Q4_K as MLX affine groups of 32
/// (also exact), the rest dequantized to float32, bit-exactly as llama.cpp's
/// `gguf` does; the log says so once. `--quant` then decides, as for any
/// quantized model, whether the Q4_K ones stay quantized.
fn read_tensors(path: &Path, header: &GgufHeader) -> Result<Vec<(String, Array)>, ModelError> {
    let load_err = |message: String| ModelError::Load {
        path: path.display().to_string(),
        message,
    };
    if let Some((tensor, why)) = header.tensors.iter().find_map(|t| t.kind.as_ref().err().map(|why| (t, why))) {
        return Err(load_err(format!(
            "tensor `{}` is {why}, a GGML type this loader cannot read; convert the model to a type it reads \
             (Q4_K_M, Q5_K_M, Q6_K, Q8_0, F16 or BF16, e.g. with llama.cpp's `llama-quantize`), or load its Hugging Face folder",
            tensor.name
        )));
    }
    let kinds = || header.tensors.iter().filter_map(|t| t.kind.as_ref().ok().copied());
    if kinds().all(GgmlType::read_by_mlx) {
        let file = GgufFile::load(path).map_err(|e| load_err(format!("not a readable GGUF file ({})", super::mlx_message(&e))))?;
        let mut tensors = Vec::new();
        for key in file.array_keys().map_err(|e| load_err(e.to_string()))? {
            let array = file
                .get_array(&key)
                .map_err(|e| load_err(format!("tensor {key}: {e}")))?
                .ok_or_else(|| load_err(format!("tensor {key} vanished")))?;
            tensors.push((key, array));
        }
        return Ok(tensors);
    }
    let mut names: Vec<&str> = kinds().filter(|k| !k.read_by_mlx() && *k != GgmlType::Q4K).map(GgmlType::name).collect();
    names.sort_unstable();
    names.dedup();
    tracing::info!(
        path = %path.display(),
        dequantized = names.join(", "),
        "reading the model's tensors: Q4_K as MLX 4-bit groups of 32 (exact), other quantized types dequantized to float32 (MLX has no kernels for them)"
    );
    let mut file = std::fs::File::open(path).map_err(|e| load_err(e.to_string()))?;
    let mut tensors = Vec::with_capacity(header.tensors.len());
    for tensor in &header.tensors {
        let kind = tensor.kind.as_ref().map_err(|why| load_err(why.clone()))?;
        let tensor_err = |e: String| load_err(format!("tensor `{}`: {e}", tensor.name));
        let mut bytes = vec![0u8; usize::try_from(tensor.bytes).map_err(|_| tensor_err("too large".into()))?];
        file.seek(SeekFrom::Start(tensor.start)).and_then(|_| file.read_exact(&mut bytes)).map_err(|e| tensor_err(e.to_string()))?;
        match (kind, tensor.shape.as_slice(), tensor.name.strip_suffix(".weight")) {
            (GgmlType::Q4K, &[rows, cols], Some(stem)) => {
                let Affine4 { packed, scales, biases } = q4_k_as_affine(&bytes).map_err(tensor_err)?;
                tensors.push((tensor.name.clone(), Array::from_slice(&packed, &[rows, cols / 8])));
                tensors.push((format!("{stem}.scales"), Array::from_slice(&scales, &[rows, cols / 32])));
                tensors.push((format!("{stem}.biases"), Array::from_slice(&biases, &[rows, cols / 32])));
            }
            _ => {
                let values = dequantize(*kind, &bytes).map_err(tensor_err)?;
                tensors.push((tensor.name.clone(), Array::from_slice(&values, &tensor.shape)));
            }
        }
    }
    Ok(tensors)
}

/// llama.cpp's names of a block's modules, with mlx-lm's.
const BLOCK_MODULES: [(&str, &str); 11] = [
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// And of the modules outside the blocks.
const TOP_MODULES: [(&str, &str); 3] = [("token_embd", "model.embed_tokens"), ("output_norm", "model.norm"), ("output", "lm_head")];

/// llama.cpp tensor names to mlx-lm / Hugging Face names.
fn hf_name(gguf: &str) -> Option<String> {
    let (stem, suffix) = gguf.rsplit_once('.')?;
    if !["weight", "bias", "scales", "biases"].contains(&suffix) {
        return None;
    }
    let mapped = match TOP_MODULES.iter().find(|(g, _)| *g == stem) {
        Some((_, hf)) => (*hf).to_owned(),
        None => {
            let (layer, part) = stem.strip_prefix("blk.")?.split_once('.')?;
            let layer: u32 = layer.parse().ok()?;
            let (_, module) = BLOCK_MODULES.iter().find(|(g, _)| *g == part)?;
            format!("model.layers.{layer}.{module}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// mlx-lm / Hugging Face names to llama.cpp's (float tensors only).
pub(crate) fn gguf_name(hf: &str) -> Option<String> {
    let (stem, suffix) = hf.rsplit_once('.')?;
    if !["weight", "bias"].contains(&suffix) {
        return None;
    }
    let mapped = match TOP_MODULES.iter().find(|(_, h)| *h == stem) {
        Some((g, _)) => (*g).to_owned(),
        None => {
            let (layer, module) = stem.strip_prefix("model.layers.")?.split_once('.')?;
            let layer: u32 = layer.parse().ok()?;
            let (part, _) = BLOCK_MODULES.iter().find(|(_, h)| *h == module)?;
            format!("blk.{layer}.{part}")
        }
    };
    Some(format!("{mapped}.{suffix}"))
}

/// llama.cpp's `permute` of the Q/K rows within each head, from [2,
/// head_dim/2] to [head_dim/2, 2] (GGUF export), or with `undo` its inverse
/// (loading). Works row-wise, so it applies to packed quantized weights,
/// their scales and biases, and bias vectors alike.
fn reorder_rows(array: &Array, heads: i32, name: &str, undo: bool) -> Result<Array, ModelError> {
    let shape = array.shape().to_vec();
    let rows = shape[0];
    if heads <= 0 || rows % (heads * 2) != 0 {
        return Err(ModelError::ShapeMismatch {
            name: name.to_owned(),
            expected: vec![heads * 2, -1],
            actual: shape,
        });
    }
    let half = rows / heads / 2;
    let mut split = if undo { vec![heads, half, 2] } else { vec![heads, 2, half] };
    split.extend_from_slice(&shape[1..]);
    Ok(array.reshape(&split)?.swap_axes(1, 2)?.reshape(&shape)?)
}

/// Q/K rows in llama.cpp's order, for GGUF export.
pub(crate) fn permute_rows(array: &Array, heads: i32, name: &str) -> Result<Array, ModelError> {
    reorder_rows(array, heads, name, false)
}

/// Q/K rows from llama.cpp's order back to the Hugging Face layout.
fn unpermute_rows(array: &Array, heads: i32, name: &str) -> Result<Array, ModelError> {
    reorder_rows(array, heads, name, true)
}

/// Typed access to GGUF metadata with errors that name the key.
struct Metadata<'a> {
    header: &'a GgufHeader,
    path: &'a Path,
}

impl Metadata<'_> {
    fn err(&self, key: &str, what: &str) -> ModelError {
        ModelError::Load {
            path: self.path.display().to_string(),
            message: format!("metadata `{key}` {what}"),
        }
    }

    fn get(&self, key: &str) -> Option<&MetaValue> {
        self.header.metadata.get(key)
    }

    fn string_optional(&self, key: &str) -> Result<Option<String>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Str(s)) => Ok(Some(s.clone())),
            Some(_) => Err(self.err(key, "is not a string")),
        }
    }

    fn string(&self, key: &str) -> Result<String, ModelError> {
        self.string_optional(key)?.ok_or_else(|| self.err(key, "is missing"))
    }

    fn strings_optional(&self, key: &str) -> Result<Option<Vec<String>>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(values)) => values
                .iter()
                .map(|v| match v {
                    MetaValue::Str(s) => Ok(s.clone()),
                    _ => Err(self.err(key, "is not a list of strings")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(self.err(key, "is not a list of strings")),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, ModelError> {
        self.strings_optional(key)?.ok_or_else(|| self.err(key, "is missing"))
    }

    /// An integer value as i32.
    fn as_int(&self, key: &str, value: &MetaValue) -> Result<i32, ModelError> {
        match value {
            MetaValue::Int(v) => i32::try_from(*v).map_err(|_| self.err(key, &format!("= {v} is out of range"))),
            _ => Err(self.err(key, "is not an integer")),
        }
    }

    fn int_optional(&self, key: &str) -> Result<Option<i32>, ModelError> {
        self.get(key).map(|v| self.as_int(key, v)).transpose()
    }

    fn int(&self, key: &str) -> Result<i32, ModelError> {
        self.int_optional(key)?.ok_or_else(|| self.err(key, "is missing"))
    }

    fn float_optional(&self, key: &str) -> Result<Option<f32>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Float(v)) => Ok(Some(*v as f32)),
            Some(MetaValue::Int(v)) => Ok(Some(*v as f32)),
            Some(_) => Err(self.err(key, "is not a number")),
        }
    }

    fn float(&self, key: &str) -> Result<f32, ModelError> {
        self.float_optional(key)?.ok_or_else(|| self.err(key, "is missing"))
    }

    fn bool_optional(&self, key: &str) -> Result<Option<bool>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Bool(v)) => Ok(Some(*v)),
            Some(MetaValue::Int(v)) => Ok(Some(*v != 0)),
            Some(_) => Err(self.err(key, "is not a boolean")),
        }
    }

    fn int_vec_optional(&self, key: &str) -> Result<Option<Vec<i32>>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(MetaValue::Array(values)) => values.iter().map(|v| self.as_int(key, v)).collect::<Result<Vec<_>, _>>().map(Some),
            Some(_) => Err(self.err(key, "is not a number array")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_mlx_lm() {
        assert_eq!(hf_name("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
        assert_eq!(hf_name("blk.3.attn_q.scales").as_deref(), Some("model.layers.3.self_attn.q_proj.scales"));
        assert_eq!(hf_name("blk.0.ffn_norm.weight").as_deref(), Some("model.layers.0.post_attention_layernorm.weight"));
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
        for name in ["token_embd.weight", "output.weight", "blk.3.attn_q.weight", "blk.11.ffn_down.weight", "blk.0.attn_k.bias"] {
            assert_eq!(gguf_name(&hf_name(name).unwrap()).as_deref(), Some(name));
        }
        assert_eq!(gguf_name("model.layers.0.self_attn.q_proj.scales"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(h, 2, d/2, c).swapaxes(1, 2).reshape(shape)
        let (heads, head_dim, cols) = (2, 4, 3);
        let rows = heads * head_dim;
        let hf: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
        let hf = Array::from_slice(&hf, &[rows, cols]);
        let permuted = hf.reshape(&[heads, 2, head_dim / 2, cols]).unwrap().swap_axes(1, 2).unwrap().reshape(&[rows, cols]).unwrap();
        assert_eq!(permute_rows(&hf, heads, "t").unwrap().as_slice::<f32>(), permuted.as_slice::<f32>());
        let back = unpermute_rows(&permuted, heads, "t").unwrap();
        assert_eq!(back.as_slice::<f32>(), hf.as_slice::<f32>());
        assert!(unpermute_rows(&hf, 3, "t").is_err());
    }
}
