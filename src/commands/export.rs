//! `blossom-p2p export`: write the base model as an mlx-lm model folder, or
//! (`--format gguf`) the model with its adapter fused as one GGUF file.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::Config;
use crate::model::export::export_mlx_lm;
use crate::model::gguf_write::export_gguf;
use crate::model::{LoadOptions, QuantMode, load_model};
use crate::train::adapters;
use crate::train::lora::fuse;

use super::args::ModelArgs;
use super::model_error_exit;

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// An mlx-lm adapter directory to export with the model (into OUT/adapters), or to fuse.
    #[arg(long, visible_alias = "adapter-path", value_name = "DIR")]
    pub adapter: Option<String>,
    /// Write float32 weights instead of keeping quantized ones (mlx format).
    #[arg(long)]
    pub dequantize: bool,
    /// Output: a directory (mlx: an mlx-lm model folder) or a file (gguf).
    #[arg(long, visible_alias = "output", value_name = "PATH")]
    pub out: PathBuf,
    /// Fuse the adapter into the base weights and write a whole model.
    #[arg(long, requires = "adapter")]
    pub fuse: bool,
    /// `mlx`: an mlx-lm model folder; `gguf`: one GGUF file for llama.cpp, Ollama, LM Studio.
    #[arg(long, value_enum, default_value_t = ExportFormat::Mlx)]
    pub format: ExportFormat,
    /// GGUF weight format.
    #[arg(long, value_enum, default_value_t = crate::model::gguf_write::GgufQuant::Q8_0)]
    pub quant: crate::model::gguf_write::GgufQuant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    Mlx,
    Gguf,
}

pub fn run(config: &Config, args: &ExportArgs) -> ExitCode {
    let source = &config.model.source;
    let gguf = args.format == ExportFormat::Gguf;
    if gguf && args.adapter.is_some() && !args.fuse {
        eprintln!("error: a GGUF file holds one model: add --fuse to fuse the adapter into it");
        return ExitCode::from(2);
    }
    // Quantized weights are written as they are (GGUF's blocks are exactly
    // MLX affine), unless float32 is asked for; GGUF export quantizes anew
    // from float weights.
    let quant = if args.dequantize || gguf { QuantMode::Dequantize } else { QuantMode::Keep };
    let mut loaded = match load_model(source, &LoadOptions { quant }) {
        Ok(loaded) => loaded,
        Err(err) => return model_error_exit(&format!("cannot load model {source}"), &err),
    };
    if let Some(dir) = &args.adapter {
        let dir = std::path::Path::new(dir);
        let (params, settings) = match adapters::load(dir, &loaded.decoder) {
            Ok(adapter) => adapter,
            Err(err) => {
                eprintln!("error: cannot load adapter {}: {err}", dir.display());
                return ExitCode::from(2);
            }
        };
        let result = if args.fuse {
            fuse(&mut loaded.decoder, &params, &settings)
        } else {
            // The base model with the adapter beside it, as mlx-lm expects.
            adapters::save(&args.out.join("adapters"), &params, &settings)
        };
        if let Err(err) = result {
            eprintln!("error: cannot export the adapter: {err}");
            return ExitCode::FAILURE;
        }
    }
    if gguf {
        let name = args.adapter.as_deref().map_or_else(|| source.clone(), |adapter| format!("{source} + {adapter}"));
        return match export_gguf(&loaded.decoder, &loaded.tokenizer, args.quant, &name, &args.out) {
            Ok(summary) => {
                println!(
                    "exported {name} to {} ({} tensors, {} quantized as {:?}, {:.1} MB); try: llama-cli -m {}",
                    args.out.display(),
                    summary.tensors,
                    summary.quantized,
                    args.quant,
                    summary.bytes as f64 / 1e6,
                    args.out.display()
                );
                ExitCode::SUCCESS
            }
            Err(err) => model_error_exit("GGUF export failed", &err),
        };
    }
    match export_mlx_lm(&loaded.decoder, &loaded.tokenizer, &args.out) {
        Ok(summary) => {
            println!(
                "exported {source} to {} ({} tensors, {} quantized modules); try: python -m mlx_lm generate --model {}",
                args.out.display(),
                summary.tensors,
                summary.quantized_modules,
                args.out.display()
            );
            ExitCode::SUCCESS
        }
        Err(err) => model_error_exit("export failed", &err),
    }
}
