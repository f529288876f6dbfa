//! From rows to token batches: rows are rendered (chat template, prompt
//! template or plain text), tokenized, truncated, and padded into batches
//! with the positions whose targets the loss counts.

use mlx_rs::Array;

use super::TrainError;
use crate::model::attention::PackedRows;
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
    /// `[lines, len]` int32, padded with 0.
    pub tokens: Array,
    /// `[targets]` int32: where each counted target sits among the inputs
    /// (flat index `line * (len - 1) + t`: input `t` predicts token `t + 1`).
    pub target_positions: Array,
    /// `[targets]` int32: the token each counted target predicts.
    pub target_ids: Array,
    /// `[targets]` float32, 1 for a counted target and 0 for padding, when
    /// the targets are padded (`pad_to`); the loss averages the counted ones.
    pub target_weights: Option<Array>,
    /// For packed rows, where each input token (the first `len - 1`) sits.
    pub packing: Option<PackedRows>,
    /// Number of target tokens that count.
    pub target_tokens: usize,
    /// Real (non-padding) tokens in the batch.
    pub real_tokens: usize,
}

/// The batch of `examples`: one row per line, padded to the longest, or
/// with `pack`, rows placed one after another (first fit, in order) into as
/// few lines as fit the longest row. Packed lines are never longer, nor more
/// numerous, than padded ones: packing only removes padding (and attention
/// over a line grows with its length squared, so longer lines would cost
/// more than they save). The loss counts the same targets either way: a
/// row's last token predicts nothing.
///
/// With `pad_to` > 1 the lines' inputs are padded to a multiple of it and
/// the targets to one a position (lines × inputs; padded targets get
/// weight 0, and the output head runs at every position, as mlx-lm's
/// does), so that a batch's shape is its lines and their length alone: the
/// compiled step traces once per shape, which is cheap next to a CPU's
/// matmuls but not next to a GPU's (mlx-lm pads to 32). Targets padded
/// only to a multiple of `pad_to` gave rows of mixed length a new trace
/// nearly every step (0.37x mlx-lm on the GPU with 8 rows of 25-250
/// tokens); now the shapes are the lines' lengths.
pub fn make_batch(examples: &[&Encoded], mask_prompt: bool, pack: bool, pad_to: usize) -> Result<Batch, TrainError> {
    let longest = examples.iter().map(|e| e.tokens.len()).max().unwrap_or(0);
    let mut lines = if pack { first_fit(examples, longest) } else { Vec::new() };
    // Where no line holds two rows, packing saves nothing: the plain layout
    // (a causal mask, MLX's fused RoPE) is cheaper.
    let pack = pack && lines.len() < examples.len();
    if !pack {
        lines = (0..examples.len()).map(|i| vec![i]).collect();
    }
    let line_len = |line: &Vec<usize>| line.iter().map(|&i| examples[i].tokens.len()).sum::<usize>();
    let len = lines.iter().map(line_len).max().unwrap_or(0);
    if examples.is_empty() || len < 2 {
        return Err(TrainError::Data("an empty batch".into()));
    }
    let inputs = (len - 1).next_multiple_of(pad_to.max(1));
    let len = inputs + 1;
    let mut tokens = vec![0i32; lines.len() * len];
    let mut target_positions = Vec::new();
    let mut target_ids = Vec::new();
    let mut segments = vec![0i32; lines.len() * inputs];
    let mut positions = vec![0i32; lines.len() * inputs];
    for (b, line) in lines.iter().enumerate() {
        let mut start = 0;
        for &i in line {
            let example = examples[i];
            for (t, &token) in example.tokens.iter().enumerate() {
                tokens[b * len + start + t] = token as i32;
                if start + t < inputs {
                    segments[b * inputs + start + t] = i as i32;
                    positions[b * inputs + start + t] = t as i32;
                }
            }
            // Target index t predicts token t + 1.
            let first = if mask_prompt { example.prompt_len.max(1) } else { 1 };
            for position in first..example.tokens.len() {
                target_positions.push((b * inputs + start + position - 1) as i32);
                target_ids.push(example.tokens[position] as i32);
            }
            start += example.tokens.len();
        }
        // Padding tokens are rows of one (ids no row uses).
        for t in start..inputs {
            segments[b * inputs + t] = -1 - t as i32;
        }
    }
    let target_tokens = target_positions.len();
    if target_tokens == 0 {
        return Err(TrainError::Data("no token in this batch is trained on (the prompts fill the whole sequence; raise train.max_seq_length)".into()));
    }
    let padded_targets = if pad_to > 1 { lines.len() * inputs } else { target_tokens };
    let target_weights = (padded_targets > target_tokens).then(|| {
        let weights: Vec<f32> = (0..padded_targets).map(|i| if i < target_tokens { 1.0 } else { 0.0 }).collect();
        Array::from_slice(&weights, &[padded_targets as i32])
    });
    target_positions.resize(padded_targets, 0);
    target_ids.resize(padded_targets, 0);
    let shape = [lines.len() as i32, inputs as i32];
    Ok(Batch {
        tokens: Array::from_slice(&tokens, &[lines.len() as i32, len as i32]),
        target_positions: Array::from_slice(&target_positions, &[padded_targets as i32]),
        target_ids: Array::from_slice(&target_ids, &[padded_targets as i32]),
        target_weights,
        packing: pack.then(|| PackedRows {
            segments: Array::from_slice(&segments, &shape),
            positions: Array::from_slice(&positions, &shape),
        }),
        target_tokens,
        real_tokens: examples.iter().map(|e| e.tokens.len()).sum(),
    })
}

