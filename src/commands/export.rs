//! `blossom-p2p export`: write the base model as an mlx-lm model folder.

use std::process::ExitCode;

use crate::cli::ExportArgs;
use crate::config::Config;
use crate::model::export::export_mlx_lm;
use crate::model::{LoadOptions, QuantMode, load_model};
use crate::train::adapters;
use crate::train::lora::fuse;

use super::model_error_exit;

pub fn run(config: &Config, args: &ExportArgs) -> ExitCode {
    let source = &config.model.source;
    // Quantized weights are written as they are (GGUF's blocks are exactly
    // MLX affine), unless float32 is asked for.
    let quant = if args.dequantize { QuantMode::Dequantize } else { QuantMode::Keep };
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
