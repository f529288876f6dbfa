//! From rows to token batches: rows are rendered (chat template, prompt
//! template or plain text), tokenized, truncated, and padded into batches
//! with a mask that says which positions the loss counts.

use mlx_rs::Array;

use super::TrainError;
use crate::data::{Row, Sample};
use crate::model::chat::ChatMessage;
use crate::model::Tokenizer;

/// One tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub tokens: Vec<u32>,
    /// How many leading tokens are prompt (not trained on with mask_prompt).
    pub prompt_len: usize,
}

/// The text of the prompt alone and of prompt + completion, as the model sees them.
pub fn render(tokenizer: &Tokenizer, sample: &Sample) -> Result<(String, String), TrainError> {
    Ok(match sample {
        Sample::Messages { messages } => {
            let full = tokenizer.apply_chat_template(messages, false)?;
            let prompt = match messages.split_last() {
                Some((last, earlier)) if last.role == "assistant" => tokenizer.apply_chat_template(earlier, true)?,
                _ => String::new(),
            };
            (prompt, full)
        }
        Sample::PromptCompletion { prompt, completion } => {
            let prompt_messages = [ChatMessage::user(prompt.clone())];
            let full_messages = [ChatMessage::user(prompt.clone()), ChatMessage::assistant(completion.clone())];
            (tokenizer.apply_chat_template(&prompt_messages, true)?, tokenizer.apply_chat_template(&full_messages, false)?)
        }
        Sample::Templated { templated_prompt, completion } => (templated_prompt.clone(), format!("{templated_prompt}{completion}")),
        Sample::Text { text } => (String::new(), text.clone()),
    })
}

/// Tokenizes a row; an end-of-sequence token closes texts and templated
/// completions (chat templates close their turns themselves).
pub fn encode(tokenizer: &Tokenizer, row: &Row, max_len: usize) -> Result<Encoded, TrainError> {
    let (prompt, full) = render(tokenizer, &row.sample)?;
    let mut tokens = tokenizer.encode(&full, true)?;
    if matches!(row.sample, Sample::Text { .. } | Sample::Templated { .. })
        && let Some(&eos) = tokenizer.eos_ids().first()
        && tokens.last() != Some(&eos)
    {
        tokens.push(eos);
    }
    let prompt_len = if prompt.is_empty() { 0 } else { tokenizer.encode(&prompt, true)?.len() };
    if tokens.len() < 2 {
        return Err(TrainError::Data(format!("row {} has fewer than 2 tokens", row.index)));
    }
    tokens.truncate(max_len);
    Ok(Encoded {
        prompt_len: prompt_len.min(tokens.len()),
        tokens,
    })
}

/// Padded inputs and the loss mask of a batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, len]` int32, padded with 0.
    pub tokens: Array,
    /// `[batch, len - 1]` float32: 1 where target `t + 1` counts in the loss.
    pub loss_mask: Array,
    /// Number of target tokens that count.
    pub target_tokens: usize,
    /// Real (non-padding) tokens in the batch.
    pub real_tokens: usize,
}

pub fn make_batch(examples: &[&Encoded], mask_prompt: bool) -> Result<Batch, TrainError> {
    let len = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
    if examples.is_empty() || len < 2 {
        return Err(TrainError::Data("an empty batch".into()));
    }
    let mut tokens = vec![0i32; examples.len() * len];
    let mut mask = vec![0f32; examples.len() * (len - 1)];
    let mut target_tokens = 0;
    for (b, example) in examples.iter().enumerate() {
        for (t, &token) in example.tokens.iter().enumerate() {
            tokens[b * len + t] = token as i32;
        }
        // Target index t predicts token t + 1.
        let first = if mask_prompt { example.prompt_len.max(1) } else { 1 };
        for position in first..example.tokens.len() {
            mask[b * (len - 1) + position - 1] = 1.0;
            target_tokens += 1;
        }
    }
    if target_tokens == 0 {
        return Err(TrainError::Data("no token in this batch is trained on (the prompts fill the whole sequence; raise train.max_seq_length)".into()));
    }
    let batch = examples.len() as i32;
    Ok(Batch {
        tokens: Array::from_slice(&tokens, &[batch, len as i32]),
        loss_mask: Array::from_slice(&mask, &[batch, len as i32 - 1]),
        target_tokens,
        real_tokens: examples.iter().map(|e| e.tokens.len()).sum(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_prompt_excludes_prompt_positions() {
        let a = Encoded { tokens: vec![10, 11, 12, 13, 14], prompt_len: 3 };
        let b = Encoded { tokens: vec![20, 21, 22], prompt_len: 1 };
        let masked = make_batch(&[&a, &b], true).unwrap();
        assert_eq!(masked.tokens.shape(), &[2, 5]);
        assert_eq!(masked.loss_mask.as_slice::<f32>(), &[0., 0., 1., 1., 1., 1., 0., 0.]);
        assert_eq!(masked.target_tokens, 4);
        let full = make_batch(&[&a, &b], false).unwrap();
        assert_eq!(full.loss_mask.as_slice::<f32>(), &[1., 1., 1., 1., 1., 1., 0., 0.]);
        assert_eq!(full.tokens.as_slice::<i32>(), &[10, 11, 12, 13, 14, 20, 21, 22, 0, 0]);
        let all_prompt = Encoded { tokens: vec![1, 2], prompt_len: 2 };
        assert!(make_batch(&[&all_prompt], true).is_err());
    }
}
