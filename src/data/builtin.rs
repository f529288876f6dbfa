//! The built-in task of the offline default: reverse the order of a few
//! words. It follows a rule rather than facts, so it is learnable from
//! examples; SmolLM2-135M does it poorly out of the box, and a few hundred
//! LoRA steps teach it. Rows are generated from a seed, the held-out splits
//! share no prompt with the training split, and the metric is exact match.

use std::collections::HashSet;

use crate::rng::SeededRng;

use super::{DataError, Dataset, Row, Sample};

pub const TRAIN_ROWS: usize = 2000;
pub const VALID_ROWS: usize = 100;
pub const TEST_ROWS: usize = 200;

const WORDS: &[&str] = &[
    "apple", "river", "stone", "cloud", "tiger", "paper", "green", "music", "house", "bread", "light", "chair", "ocean", "mouse",
    "table", "smile", "train", "grass", "honey", "pearl", "storm", "tulip", "radio", "lemon", "piano", "shell", "candle", "forest",
    "garden", "rocket", "window", "silver", "orange", "pencil", "rabbit", "dragon", "castle", "bottle", "button", "carpet", "coffee",
    "desert", "finger", "flower", "guitar", "island", "jacket", "kitten", "ladder", "mirror", "needle", "parrot", "pepper", "planet",
    "puzzle", "saddle", "spider", "tomato", "turtle", "violin", "wallet", "yellow", "anchor", "basket", "cheese", "dinner", "engine",
    "feather", "glove", "hammer", "igloo", "jungle", "kettle", "magnet", "napkin", "oyster", "pillow", "quartz", "ribbon", "sugar",
    "tunnel", "umbrella", "valley", "walnut", "zebra", "bridge", "cotton", "falcon", "ginger", "helmet", "marble", "nickel", "copper",
    "meadow", "sparrow", "thunder", "blanket", "compass", "lantern", "mustard",
];

pub const INSTRUCTION: &str = "Reverse the order of these words:";

/// The prompt and the expected answer for `words`.
pub fn example(words: &[&str]) -> (String, String) {
    let prompt = format!("{INSTRUCTION} {}", words.join(" "));
    let answer = words.iter().rev().copied().collect::<Vec<_>>().join(" ");
    (prompt, answer)
}

fn draw(rng: &mut SeededRng) -> (String, String) {
    let count = 3 + rng.below(3) as usize;
    let mut words: Vec<&str> = Vec::with_capacity(count);
    while words.len() < count {
        let word = WORDS[rng.below(WORDS.len() as u64) as usize];
        if !words.contains(&word) {
            words.push(word);
        }
    }
    example(&words)
}

/// Whether a generated answer counts: the same words in the same order,
/// ignoring surrounding whitespace and a final period.
pub fn exact_match(generated: &str, expected: &str) -> bool {
    let clean = |s: &str| s.trim().trim_end_matches('.').split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
    clean(generated) == clean(expected)
}

pub fn dataset(seed: u64) -> Result<Dataset, DataError> {
    let mut rng = SeededRng::new(seed ^ 0xB105_5011);
    let mut seen = HashSet::new();
    let mut rows = Vec::with_capacity(TRAIN_ROWS + VALID_ROWS + TEST_ROWS);
    // Bounded: the space of 3-5 distinct words from 100 is far larger than
    // the rows needed, so duplicates are rare.
    for _ in 0..(TRAIN_ROWS + VALID_ROWS + TEST_ROWS) * 4 {
        if rows.len() == TRAIN_ROWS + VALID_ROWS + TEST_ROWS {
            break;
        }
        let (prompt, completion) = draw(&mut rng);
        if seen.insert(prompt.clone()) {
            rows.push(Row {
                index: rows.len() as u64,
                sample: Sample::PromptCompletion { prompt, completion },
            });
        }
    }
    let test = rows.split_off(TRAIN_ROWS + VALID_ROWS);
    let valid = rows.split_off(TRAIN_ROWS);
    Dataset::new(format!("builtin:reverse-words:{seed}"), rows, valid, test)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_is_deterministic_and_splits_are_disjoint() {
        let a = dataset(0).unwrap();
        let b = dataset(0).unwrap();
        let c = dataset(1).unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        assert_ne!(a.fingerprint, c.fingerprint);
        assert_eq!((a.train.len(), a.valid.len(), a.test.len()), (TRAIN_ROWS, VALID_ROWS, TEST_ROWS));
        let prompts = |rows: &[Row]| -> HashSet<String> {
            rows.iter()
                .map(|r| match &r.sample {
                    Sample::PromptCompletion { prompt, .. } => prompt.clone(),
                    other => panic!("unexpected {other:?}"),
                })
                .collect()
        };
        assert!(prompts(&a.train).is_disjoint(&prompts(&a.test)));
        assert!(prompts(&a.train).is_disjoint(&prompts(&a.valid)));
        let indices: Vec<u64> = a.train.iter().chain(&a.valid).chain(&a.test).map(|r| r.index).collect();
        assert_eq!(indices, (0..indices.len() as u64).collect::<Vec<_>>());
    }

    #[test]
    fn answers_reverse_the_words_and_match_loosely() {
        let (prompt, answer) = example(&["apple", "river", "stone"]);
        assert_eq!(prompt, "Reverse the order of these words: apple river stone");
        assert_eq!(answer, "stone river apple");
        assert!(exact_match(" Stone river apple.\n", &answer));
        assert!(!exact_match("stone apple river", &answer));
    }
}
