//! Writing a model as a GGUF file (version 3) for llama.cpp, Ollama and LM
//! Studio: the architecture's metadata, the tokenizer (byte-level BPE) and
//! its chat template, and the weights under llama.cpp's names, as F16, Q8_0
//! or Q4_1 (norms stay F32, as llama.cpp's converter keeps them).
//!
//! llama.cpp's `llama` architecture expects the rows of Q and K in its
//! interleaved-RoPE order: the converter's `permute`, which `gguf::load_gguf`
//! undoes on the way in, is applied on the way out. Blocks follow ggml's
//! reference quantizers (`quantize_row_q8_0_ref`, `quantize_row_q4_1_ref`).

use std::io::{BufWriter, Write};
use std::path::Path;

use mlx_rs::{Array, Dtype};

use super::gguf::{gguf_name, permute_rows};
use super::{Decoder, ModelError, Tokenizer};

const ALIGNMENT: u64 = 32;
/// Values per Q8_0 / Q4_1 block.
const BLOCK: usize = 32;

/// The weight format of an exported file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufQuant {
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q4_1")]
    Q4_1,
}

impl GgufQuant {
    /// ggml's tensor type id.
    fn ggml_type(self) -> u32 {
        match self {
            GgufQuant::F16 => 1,
            GgufQuant::Q4_1 => 3,
            GgufQuant::Q8_0 => 8,
        }
    }

    /// `general.file_type` (llama.cpp `llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            GgufQuant::F16 => 1,
            GgufQuant::Q4_1 => 3,
            GgufQuant::Q8_0 => 7,
        }
    }

    /// Bytes of a row of `n` values.
    fn row_bytes(self, n: usize) -> usize {
        match self {
            GgufQuant::F16 => 2 * n,
            GgufQuant::Q8_0 => n / BLOCK * 34,
            GgufQuant::Q4_1 => n / BLOCK * 20,
        }
    }

    fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            GgufQuant::F16 => out.extend(values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes())),
            GgufQuant::Q8_0 => values.chunks_exact(BLOCK).for_each(|block| quantize_q8_0(block, out)),
            GgufQuant::Q4_1 => values.chunks_exact(BLOCK).for_each(|block| quantize_q4_1(block, out)),
        }
    }
}

/// `d = max|x| / 127`, `q = round(x / d)`.
fn quantize_q8_0(block: &[f32], out: &mut Vec<u8>) {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(half::f16::from_f32(d).to_le_bytes());
    out.extend(block.iter().map(|v| (v * inverse).round() as i8 as u8));
}

/// `d = (max − min) / 15`, `q = round((x − min) / d)`; byte j holds values j
/// (low nibble) and j + 16 (high nibble).
fn quantize_q4_1(block: &[f32], out: &mut Vec<u8>) {
    let min = block.iter().copied().fold(f32::INFINITY, f32::min);
    let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let d = (max - min) / 15.0;
    let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
    out.extend(half::f16::from_f32(d).to_le_bytes());
    out.extend(half::f16::from_f32(min).to_le_bytes());
    let q = |v: f32| (((v - min) * inverse + 0.5) as u8).min(15);
    out.extend((0..BLOCK / 2).map(|j| q(block[j]) | (q(block[j + BLOCK / 2]) << 4)));
}

/// GGUF metadata value types.
#[derive(Clone, Copy)]
#[repr(u32)]
enum ValueType {
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
}

/// The header being written: metadata and tensor infos.
#[derive(Default)]
struct Header {
    bytes: Vec<u8>,
    count: u64,
}

impl Header {
    fn string(&mut self, s: &str) {
        self.bytes.extend((s.len() as u64).to_le_bytes());
        self.bytes.extend(s.as_bytes());
    }

    fn key(&mut self, key: &str, kind: ValueType) {
        self.string(key);
        self.bytes.extend((kind as u32).to_le_bytes());
        self.count += 1;
    }

    fn u32(&mut self, key: &str, v: u32) {
        self.key(key, ValueType::U32);
        self.bytes.extend(v.to_le_bytes());
    }

    fn f32(&mut self, key: &str, v: f32) {
        self.key(key, ValueType::F32);
        self.bytes.extend(v.to_le_bytes());
    }

    fn bool(&mut self, key: &str, v: bool) {
        self.key(key, ValueType::Bool);
        self.bytes.push(u8::from(v));
    }

    fn str(&mut self, key: &str, v: &str) {
        self.key(key, ValueType::String);
        self.string(v);
    }

    fn strings(&mut self, key: &str, list: &[String]) {
        self.key(key, ValueType::Array);
        self.bytes.extend((ValueType::String as u32).to_le_bytes());
        self.bytes.extend((list.len() as u64).to_le_bytes());
        for s in list {
            self.string(s);
        }
    }

    fn i32s(&mut self, key: &str, list: &[i32]) {
        self.key(key, ValueType::Array);
        self.bytes.extend((ValueType::I32 as u32).to_le_bytes());
        self.bytes.extend((list.len() as u64).to_le_bytes());
        self.bytes.extend(list.iter().flat_map(|v| v.to_le_bytes()));
    }
}