/// Example indices per line: each example goes to the first line it fits
/// in (lines hold at most `capacity` tokens).
fn first_fit(examples: &[&Encoded], capacity: usize) -> Vec<Vec<usize>> {
    let mut lines: Vec<(usize, Vec<usize>)> = Vec::new();
    for (i, example) in examples.iter().enumerate() {
        let n = example.tokens.len();
        match lines.iter_mut().find(|(used, _)| used + n <= capacity) {
            Some((used, members)) => {
                *used += n;
                members.push(i);
            }
            None => lines.push((n, vec![i])),
        }
    }
    lines.into_iter().map(|(_, members)| members).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Padded for a GPU, a batch's shapes depend on its lines and their
    /// length alone, not on how many of its tokens are targets.
    #[test]
    fn padded_batches_take_their_shape_from_lines_and_length_alone() {
        let batch = |lengths: &[(usize, usize)]| {
            let rows: Vec<Encoded> = lengths.iter().map(|&(len, prompt_len)| Encoded { tokens: (0..len as u32).map(|t| 3 + t).collect(), prompt_len }).collect();
            make_batch(&rows.iter().collect::<Vec<_>>(), true, false, 32).unwrap()
        };
        let shapes = |b: &Batch| (b.tokens.shape().to_vec(), b.target_positions.shape().to_vec(), b.target_ids.shape().to_vec());
        let (a, b) = (batch(&[(40, 30), (35, 5)]), batch(&[(50, 1), (34, 20)]));
        assert_eq!(shapes(&a), shapes(&b));
        assert_eq!(shapes(&a), (vec![2, 65], vec![128], vec![128]));
        assert_eq!((a.target_tokens, b.target_tokens), (10 + 30, 49 + 14));
        let weights = a.target_weights.as_ref().unwrap();
        assert_eq!(weights.as_slice::<f32>().iter().filter(|&&w| w == 1.0).count(), 40);
    }

    #[test]
    fn mask_prompt_excludes_prompt_positions() {
        let a = Encoded { tokens: vec![10, 11, 12, 13, 14], prompt_len: 3 };
        let b = Encoded { tokens: vec![20, 21, 22], prompt_len: 1 };
        let masked = make_batch(&[&a, &b], true, false, 1).unwrap();
        assert_eq!(masked.tokens.shape(), &[2, 5]);
        assert_eq!(masked.target_positions.as_slice::<i32>(), &[2, 3, 4, 5]);
        assert_eq!(masked.target_ids.as_slice::<i32>(), &[13, 14, 21, 22]);
        assert_eq!(masked.target_tokens, 4);
        let full = make_batch(&[&a, &b], false, false, 1).unwrap();
        assert_eq!(full.target_positions.as_slice::<i32>(), &[0, 1, 2, 3, 4, 5]);
        assert_eq!(full.tokens.as_slice::<i32>(), &[10, 11, 12, 13, 14, 20, 21, 22, 0, 0]);
        let all_prompt = Encoded { tokens: vec![1, 2], prompt_len: 2 };
        assert!(make_batch(&[&all_prompt], true, false, 1).is_err());
    }

    #[test]
    fn packed_rows_keep_their_targets_and_positions() {
        let a = Encoded { tokens: vec![10, 11, 12, 13, 14], prompt_len: 3 };
        let b = Encoded { tokens: vec![20, 21, 22], prompt_len: 1 };
        let c = Encoded { tokens: vec![30, 31, 32, 33, 34, 35, 36, 37], prompt_len: 6 };
        // Lines hold 8 tokens (c, the longest): a + b fill the first, c the second.
        let packed = make_batch(&[&a, &b, &c], true, true, 1).unwrap();
        assert_eq!(packed.tokens.shape(), &[2, 8]);
        assert_eq!(packed.tokens.as_slice::<i32>(), &[10, 11, 12, 13, 14, 20, 21, 22, 30, 31, 32, 33, 34, 35, 36, 37]);
        // Targets: a's 13, 14; b's 21, 22; c's 36, 37. No row predicts the next row's first token.
        assert_eq!(packed.target_positions.as_slice::<i32>(), &[2, 3, 5, 6, 12, 13]);
        assert_eq!(packed.target_ids.as_slice::<i32>(), &[13, 14, 21, 22, 36, 37]);
        let unpacked = make_batch(&[&a, &b, &c], true, false, 1).unwrap();
        assert_eq!(unpacked.tokens.shape(), &[3, 8]);
        assert_eq!(packed.target_tokens, unpacked.target_tokens);
        assert_eq!(packed.real_tokens, unpacked.real_tokens);
        let rows = packed.packing.as_ref().unwrap();
        assert_eq!(rows.segments.as_slice::<i32>(), &[0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2]);
        assert_eq!(rows.positions.as_slice::<i32>(), &[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 4, 5, 6]);
        // Padding is a row of one per token.
        let d = Encoded { tokens: vec![40, 41], prompt_len: 0 };
        let padded_line = make_batch(&[&c, &b, &d], false, true, 1).unwrap();
        let segments = padded_line.packing.unwrap().segments;
        assert_eq!(&segments.as_slice::<i32>()[7..], &[1, 1, 1, 2, 2, -6, -7]);
        assert_eq!(padded_line.tokens.shape(), &[2, 8]);
        // Padding to a multiple of 4: inputs 7 -> 8, targets 6 -> one a
        // position (2 lines of 8), the padding with weight 0.
        let padded = make_batch(&[&a, &b, &c], true, true, 4).unwrap();
        assert_eq!(padded.tokens.shape(), &[2, 9]);
        assert_eq!(padded.target_positions.as_slice::<i32>(), &[2, 3, 5, 6, 13, 14, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let weights = padded.target_weights.unwrap();
        assert_eq!(&weights.as_slice::<f32>()[..8], &[1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(weights.as_slice::<f32>().iter().sum::<f32>(), 6.0);
        assert_eq!(padded.target_tokens, 6);
        assert_eq!(&padded.packing.unwrap().segments.as_slice::<i32>()[..8], &[0, 0, 0, 0, 0, 1, 1, 1]);
        assert!(make_batch(&[&a, &b, &c], true, true, 1).unwrap().target_weights.is_none(), "unpadded targets have no weights");
        // Rows that do not pack keep the plain layout.
        assert!(make_batch(&[&c, &a], false, true, 1).unwrap().packing.is_none());
        assert!(unpacked.packing.is_none());
    }
}
