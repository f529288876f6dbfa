//! Resolving a `--model` argument to a loaded model: a GGUF file, a Hugging
//! Face folder (float or MLX-quantized safetensors), or `tiny[:SEED]`.

use std::fs::File;
use std::path::{Path, PathBuf};

use mlx_rs::{Array, Dtype};

use super::args::ModelArgs;
use super::tiny::{is_tiny, tiny_args, tiny_tokenizer, tiny_weights};
use super::weights::WeightMap;
use super::{Decoder, ModelError, Tokenizer};
use crate::mlx_env::{Backend, backend};

/// What to do with quantized weights at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum QuantMode {
    /// Dequantize (and widen float16/bfloat16) to float32 on CPU when memory
    /// allows (MLX's quantized and bfloat16 matmuls are slow there); keep
    /// them as they are on Metal and CUDA.
    #[default]
    Auto,
    /// Keep quantized and half-precision weights as they are.
    Keep,
    /// Always make them float32.
    Dequantize,
    /// Compute in bfloat16, the GPU's fast float (adapters stay float32):
    /// float weights and norms become bfloat16, quantized ones keep their
    /// packing with bfloat16 scales and biases.
    Bfloat16,
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub quant: QuantMode,
}

pub struct LoadedModel {
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    /// blake3 of the model's files (or of `tiny`'s recipe): the run id
    /// includes it so that nodes never mix different base models.
    pub identity: String,
    /// Where it came from, as given.
    pub source: String,
    /// Whether the weights were made float32 at load (from quantized or
    /// half-precision ones).
    pub dequantized: bool,
}

pub fn load_model(source: &str, options: &LoadOptions) -> Result<LoadedModel, ModelError> {
    let (mut decoder, tokenizer, identity) = if is_tiny(source) {
        let seed = match source.strip_prefix("tiny:") {
            None => 0,
            Some(seed) => seed
                .parse()
                .map_err(|_| ModelError::BadInput(format!("`{source}`: the tiny model's seed must be a number, e.g. tiny:7")))?,
        };
        let args = tiny_args();
        let identity = blake3::hash(format!("tiny:{seed}:{}", serde_json::to_string(&args).unwrap_or_default()).as_bytes());
        (Decoder::from_weights(args.clone(), tiny_weights(&args, seed))?, tiny_tokenizer()?, identity.to_hex().to_string())
    } else if let Some(spec) = source.strip_prefix("hf:") {
        load_hf_folder(&super::hub::resolve(spec)?)?
    } else {
        let path = Path::new(source);
        if !path.exists() {
            return Err(ModelError::Load {
                path: source.to_owned(),
                message: "no such file or directory (the default model comes from `bash scripts/setup.sh`)".into(),
            });
        }
        if path.is_dir() {
            load_hf_folder(path)?
        } else {
            let gguf = super::gguf::load_gguf(path)?;
            let tokenizer = Tokenizer::from_gguf(&gguf.vocab)?;
            let identity = hash_files(&[path.to_owned()])?;
            (Decoder::from_weights(gguf.args, gguf.weights)?, tokenizer, identity)
        }
    };
    let dequantize = hold_weights(&mut decoder, options.quant)?;
    if options.quant == QuantMode::Bfloat16 {
        decoder = decoder.with_float_dtype(Dtype::Bfloat16)?;
    }
    // MLX is lazy: materialize the weights now, so load errors surface here
    // and the first forward pass is not charged with the load.
    let weights = decoder.weights()?.into_inner();
    mlx_rs::transforms::eval(weights.values())?;
    Ok(LoadedModel {
        decoder,
        tokenizer,
        identity,
        source: source.to_owned(),
        dequantized: dequantize,
    })
}

/// Makes quantized and half-precision weights float32 where `quant` asks
/// for it (`auto`: on the CPU, where MLX has neither a fast quantized
/// matmul nor a fast bfloat16 one, when float32 fits in memory); returns
/// whether it did.
pub fn hold_weights(decoder: &mut Decoder, quant: QuantMode) -> Result<bool, ModelError> {
    let widen = (decoder.is_quantized() || decoder.has_half_precision())
        && match quant {
            QuantMode::Keep | QuantMode::Bfloat16 => false,
            QuantMode::Dequantize => true,
            QuantMode::Auto => backend() == Backend::Cpu && float32_fits(decoder),
        };
    if widen {
        decoder.dequantize(Dtype::Float32)?;
    }
    Ok(widen)
}

/// A Hugging Face / mlx-lm folder: config.json, model.safetensors or shards
/// listed in model.safetensors.index.json, and the tokenizer files.
fn load_hf_folder(dir: &Path) -> Result<(Decoder, Tokenizer, String), ModelError> {
    let (args, weights, files) = load_hf_weights(dir)?;
    let tokenizer = Tokenizer::from_hf_folder(dir)?;
    let identity = hash_files(&files)?;
    Ok((Decoder::from_weights(args, weights)?, tokenizer, identity))
}

/// The config and weights of a Hugging Face / mlx-lm folder, and the files
/// they came from (config first).
pub fn load_hf_weights(dir: &Path) -> Result<(ModelArgs, WeightMap, Vec<PathBuf>), ModelError> {
    let load_err = |message: String| ModelError::Load {
        path: dir.display().to_string(),
        message,
    };
    let config_path = dir.join("config.json");
    let config_text = std::fs::read_to_string(&config_path).map_err(|e| load_err(format!("config.json: {e}")))?;
    let args: ModelArgs = serde_json::from_str(&config_text).map_err(|e| load_err(format!("config.json: {e}")))?;
    args.validate()?;
    let index_path = dir.join("model.safetensors.index.json");
    let mut files: Vec<PathBuf> = if index_path.exists() {
        let text = std::fs::read_to_string(&index_path).map_err(|e| load_err(format!("{}: {e}", index_path.display())))?;
        let index: serde_json::Value = serde_json::from_str(&text).map_err(|e| load_err(format!("{}: {e}", index_path.display())))?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| load_err("model.safetensors.index.json has no weight_map".into()))?;
        let mut shards: Vec<PathBuf> = Vec::new();
        for shard in map.values() {
            let name = shard.as_str().ok_or_else(|| load_err("weight_map values must be file names".into()))?;
            if name.contains('/') || name.contains("..") {
                return Err(load_err(format!("shard name `{name}` must be a plain file name")));
            }
            shards.push(dir.join(name));
        }
        shards.sort();
        shards.dedup();
        shards
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut weights = WeightMap::new();
    for file in &files {
        let arrays = Array::load_safetensors(file).map_err(|e| load_err(format!("{}: {}", file.display(), super::mlx_message(&e))))?;
        for (name, array) in arrays {
            weights.insert(name, array);
        }
    }
    files.insert(0, config_path);
    Ok((args, weights, files))
}

/// blake3 over the files' names and bytes, in the order given.
fn hash_files(files: &[PathBuf]) -> Result<String, ModelError> {
    let mut hasher = blake3::Hasher::new();
    for path in files {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        hasher.update(name.as_bytes());
        hasher.update(&[0]);
        let file = File::open(path).map_err(|e| ModelError::Load {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        hasher.update_reader(file).map_err(|e| ModelError::Load {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// Whether float32 weights fit comfortably: at most half the available memory.
fn float32_fits(decoder: &Decoder) -> bool {
    let bytes = decoder.parameter_count() * 4;
    match available_memory() {
        Some(available) => bytes <= available / 2,
        None => true,
    }
}

fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