/// A tensor to write: its GGUF name, the source array and how it is stored.
struct Entry {
    name: String,
    source: String,
    rows: usize,
    cols: usize,
    one_dimensional: bool,
    /// `None`: F32.
    quant: Option<GgufQuant>,
    /// Q/K of a llama model: the rows get llama.cpp's permutation, per head.
    permute_heads: Option<i32>,
}

impl Entry {
    fn bytes(&self) -> usize {
        match self.quant {
            None => 4 * self.rows * self.cols,
            Some(q) => self.rows * q.row_bytes(self.cols),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GgufSummary {
    pub tensors: usize,
    pub quantized: usize,
    pub bytes: u64,
}

fn padding(offset: u64) -> u64 {
    (ALIGNMENT - offset % ALIGNMENT) % ALIGNMENT
}

/// Writes `decoder` (float weights: load it dequantized) and `tokenizer` as
/// GGUF to `out`, named `name`.
pub fn export_gguf(decoder: &Decoder, tokenizer: &Tokenizer, quant: GgufQuant, name: &str, out: &Path) -> Result<GgufSummary, ModelError> {
    let args = decoder.args();
    let arch = args.model_type.as_str();
    if !matches!(arch, "llama" | "qwen2" | "qwen3") {
        return Err(ModelError::BadInput(format!("GGUF export supports llama, qwen2 and qwen3 models, not `{arch}`")));
    }
    if decoder.is_quantized() {
        return Err(ModelError::BadInput("GGUF export needs float weights: load the model dequantized".into()));
    }
    let vocab = tokenizer.gguf_vocab().ok_or_else(|| {
        ModelError::BadInput("GGUF export needs a byte-level BPE vocabulary from a GGUF model (or `tiny`); this model's tokenizer came from tokenizer.json".into())
    })?;
    let weights = decoder.weights()?.into_inner();
    let mut entries = Vec::new();
    for (source, array) in &weights {
        let name = gguf_name(source).ok_or_else(|| ModelError::BadInput(format!("no GGUF name for tensor `{source}`")))?;
        let shape = array.shape();
        let (rows, cols, one_dimensional) = match shape {
            [n] => (1, *n as usize, true),
            [r, c] => (*r as usize, *c as usize, false),
            other => return Err(ModelError::BadInput(format!("tensor `{source}` has shape {other:?}; GGUF export writes 1-D and 2-D tensors"))),
        };
        // Matrices in the chosen format when their rows split into blocks,
        // F16 otherwise; vectors (norms, biases) in F32.
        let quant = match (one_dimensional, quant) {
            (true, _) => None,
            (false, GgufQuant::F16) => Some(GgufQuant::F16),
            (false, q) if cols % BLOCK == 0 => Some(q),
            (false, _) => Some(GgufQuant::F16),
        };
        let permute_heads = (arch == "llama" && !one_dimensional).then(|| match name.as_str() {
            n if n.ends_with(".attn_q.weight") => Some(args.num_attention_heads),
            n if n.ends_with(".attn_k.weight") => Some(args.num_kv_heads()),
            _ => None,
        });
        entries.push(Entry {
            name,
            source: source.clone(),
            rows,
            cols,
            one_dimensional,
            quant,
            permute_heads: permute_heads.flatten(),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));

    let mut header = Header::default();
    header.str("general.architecture", arch);
    header.str("general.name", name);
    header.u32("general.file_type", quant.file_type());
    header.u32("general.quantization_version", 2);
    header.u32("general.alignment", ALIGNMENT as u32);
    let key = |suffix: &str| format!("{arch}.{suffix}");
    header.u32(&key("context_length"), args.max_position_embeddings.unwrap_or(4096) as u32);
    header.u32(&key("embedding_length"), args.hidden_size as u32);
    header.u32(&key("block_count"), args.num_hidden_layers as u32);
    header.u32(&key("feed_forward_length"), args.intermediate_size as u32);
    header.u32(&key("attention.head_count"), args.num_attention_heads as u32);
    header.u32(&key("attention.head_count_kv"), args.num_kv_heads() as u32);
    if let Some(head_dim) = args.head_dim {
        header.u32(&key("attention.key_length"), head_dim as u32);
        header.u32(&key("attention.value_length"), head_dim as u32);
    }
    header.f32(&key("attention.layer_norm_rms_epsilon"), args.rms_norm_eps);
    header.f32(&key("rope.freq_base"), args.rope_theta);
    header.u32(&key("vocab_size"), args.vocab_size as u32);
    header.str("tokenizer.ggml.model", &vocab.model);
    header.str("tokenizer.ggml.pre", &vocab.pre);
    header.strings("tokenizer.ggml.tokens", &vocab.tokens);
    if let Some(types) = &vocab.token_types {
        header.i32s("tokenizer.ggml.token_type", types);
    }
    header.strings("tokenizer.ggml.merges", &vocab.merges);
    if let Some(id) = vocab.bos_token_id {
        header.u32("tokenizer.ggml.bos_token_id", id);
    }
    if let Some(id) = vocab.eos_token_id {
        header.u32("tokenizer.ggml.eos_token_id", id);
    }
    header.bool("tokenizer.ggml.add_bos_token", vocab.add_bos_token);
    if let Some(template) = tokenizer.chat_template() {
        header.str("tokenizer.chat_template", template);
    }
    let kv_count = header.count;

    // Tensor infos: name, dims (ggml order: columns first), type, offset.
    let mut offset = 0u64;
    for entry in &entries {
        header.string(&entry.name);
        let dims: Vec<u64> = if entry.one_dimensional { vec![entry.cols as u64] } else { vec![entry.cols as u64, entry.rows as u64] };
        header.bytes.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            header.bytes.extend(d.to_le_bytes());
        }
        header.bytes.extend(entry.quant.map_or(0, GgufQuant::ggml_type).to_le_bytes());
        header.bytes.extend(offset.to_le_bytes());
        offset += entry.bytes() as u64;
        offset += padding(offset);
    }

    let io = |e: std::io::Error| ModelError::Load {
        path: out.display().to_string(),
        message: e.to_string(),
    };
    let temp = out.with_extension("gguf.partial");
    let mut file = BufWriter::new(std::fs::File::create(&temp).map_err(io)?);
    file.write_all(b"GGUF").map_err(io)?;
    file.write_all(&3u32.to_le_bytes()).map_err(io)?;
    file.write_all(&(entries.len() as u64).to_le_bytes()).map_err(io)?;
    file.write_all(&kv_count.to_le_bytes()).map_err(io)?;
    file.write_all(&header.bytes).map_err(io)?;
    let mut written = 24 + header.bytes.len() as u64;
    file.write_all(&vec![0u8; padding(written) as usize]).map_err(io)?;
    written += padding(written);
    let mut data = Vec::new();
    for entry in &entries {
        let values = tensor_values(&weights[&entry.source], entry.permute_heads, &entry.name)?;
        data.clear();
        match entry.quant {
            None => data.extend(values.iter().flat_map(|v| v.to_le_bytes())),
            Some(q) => {
                for row in values.chunks_exact(entry.cols) {
                    q.encode(row, &mut data);
                }
            }
        }
        data.resize(data.len() + padding(data.len() as u64) as usize, 0);
        file.write_all(&data).map_err(io)?;
        written += data.len() as u64;
    }
    file.flush().map_err(io)?;
    file.get_ref().sync_all().map_err(io)?;
    drop(file);
    std::fs::rename(&temp, out).map_err(io)?;
    Ok(GgufSummary {
        tensors: entries.len(),
        quantized: entries.iter().filter(|e| e.quant.is_some_and(|q| q != GgufQuant::F16)).count(),
        bytes: written,
    })
}

/// A tensor's values as float32 rows, Q/K rows permuted for llama.cpp.
fn tensor_values(array: &Array, permute_heads: Option<i32>, name: &str) -> Result<Vec<f32>, ModelError> {
    let array = match permute_heads {
        Some(heads) => permute_rows(array, heads, name)?,
        None => array.clone(),
    };
    let array = array.as_dtype(Dtype::Float32)?;
    array.eval()?;
    Ok(array.try_as_slice::<f32>().map_err(|e| ModelError::BadInput(format!("tensor values: {e}")))?.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dequantize(quant: GgufQuant, bytes: &[u8]) -> Vec<f32> {
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        match quant {
            GgufQuant::Q8_0 => bytes.chunks(34).flat_map(|b| b[2..].iter().map(move |q| f16(b) * (*q as i8) as f32)).collect(),
            GgufQuant::Q4_1 => bytes
                .chunks(20)
                .flat_map(|b| {
                    let (d, m) = (f16(&b[0..2]), f16(&b[2..4]));
                    let low = b[4..].iter().map(move |q| m + d * (q & 15) as f32);
                    let high = b[4..].iter().map(move |q| m + d * (q >> 4) as f32);
                    low.chain(high).collect::<Vec<_>>()
                })
                .collect(),
            GgufQuant::F16 => bytes.chunks(2).map(f16).collect(),
        }
    }

    #[test]
    fn blocks_round_trip_within_their_step() {
        let values: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 31.0) / 8.0).collect();
        for (quant, size, tolerance) in [(GgufQuant::Q8_0, 68, 4.0 / 127.0), (GgufQuant::Q4_1, 40, 8.0 / 15.0), (GgufQuant::F16, 128, 0.002)] {
            let mut bytes = Vec::new();
            quant.encode(&values, &mut bytes);
            assert_eq!(bytes.len(), size);
            assert_eq!(bytes.len(), quant.row_bytes(values.len()));
            let back = dequantize(quant, &bytes);
            for (a, b) in values.iter().zip(&back) {
                assert!((a - b).abs() <= tolerance, "{quant:?}: {a} vs {b}");
            }
        }
    }
}
