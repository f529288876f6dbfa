//! Task metrics that need generation: exact match of greedy answers.

use super::TrainError;
use super::lora::{AdapterParams, LoraApplier, LoraSettings};
use crate::data::{Row, Sample};
use crate::data::builtin::exact_match;
use crate::model::chat::ChatMessage;
use crate::model::generate::{SamplingParams, generate};
use crate::model::{Decoder, Tokenizer};

/// Fraction of `rows` (prompt/completion rows) whose greedy answer matches.
/// `adapter` of `None` measures the base model.
pub fn exact_match_rate(
    decoder: &Decoder,
    tokenizer: &Tokenizer,
    adapter: Option<(&AdapterParams, &LoraSettings)>,
    rows: &[Row],
) -> Result<f32, TrainError> {
    let mut hits = 0usize;
    let mut total = 0usize;
    for row in rows {
        let Sample::PromptCompletion { prompt, completion } = &row.sample else {
            continue;
        };
        let ids = tokenizer.encode_chat(&[ChatMessage::user(prompt.clone())])?;
        let budget = tokenizer.encode(completion, false)?.len() as u32 + 8;
        let params = SamplingParams {
            max_tokens: budget,
            ..Default::default()
        };
        let applier = adapter.map(|(params, settings)| LoraApplier {
            params,
            settings,
            dropout: None,
        });
        let hook = applier.as_ref().map(|a| a as &dyn crate::model::linear::ProjectionAdapter);
        let (tokens, _) = generate(decoder, hook, &ids, &params, tokenizer.eos_ids(), true, |_| Ok(true))?;
        let answer = tokenizer.decode(&tokens, true)?;
        hits += usize::from(exact_match(&answer, completion));
        total += 1;
    }
    if total == 0 {
        return Err(TrainError::Data("exact match needs prompt/completion rows".into()));
    }
    Ok(hits as f32 / total as f32)
}
