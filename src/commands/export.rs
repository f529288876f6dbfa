//! `blossom-p2p export`: write the base model as an mlx-lm model folder.

use std::process::ExitCode;

use crate::cli::ExportArgs;
use crate::config::Config;
use crate::model::export::export_mlx_lm;
use crate::model::{LoadOptions, QuantMode, load_model};

use super::model_error_exit;

pub fn run(config: &Config, args: &ExportArgs) -> ExitCode {
    if args.adapter.is_some() {
        eprintln!("error: exporting adapters (--adapter, --fuse) is not supported yet: it comes with the trainer");
        return ExitCode::from(2);
    }
    let source = &config.model.source;
    // Quantized weights are written as they are (GGUF's blocks are exactly MLX affine).
    let loaded = match load_model(source, &LoadOptions { quant: QuantMode::Keep }) {
        Ok(loaded) => loaded,
        Err(err) => return model_error_exit(&format!("cannot load model {source}"), &err),
    };
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
