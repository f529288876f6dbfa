//! `blossom-p2p generate`: text from the base model, streamed token by token.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::config::Config;
use crate::model::chat::ChatMessage;
use crate::model::generate::{SamplingParams, generate};
use crate::model::linear::ProjectionAdapter;
use crate::model::{LoadOptions, ModelError, load_model};
use crate::train::adapters;
use crate::train::lora::LoraApplier;

use super::args::{ModelArgs, QuantArgs};
use super::model_error_exit;

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub quant: QuantArgs,
    /// The prompt; the chat template is applied unless --raw is given.
    #[arg(long)]
    pub prompt: String,
    /// A system message for the chat template.
    #[arg(long)]
    pub system: Option<String>,
    /// Feed the prompt to the model as it is, without the chat template.
    #[arg(long)]
    pub raw: bool,
    /// An mlx-lm adapter directory to apply.
    #[arg(long, value_name = "DIR")]
    pub adapter_path: Option<PathBuf>,
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temp: f32,
    /// Nucleus sampling threshold in (0, 1]; 1 keeps every token.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(config: &Config, args: &GenerateArgs) -> ExitCode {
    let source = &config.model.source;
    let mut loaded = match load_model(source, &LoadOptions { quant: args.quant.quant }) {
        Ok(loaded) => loaded,
        Err(err) => return model_error_exit(&format!("cannot load model {source}"), &err),
    };
    let adapter = match &args.adapter_path {
        Some(dir) => match adapters::load(dir, &loaded.decoder).and_then(|adapter| adapter.1.keep_base_norms(&mut loaded.decoder).map(|()| adapter)) {
            Ok(adapter) => Some(adapter),
            Err(err) => {
                eprintln!("error: cannot load adapter {}: {err}", dir.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let applier = adapter.as_ref().map(|(params, settings)| LoraApplier {
        params,
        settings,
        dropout: None,
    });
    let hook = applier.as_ref().map(|a| a as &dyn ProjectionAdapter);
    tracing::info!(model = %source, identity = %&loaded.identity[..16], dequantized = loaded.dequantized, "model loaded");
    let prompt = if args.raw {
        loaded.tokenizer.encode(&args.prompt, true)
    } else {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::system(system.clone()));
        }
        messages.push(ChatMessage::user(args.prompt.clone()));
        loaded.tokenizer.encode_chat(&messages)
    };
    let prompt = match prompt {
        Ok(ids) => ids,
        Err(err) => return model_error_exit("cannot build the prompt", &err),
    };
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temp,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut decoder = loaded.tokenizer.stream_decoder();
    let mut stdout = std::io::stdout().lock();
    let result = generate(&loaded.decoder, hook, &prompt, &params, loaded.tokenizer.eos_ids(), true, |token| {
        let text = decoder.push(token)?;
        stdout
            .write_all(text.as_bytes())
            .and_then(|()| stdout.flush())
            .map(|()| true)
            .map_err(|e| ModelError::BadInput(format!("cannot write to stdout: {e}")))
    });
    let _ = writeln!(stdout).and_then(|()| stdout.flush());
    match result {
        Ok((_, stats)) => {
            eprintln!(
                "prompt: {} tokens, {:.1} tokens/s; generation: {} tokens, {:.1} tokens/s",
                stats.prompt_tokens,
                stats.prompt_tokens_per_sec(),
                stats.generated_tokens,
                stats.generation_tokens_per_sec()
            );
            ExitCode::SUCCESS
        }
        Err(err) => model_error_exit("generation failed", &err),
    }
}
