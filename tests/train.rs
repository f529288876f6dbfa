//! The trainer on the tiny model: the loss falls, only the adapter changes,
//! adapters round-trip bit-exactly, a resumed run equals an uninterrupted
//! one, and bad settings, rows and adapters are clear errors.

use std::path::Path;

use blossom_p2p::config::{Config, FineTuneType};
use blossom_p2p::data::layout::load_folder;
use blossom_p2p::data::{Dataset, Row, Sample, load_dataset};
use blossom_p2p::model::attention::Layout;
use blossom_p2p::model::{LoadOptions, QuantMode, load_model};
use blossom_p2p::train::batch::{Encoded, encode, make_batch};
use blossom_p2p::train::checkpoint::{self, CheckpointState};
use blossom_p2p::train::lora::{AdapterParams, LoraApplier, LoraSettings};
use blossom_p2p::train::{LocalTrainer, MlxTrainer, TrainError, adapters, batch_loss, token_losses};
use mlx_rs::Array;

mod common;

fn config(dora: bool) -> Config {
    let mut config = Config::default();
    config.lora.fine_tune_type = if dora { FineTuneType::Dora } else { FineTuneType::Lora };
    config.lora.num_layers = 2;
    config.lora.scale = 20.0;
    config.lora.keys = vec!["self_attn.q_proj".into(), "self_attn.v_proj".into(), "mlp.down_proj".into()];
    config.train.learning_rate = 1e-3;
    config.train.learning_rate_min = 1e-4;
    config.train.mask_prompt = true;
    config.train.batch_size = 2;
    config
}

fn trainer(config: &Config, total_steps: u64) -> MlxTrainer {
    let model = load_model("tiny", &LoadOptions { quant: QuantMode::Keep }).unwrap();
    MlxTrainer::new(model.decoder, model.tokenizer, LoraSettings::from_config(&config.lora), config.train.clone(), total_steps).unwrap()
}

fn builtin() -> Dataset {
    load_dataset("builtin", 0, None).unwrap()
}

/// Bit-exact equality of two adapters.
fn same(a: &AdapterParams, b: &AdapterParams) -> bool {
    a.len() == b.len()
        && a.iter().all(|(name, x)| {
            b.get(name).is_some_and(|y| x.shape() == y.shape() && x.as_slice::<f32>().iter().map(|v| v.to_bits()).eq(y.as_slice::<f32>().iter().map(|v| v.to_bits())))
        })
}

#[test]
fn tiny_loss_falls_with_lora_and_dora() {
    let data = builtin();
    for dora in [false, true] {
        let config = config(dora);
        let mut trainer = trainer(&config, 30);
        let before = trainer.evaluate(&data.valid[..16]).unwrap();
        let report = trainer.train_steps(&data.train, 30, 0).unwrap();
        let after = trainer.evaluate(&data.valid[..16]).unwrap();
        assert_eq!(report.steps, 30);
        assert!(report.tokens > 0 && report.examples == 60);
        assert!(after.loss < before.loss - 0.3, "dora={dora}: {} -> {}", before.loss, after.loss);
        // DoRA also learns the magnitudes.
        let has_m = trainer.adapter().keys().any(|k| k.ends_with(".m"));
        assert_eq!(has_m, dora);
    }
}

#[test]
fn only_adapter_parameters_change() {
    let data = builtin();
    let config = config(true);
    let mut trainer = trainer(&config, 5);
    let base_bits = |decoder: &blossom_p2p::model::Decoder| -> Vec<(String, Vec<u32>)> {
        let weights = decoder.weights().unwrap().into_inner();
        weights.into_iter().map(|(k, v)| (k, v.as_slice::<f32>().iter().map(|x| x.to_bits()).collect())).collect()
    };
    let base_before = base_bits(&trainer.decoder);
    let adapter_before = trainer.adapter().clone();
    trainer.train_steps(&data.train, 5, 0).unwrap();
    assert_eq!(base_before, base_bits(&trainer.decoder), "the base model changed");
    for (name, before) in &adapter_before {
        let after = &trainer.adapter()[name];
        let moved = before.subtract(after).unwrap().abs().unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap();
        assert!(moved > 0.0, "{name} did not train");
    }
}

#[test]
fn adapters_round_trip_bit_exactly_in_mlx_lm_format() {
    let data = builtin();
    let config = config(false);
    let mut trainer = trainer(&config, 3);
    trainer.train_steps(&data.train, 3, 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    adapters::save(dir.path(), trainer.adapter(), &trainer.settings).unwrap();
    let (loaded, settings) = adapters::load(dir.path(), &trainer.decoder).unwrap();
    assert!(same(trainer.adapter(), &loaded));
    assert_eq!(settings, trainer.settings);
    let config_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config_json["fine_tune_type"], "lora");
    assert_eq!(config_json["num_layers"], 2);
    assert_eq!(config_json["lora_parameters"]["rank"], 8);
    // mlx-lm's names and shapes: lora_a is [in, rank], lora_b [rank, out].
    let a = &loaded["model.layers.3.self_attn.q_proj.lora_a"];
    let b = &loaded["model.layers.3.self_attn.q_proj.lora_b"];
    assert_eq!((a.shape(), b.shape()), (&[64, 8][..], &[8, 64][..]));
    assert!(!loaded.contains_key("model.layers.1.self_attn.q_proj.lora_a"), "only the last num_layers blocks");
}

#[test]
fn the_compiled_step_gives_the_losses_of_the_uncompiled_one() {
    let data = builtin();
    // The last case pads lines and targets to 32 (as a compiled step does
    // on a GPU), both ways.
    for (dora, pack, pad_to) in [(false, false, None), (true, false, None), (false, true, None), (true, true, Some(32))] {
        let mut config = config(dora);
        config.lora.dropout = 0.1; // the masks must follow the step under compilation too
        config.train.pack = pack;
        config.train.batch_size = 4;
        // Whole batches both ways (op by op never splits one; each part of
        // a split batch draws its own dropout masks).
        config.train.cpu_streams = Some(1);
        let losses = |compile: bool, pad_to: Option<u32>| -> (Vec<f32>, AdapterParams) {
            let mut config = config.clone();
            config.train.compile = compile;
            config.train.pad_to = pad_to;
            let mut trainer = trainer(&config, 10);
            let losses = (0..10).map(|step| trainer.train_steps(&data.train, 1, step).unwrap().loss).collect();
            (losses, trainer.adapter().clone())
        };
        let (compiled, compiled_adapter) = losses(true, pad_to);
        let (plain, plain_adapter) = losses(false, pad_to);
        if pad_to.is_some() {
            // Padding leaves the loss alone. Only the first step starts from
            // the same adapter: later ones drift apart by more than 1e-5, as
            // Adam turns rounding in near-zero gradients into whole steps.
            let unpadded = losses(false, None).0[0];
            assert!((compiled[0] - unpadded).abs() <= 1e-5 * unpadded.abs().max(1.0), "padded {}, unpadded {unpadded}", compiled[0]);
        }
        let case = format!("dora={dora} pack={pack} pad_to={pad_to:?}");
        for (step, (c, p)) in compiled.iter().zip(&plain).enumerate() {
            assert!((c - p).abs() <= 1e-5 * p.abs().max(1.0), "{case} step {step}: compiled {c}, op by op {p}");
        }
        // The steps moved the adapter, and both ways moved it alike.
        assert!(compiled[9] < compiled[0], "{case}: {compiled:?}");
        for (name, c) in &compiled_adapter {
            let gap = c.subtract(&plain_adapter[name]).unwrap().abs().unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap();
            assert!(gap <= 1e-4, "{case}: {name} differs by {gap}");
        }
    }
}

/// One compiled function a step, queued before the one before it has
/// finished (`train.pipeline`, the GPU's default), trains as the loss and
/// gradients and then the update evaluated in turn: the same losses and
/// adapter, to rounding. When the loss stops being finite the pipelined
/// run (which has by then queued the next step) stops naming that step,
/// with the adapter from before it: bit for bit the adapter of a pipelined
/// run that stops one step short.
#[test]
fn pipelined_steps_train_as_steps_evaluated_in_turn() {
    let data = builtin();
    let mut config = config(true);
    config.lora.dropout = 0.1;
    config.train.batch_size = 1;
    let run = |pipeline: bool, learning_rate: f64, steps: u64| {
        let mut config = config.clone();
        config.train.pipeline = Some(pipeline);
        config.train.learning_rate = learning_rate;
        config.train.learning_rate_min = learning_rate;
        let mut trainer = trainer(&config, 12);
        let result = trainer.train_steps(&data.train, steps, 0);
        (result, trainer.adapter().clone())
    };
    let (pipelined, pipelined_adapter) = run(true, 1e-3, 12);
    let (in_turn, in_turn_adapter) = run(false, 1e-3, 12);
    let (pipelined, in_turn) = (pipelined.unwrap(), in_turn.unwrap());
    assert_eq!(pipelined.steps, 12);
    assert!((pipelined.loss - in_turn.loss).abs() <= 1e-5 * in_turn.loss.abs(), "{} against {}", pipelined.loss, in_turn.loss);
    assert!(!same(&pipelined_adapter, &run(true, 1e-3, 11).1), "the last step changed nothing");
    for (name, tensor) in &pipelined_adapter {
        let gap = tensor.subtract(&in_turn_adapter[name]).unwrap().abs().unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap();
        assert!(gap <= 1e-4, "{name} differs by {gap}");
    }

    // A learning rate this large makes the loss infinite or NaN within a few steps.
    let (Err(TrainError::Data(failure)), kept) = run(true, 1e4, 12) else {
        panic!("a learning rate of 1e4 trained without a non-finite loss");
    };
    assert!(failure.contains("the loss became") && failure.contains("lower train.learning_rate"), "{failure}");
    let failed_step: u64 = failure.split("at step ").nth(1).and_then(|rest| rest.split(';').next()).and_then(|step| step.parse().ok()).unwrap();
    let (before, expected) = run(true, 1e4, failed_step);
    assert!(before.is_ok(), "the steps before step {failed_step} failed: {before:?}");
    assert!(same(&kept, &expected), "after {failure} the pipelined run kept another adapter than the one before that step");
    let (Err(TrainError::Data(in_turn_failure)), _) = run(false, 1e4, 12) else {
        panic!("a learning rate of 1e4 trained in turn without a non-finite loss");
    };
    assert!(in_turn_failure.contains("the loss became"), "{in_turn_failure}");
}

/// A batch's rows split over CPU streams computed at once (`train.cpu_streams`,
/// with the compiled step) train as the whole batch does: the same losses
/// step by step, the same adapter, the same evaluation, the same rows and
/// targets counted. Op by op a batch stays whole.
#[test]
fn a_batch_split_over_cpu_streams_trains_as_one() {
    let data = builtin();
    for (compile, pack) in [(true, false), (true, true), (false, false)] {
        let mut config = config(true);
        // Each part draws its own dropout masks: without dropout the
        // parts compute exactly the whole batch's terms.
        config.lora.dropout = 0.0;
        config.train.batch_size = 4;
        config.train.pack = pack;
        config.train.compile = compile;
        let run = |streams: u32| {
            let mut config = config.clone();
            config.train.cpu_streams = Some(streams);
            let mut trainer = trainer(&config, 10);
            let mut reports = Vec::new();
            for step in 0..10 {
                reports.push(trainer.train_steps(&data.train, 1, step).unwrap());
            }
            let eval = trainer.evaluate(&data.valid[..12]).unwrap();
            (reports, trainer.adapter().clone(), eval)
        };
        let (whole, whole_adapter, whole_eval) = run(1);
        // Three streams for four rows: parts of two, one and one row.
        for streams in [2, 3] {
            let case = format!("compile={compile} pack={pack} streams={streams}");
            let (split, split_adapter, split_eval) = run(streams);
            let expected_streams = if compile { streams } else { 1 };
            assert!(whole.iter().all(|r| r.streams == 1) && split.iter().all(|r| r.streams == expected_streams), "{case}: {split:?}");
            for (step, (w, s)) in whole.iter().zip(&split).enumerate() {
                assert!((w.loss - s.loss).abs() <= 1e-5 * w.loss.abs().max(1.0), "{case} step {step}: whole {}, split {}", w.loss, s.loss);
                assert_eq!((w.examples, w.tokens, w.processed_tokens), (s.examples, s.tokens, s.processed_tokens), "{case} step {step}");
                // Each part pads to its own longest row.
                assert!(s.computed_tokens <= w.computed_tokens, "{case} step {step}");
            }
            assert!(whole[9].loss < whole[0].loss, "{case}: the steps did not train");
            for (name, w) in &whole_adapter {
                let gap = w.subtract(&split_adapter[name]).unwrap().abs().unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap();
                assert!(gap <= 1e-4, "{case}: {name} differs by {gap}");
            }
            assert_eq!(whole_eval.tokens, split_eval.tokens, "{case}");
            assert!((whole_eval.loss - split_eval.loss).abs() <= 1e-5 * whole_eval.loss.abs().max(1.0), "{case}: eval {whole_eval:?} against {split_eval:?}");
        }
    }
}

/// A one-row batch long enough is cut into chunks of positions computed on
/// CPU streams at once (the later chunk attending to the earlier one's keys
/// and values): the losses and the adapter are the whole row's. With
/// dropout each chunk draws its own masks, the same every run.
#[test]
fn a_long_row_in_chunks_trains_as_the_whole_row() {
    let words = ["apple", "river", "stone", "cloud", "tiger", "paper", "green", "music"];
    let rows: Vec<Row> = (0..6)
        .map(|i| Row {
            index: i,
            sample: Sample::Text { text: (0..400).map(|w| words[(w * (i as usize + 3)) % words.len()]).collect::<Vec<_>>().join(" ") },
        })
        .collect();
    let mut config = config(false);
    config.lora.dropout = 0.0;
    config.train.batch_size = 1;
    config.train.mask_prompt = false;
    let run = |config: &Config, streams: u32| {
        let mut config = config.clone();
        config.train.cpu_streams = Some(streams);
        let mut trainer = trainer(&config, 6);
        let reports: Vec<_> = (0..6).map(|step| trainer.train_steps(&rows, 1, step).unwrap()).collect();
        (reports, trainer.adapter().clone())
    };
    let (whole, whole_adapter) = run(&config, 1);
    let (chunked, chunked_adapter) = run(&config, 2);
    assert!(whole.iter().all(|r| r.streams == 1) && chunked.iter().all(|r| r.streams == 2), "{chunked:?}");
    assert!(whole[0].processed_tokens >= 257, "rows of {} tokens are too short to chunk", whole[0].processed_tokens);
    for (step, (w, c)) in whole.iter().zip(&chunked).enumerate() {
        assert!((w.loss - c.loss).abs() <= 1e-5 * w.loss.abs().max(1.0), "step {step}: whole {}, chunked {}", w.loss, c.loss);
        assert_eq!((w.tokens, w.processed_tokens), (c.tokens, c.processed_tokens), "step {step}");
    }
    assert!(whole[5].loss < whole[0].loss, "the steps did not train: {whole:?}");
    for (name, w) in &whole_adapter {
        let gap = w.subtract(&chunked_adapter[name]).unwrap().abs().unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap();
        assert!(gap <= 1e-4, "{name} differs by {gap}");
    }
    config.lora.dropout = 0.2;
    let (first, first_adapter) = run(&config, 2);
    let (again, again_adapter) = run(&config, 2);
    assert!(first.iter().all(|r| r.streams == 2 && r.loss.is_finite()));
    assert_eq!(first.iter().map(|r| r.loss).collect::<Vec<_>>(), again.iter().map(|r| r.loss).collect::<Vec<_>>());
    assert!(same(&first_adapter, &again_adapter), "chunked dropout is not repeatable");
}

#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    for pack in [false, true] {
        resumed_run_equals_an_uninterrupted_one(pack);
    }
}

fn resumed_run_equals_an_uninterrupted_one(pack: bool) {
    let data = builtin();
    let mut config = config(true);
    config.lora.dropout = 0.2; // dropout masks must repeat too
    config.train.grad_accumulation_steps = 2;
    config.train.pack = pack;
    config.train.batch_size = 4;
    // Short rows and a fifth three times as long, so that packed batches
    // put several rows in one line.
    let mut rows = data.train[..64].to_vec();
    for i in 0..16 {
        let text = data.train[i..i + 3].iter().map(|row| format!("{:?}", row.sample)).collect::<Vec<_>>().join(" ");
        rows.push(Row { index: 100_000 + i as u64, sample: Sample::Text { text } });
    }
    let data = Dataset { train: rows, ..data };
    let mut straight = trainer(&config, 8);
    straight.train_steps(&data.train, 8, 0).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let mut first = trainer(&config, 8);
    first.train_steps(&data.train, 4, 0).unwrap();
    let state = CheckpointState {
        step: 4,
        seed: config.train.seed,
        dataset: data.fingerprint.clone(),
    };
    checkpoint::save(dir.path(), &first, &state).unwrap();
    drop(first);
    let mut resumed = trainer(&config, 8);
    let loaded = checkpoint::load(dir.path(), &mut resumed, &data.fingerprint).unwrap().expect("a checkpoint");
    assert_eq!(loaded, state);
    resumed.train_steps(&data.train, 4, 4).unwrap();
    assert!(same(straight.adapter(), resumed.adapter()), "pack={pack}: resumed run diverged");
    // Another data set's checkpoint is refused.
    let err = checkpoint::load(dir.path(), &mut resumed, "other").unwrap_err();
    assert!(err.to_string().contains("another data set"), "{err}");
}

/// Rows packed into shared sequences are trained on exactly as alone: each
/// row's summed loss is the same, within float rounding.
#[test]
fn packed_rows_have_the_losses_they_have_alone() {
    let data = builtin();
    let config = config(true);
    let mut trainer = trainer(&config, 4);
    trainer.train_steps(&data.train, 4, 0).unwrap(); // an adapter that does something
    let applier = LoraApplier {
        params: &trainer.params,
        settings: &trainer.settings,
        dropout: None,
    };
    let mut encoded: Vec<_> = data.train[..8].iter().map(|row| encode(&trainer.tokenizer, row, 512).unwrap()).collect();
    // A row three times as long, so that lines hold several short ones.
    let long_tokens = encoded[..3].iter().flat_map(|e| e.tokens.clone()).collect();
    encoded.push(Encoded { tokens: long_tokens, prompt_len: encoded[0].prompt_len });
    let refs: Vec<_> = encoded.iter().collect();
    let packed = make_batch(&refs, true, true, 1).unwrap();
    let lines = packed.tokens.shape()[0];
    assert!((2..=5).contains(&lines), "9 rows packed into {lines} lines");
    let losses = token_losses(&trainer.decoder, &applier, &packed).unwrap();
    // The row of each counted target.
    let segments = packed.packing.as_ref().unwrap().segments.flatten(None, None).unwrap().take_axis(&packed.target_positions, 0).unwrap();
    for (i, example) in encoded.iter().enumerate() {
        let in_row = segments.eq(Array::from_int(i as i32)).unwrap().as_dtype(mlx_rs::Dtype::Float32).unwrap();
        let packed_loss = losses.multiply(&in_row).unwrap().sum(None).unwrap().try_item_cast::<f32>().unwrap();
        let alone = make_batch(&[example], true, false, 1).unwrap();
        let alone_loss = token_losses(&trainer.decoder, &applier, &alone).unwrap().sum(None).unwrap().try_item_cast::<f32>().unwrap();
        assert!(alone_loss > 0.0);
        assert!((packed_loss - alone_loss).abs() <= 1e-4 * alone_loss.max(1.0), "row {i}: packed {packed_loss}, alone {alone_loss}");
    }
    // The batch's mean loss is the same as the padded batch's.
    let padded = make_batch(&refs, true, false, 1).unwrap();
    let (a, b) = (
        batch_loss(&trainer.decoder, &applier, &packed).unwrap().try_item_cast::<f32>().unwrap(),
        batch_loss(&trainer.decoder, &applier, &padded).unwrap().try_item_cast::<f32>().unwrap(),
    );
    assert!((a - b).abs() < 1e-4, "packed {a}, padded {b}");
}

/// Rows of mixed length: batches grouped by length train on as many rows
/// with far less padding, and evaluate to the same loss.
#[test]
fn batches_grouped_by_length_pad_less_and_train_as_many_rows() {
    let words = ["apple", "river", "stone", "cloud", "tiger", "paper", "green", "music"];
    let rows: Vec<Row> = (0..24u64)
        .map(|i| Row {
            index: i,
            sample: Sample::Text {
                text: (0..1 + (i * 7) % 24).map(|k| words[(k as usize + i as usize) % words.len()]).collect::<Vec<_>>().join(" "),
            },
        })
        .collect();
    let mut trainers = Vec::new();
    let mut reports = Vec::new();
    for grouped in [false, true] {
        let mut config = config(false);
        config.train.batch_size = 4;
        config.train.group_by_length = grouped;
        let mut trainer = trainer(&config, 6);
        let report = trainer.train_steps(&rows, 6, 0).unwrap();
        assert!(report.loss.is_finite());
        reports.push(report);
        trainers.push(trainer);
    }
    let (shuffled, grouped) = (&reports[0], &reports[1]);
    assert_eq!((shuffled.examples, grouped.examples), (24, 24), "6 steps of 4 rows either way");
    let padding = |r: &blossom_p2p::train::TrainReport| r.computed_tokens - r.processed_tokens;
    assert!(padding(grouped) * 3 < padding(shuffled), "padding grouped {} against shuffled {}", padding(grouped), padding(shuffled));
    // One epoch of six full batches: every row once, grouped or not.
    assert_eq!(grouped.processed_tokens, shuffled.processed_tokens);
    // Evaluation batches grouped by length give the same loss for the same adapter.
    let adapter = trainers[0].params.clone();
    trainers[1].set_adapter(adapter).unwrap();
    let (a, b) = (trainers[0].evaluate(&rows).unwrap().loss, trainers[1].evaluate(&rows).unwrap().loss);
    assert!(a.is_finite() && (a - b).abs() <= 1e-5 * a.abs().max(1.0), "evaluated shuffled {a}, grouped {b}");
}

/// The loss computes the output head only at counted targets; it equals
/// the loss over full logits (every position, then masked), as before.
#[test]
fn the_loss_at_counted_targets_equals_the_loss_over_full_logits() {
    let data = builtin();
    let config = config(false);
    let mut trainer = trainer(&config, 2);
    trainer.train_steps(&data.train, 2, 0).unwrap();
    let applier = LoraApplier {
        params: &trainer.params,
        settings: &trainer.settings,
        dropout: None,
    };
    let encoded: Vec<_> = data.train[..3].iter().map(|row| encode(&trainer.tokenizer, row, 512).unwrap()).collect();
    let batch = make_batch(&encoded.iter().collect::<Vec<_>>(), true, false, 1).unwrap();
    let len = batch.tokens.shape()[1];
    let inputs = batch.tokens.take_axis(mlx_rs::ops::arange::<_, i32>(0, len - 1, None).unwrap(), 1).unwrap();
    let logits = trainer.decoder.forward_adapted(&inputs, None, Layout::ROWS, Some(&applier)).unwrap();
    let vocab = logits.shape()[2];
    let flat = logits.reshape(&[-1, vocab]).unwrap().take_axis(&batch.target_positions, 0).unwrap();
    let picked = flat.take_along_axis(batch.target_ids.expand_dims(-1).unwrap(), -1).unwrap().squeeze_axes(&[-1]).unwrap();
    let full = flat.logsumexp_axis(-1, None).unwrap().subtract(&picked).unwrap().mean(None).unwrap().try_item_cast::<f32>().unwrap();
    let counted = batch_loss(&trainer.decoder, &applier, &batch).unwrap().try_item_cast::<f32>().unwrap();
    assert!(full > 0.1 && (full - counted).abs() < 1e-5, "full logits {full}, counted targets {counted}");
    // The counted targets are the completion tokens, none of the prompt's.
    let prompt_targets: usize = encoded.iter().map(|e| e.prompt_len - 1).sum();
    let all_targets: usize = encoded.iter().map(|e| e.tokens.len() - 1).sum();
    assert_eq!(batch.target_tokens, all_targets - prompt_targets);
}

#[test]
fn mask_prompt_covers_exactly_the_chat_prompt() {
    let data = builtin();
    let model = load_model("tiny", &LoadOptions::default()).unwrap();
    let encoded = encode(&model.tokenizer, &data.train[0], 512).unwrap();
    let blossom_p2p::data::Sample::PromptCompletion { prompt, completion } = &data.train[0].sample else { panic!() };
    let prompt_ids = model.tokenizer.encode_chat(&[blossom_p2p::model::chat::ChatMessage::user(prompt.clone())]).unwrap();
    assert_eq!(encoded.prompt_len, prompt_ids.len());
    assert_eq!(&encoded.tokens[..encoded.prompt_len], &prompt_ids[..]);
    let trained = model.tokenizer.decode(&encoded.tokens[encoded.prompt_len..], false).unwrap();
    assert_eq!(trained, format!("{completion}<|im_end|>\n"));
}

#[test]
fn bad_settings_are_clear_errors() {
    let model = load_model("tiny", &LoadOptions::default()).unwrap();
    let mut settings = LoraSettings::from_config(&config(false).lora);
    let check = |settings: &LoraSettings, expected: &str| {
        let err = settings.init(&model.decoder, 0).unwrap_err().to_string();
        assert!(err.contains(expected), "{err}");
    };
    settings.rank = 0;
    check(&settings, "lora.rank must be at least 1");
    settings.rank = 8;
    settings.num_layers = 9;
    check(&settings, "lora.num_layers = 9 but the model has 4 layers");
    settings.num_layers = 2;
    settings.keys = vec!["self_attn.qkv".into()];
    check(&settings, "unknown LoRA target key `self_attn.qkv`");
}

#[test]
fn an_adapter_for_another_model_is_refused() {
    let data = builtin();
    let mut config = config(false);
    config.lora.num_layers = 4;
    let mut trainer = trainer(&config, 1);
    trainer.train_steps(&data.train, 1, 0).unwrap();
    let dir = tempfile::tempdir().unwrap();
    adapters::save(dir.path(), trainer.adapter(), &trainer.settings).unwrap();
    // The Qwen3 fixture has 2 layers: 4 adapted layers cannot fit.
    let other = load_model(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/models/qwen3"), &LoadOptions::default());
    let other = match other {
        Ok(model) => model.decoder,
        // The fixture has no tokenizer; build the decoder alone.
        Err(_) => {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen3");
            let (args, weights, _) = blossom_p2p::model::load::load_hf_weights(&dir).unwrap();
            blossom_p2p::model::Decoder::from_weights(args, weights).unwrap()
        }
    };
    let err = adapters::load(dir.path(), &other).unwrap_err().to_string();
    assert!(err.contains("does not fit this model") && err.contains("num_layers = 4"), "{err}");
    // A corrupted tensor shape is named.
    let mut params = trainer.adapter().clone();
    let name = params.keys().next().unwrap().clone();
    params.insert(name.clone(), Array::zeros::<f32>(&[3, 3]).unwrap());
    let err = trainer.set_adapter(params).unwrap_err().to_string();
    assert!(err.contains(&*name) && err.contains("[3, 3]"), "{err}");
}

#[test]
fn malformed_rows_name_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let write = |text: &str| std::fs::write(dir.path().join("train.jsonl"), text).unwrap();
    let err = |text: &str| {
        write(text);
        load_folder(dir.path(), None).unwrap_err().to_string()
    };
    let e = err("{\"text\": \"ok\"}\n{\"text\": 5}\n");
    assert!(e.contains("train.jsonl:2") && e.contains("`text` must be a string"), "{e}");
    let e = err("{\"prompt\": \"p\", \"completion\": \"c\"}\nnot json\n");
    assert!(e.contains("train.jsonl:2") && e.contains("not valid JSON"), "{e}");
    let e = err("{\"question\": \"q\"}\n");
    assert!(e.contains("train.jsonl:1") && e.contains("unknown row format"), "{e}");
    let e = err("{\"messages\": [{\"role\": \"robot\", \"content\": \"x\"}]}\n");
    assert!(e.contains("unknown role `robot`"), "{e}");
    // Valid data: valid.jsonl absent, so the last tenth is held out.
    let rows: String = (0..20).map(|i| format!("{{\"prompt\": \"q{i}\", \"completion\": \"a{i}\"}}\n")).collect();
    write(&rows);
    let data = load_folder(dir.path(), None).unwrap();
    assert_eq!((data.train.len(), data.valid.len()), (18, 2));
    assert_eq!(data.valid[0].index, 18);
}

#[test]
fn trainer_errors_on_an_empty_row_set() {
    let config = config(false);
    let mut trainer = trainer(&config, 1);
    assert!(matches!(trainer.train_steps(&[], 1, 0), Err(TrainError::Data(_))));
}

use common::blossom;

#[test]
fn train_command_writes_adapters_metrics_and_checkpoints_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let out_str = out.to_str().unwrap();
    let common = ["--set", "lora.num_layers=2", "--set", "train.learning_rate=0.001", "-q"];
    let mut args = common.to_vec();
    args.extend(["train", "--model", "tiny", "--iters", "6", "--steps-per-eval", "3", "--save-every", "3", "--val-rows", "4", "--exact-match-rows", "2", "--adapter-path", out_str]);
    let output = blossom(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("exact match before training") && stdout.contains("exact match after training"), "{stdout}");
    for file in ["adapters.safetensors", "adapter_config.json", "metrics.jsonl", "checkpoint/state.json", "checkpoint/optimizer.safetensors"] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["step"], 6);
    assert!(lines[1]["val_loss"].as_f64().is_some() && lines[1]["train_loss"].as_f64().is_some());

    // Resume to 9 steps: one more metrics line, at step 9.
    let mut args = common.to_vec();
    args.extend(["train", "--model", "tiny", "--iters", "9", "--steps-per-eval", "3", "--save-every", "3", "--val-rows", "4", "--exact-match-rows", "0", "--adapter-path", out_str, "--resume"]);
    let output = blossom(&args);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    assert!(metrics.lines().last().unwrap().contains("\"step\":9"));

    // The adapter works in generate and eval.
    let output = blossom(&["-q", "generate", "--model", "tiny", "--adapter-path", out_str, "--prompt", "hi", "--max-tokens", "4"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let output = blossom(&["-q", "eval", "--model", "tiny", "--adapter-path", out_str, "--rows", "4"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("perplexity") && stdout.contains("exact match"), "{stdout}");

    // Bad data is exit code 2 with the file and line.
    std::fs::write(dir.path().join("train.jsonl"), "{\"text\": 1}\n").unwrap();
    let output = blossom(&["train", "--model", "tiny", "--data", dir.path().to_str().unwrap(), "--iters", "1"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("train.jsonl:1"));
}

#[test]
fn fused_export_equals_the_adapted_model() {
    let data = builtin();
    for dora in [false, true] {
        let config = config(dora);
        let mut trainer = trainer(&config, 10);
        trainer.train_steps(&data.train, 10, 0).unwrap();
        let tokens = Array::from_slice(&[5i32, 17, 200, 3, 99, 42], &[1, 6]);
        let applier = blossom_p2p::train::lora::LoraApplier {
            params: trainer.adapter(),
            settings: &trainer.settings,
            dropout: None,
        };
        let adapted = trainer.decoder.forward_adapted(&tokens, None, Layout::ROWS, Some(&applier)).unwrap();
        let mut fused = trainer.decoder.clone();
        blossom_p2p::train::lora::fuse(&mut fused, trainer.adapter(), &trainer.settings).unwrap();
        let direct = fused.forward(&tokens, None, None).unwrap();
        let diff = adapted.subtract(&direct).unwrap().abs().unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap();
        assert!(diff < 1e-4, "dora={dora}: fused model differs by {diff}");
        let base = trainer.decoder.forward(&tokens, None, None).unwrap();
        let moved = adapted.subtract(&base).unwrap().abs().unwrap().max(None).unwrap().try_item_cast::<f32>().unwrap();
        assert!(moved > 1e-3, "the adapter changes nothing ({moved})");
    }
}

#[test]
fn export_writes_fused_models_and_adapter_folders() {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    let output = blossom(&["-q", "--set", "lora.num_layers=2", "train", "--model", "tiny", "--iters", "2", "--exact-match-rows", "0", "--adapter-path", adapter.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let fused = dir.path().join("fused");
    let output = blossom(&["-q", "export", "--model", "tiny", "--adapter", adapter.to_str().unwrap(), "--fuse", "--out", fused.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(fused.join("model.safetensors").exists() && !fused.join("adapters").exists());
    let beside = dir.path().join("beside");
    let output = blossom(&["-q", "export", "--model", "tiny", "--adapter", adapter.to_str().unwrap(), "--out", beside.to_str().unwrap()]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(beside.join("adapters/adapters.safetensors").exists() && beside.join("adapters/adapter_config.json").exists());
    // The fused folder, alone, answers as the base plus the adapter.
    let with_adapter = blossom(&["-q", "generate", "--model", "tiny", "--adapter-path", adapter.to_str().unwrap(), "--prompt", "hello", "--max-tokens", "12"]);
    let from_fused = blossom(&["-q", "generate", "--model", fused.to_str().unwrap(), "--prompt", "hello", "--max-tokens", "12"]);
    assert_eq!(String::from_utf8_lossy(&with_adapter.stdout), String::from_utf8_lossy(&from_fused.stdout));
    // --fuse without --adapter is a usage error.
    let output = blossom(&["export", "--model", "tiny", "--fuse", "--out", dir.path().join("x").to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn hub_data_sets_load_from_the_cache_offline() {
    let (cache, snapshot) = common::fake_hub_cache("datasets", "blossom-test", "words");
    std::fs::create_dir_all(snapshot.join("data")).unwrap();
    let rows: String = (0..12).map(|i| format!("{{\"prompt\": \"say {i}\", \"completion\": \"{i}\"}}\n")).collect();
    std::fs::write(snapshot.join("data/train.jsonl"), rows).unwrap();
    let adapter = cache.path().join("adapter");
    let run = |spec: &str| {
        let args = ["-q", "--set", "lora.num_layers=2", "train", "--model", "tiny", "--data", spec, "--iters", "2", "--exact-match-rows", "0", "--adapter-path"];
        common::run_offline(cache.path(), &[&args[..], &[adapter.to_str().unwrap()]].concat())
    };
    let output = run("hf:blossom-test/words");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    common::assert_absent_repo_is_a_clear_error(&run("hf:blossom-test/absent"));
}

#[test]
fn qlora_and_every_optimizer_train() {
    use blossom_p2p::config::Optimizer;
    let data = builtin();
    // QLoRA: the frozen base stays 4-bit quantized.
    let config_q = config(false);
    let model = load_model("tiny", &LoadOptions { quant: QuantMode::Keep }).unwrap();
    let mut decoder = model.decoder;
    decoder.quantize(32, 4).unwrap();
    let mut qlora = MlxTrainer::new(decoder, model.tokenizer, LoraSettings::from_config(&config_q.lora), config_q.train.clone(), 20).unwrap();
    let before = qlora.evaluate(&data.valid[..8]).unwrap().loss;
    qlora.train_steps(&data.train, 20, 0).unwrap();
    assert!(qlora.decoder.is_quantized());
    let after = qlora.evaluate(&data.valid[..8]).unwrap().loss;
    assert!(after < before - 0.2, "QLoRA: {before} -> {after}");
    for (optimizer, learning_rate) in [(Optimizer::Adam, 1e-3), (Optimizer::Sgd, 0.5)] {
        let mut config = config(false);
        config.train.optimizer = optimizer;
        config.train.learning_rate = learning_rate;
        config.train.learning_rate_min = learning_rate / 10.0;
        let mut trainer = trainer(&config, 20);
        let before = trainer.evaluate(&data.valid[..8]).unwrap().loss;
        trainer.train_steps(&data.train, 20, 0).unwrap();
        let after = trainer.evaluate(&data.valid[..8]).unwrap().loss;
        assert!(after < before - 0.2, "{optimizer:?}: {before} -> {after}");
    }
}

fn parquet_fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parquet").join(name)
}

#[test]
fn parquet_rows_read_as_their_jsonl_twins() {
    // Written by pyarrow (scripts/make_parquet_fixtures.py): two snappy
    // shards and a `validation` split, as `datasets.push_to_hub` lays them out.
    let parquet = load_folder(&parquet_fixture("words"), None).unwrap();
    let jsonl = load_folder(&parquet_fixture("words.jsonl"), None).unwrap();
    assert_eq!((parquet.train.len(), parquet.valid.len(), parquet.test.len()), (20, 4, 0));
    assert_eq!(parquet.train, jsonl.train, "same rows, same indices, across both shards");
    assert_eq!(parquet.valid, jsonl.valid);
    assert_eq!(parquet.valid[0].index, 20);
    assert_eq!(parquet.fingerprint, jsonl.fingerprint, "the format does not change the fingerprint");
    // The Hub conversion's layout, `messages` as a list of structs, gzip.
    let chat = load_folder(&parquet_fixture("chat"), None).unwrap();
    assert_eq!((chat.train.len() + chat.valid.len(), chat.test.len()), (8, 2));
    assert_eq!(chat.test[1].index, 9);
    match &chat.test[0].sample {
        blossom_p2p::data::Sample::Messages { messages } => {
            assert_eq!(messages.len(), 2);
            assert_eq!(messages[1].role, "assistant");
            assert!(messages[0].content.starts_with("Reverse the order of these words: "), "{messages:?}");
        }
        other => panic!("expected messages, got {other:?}"),
    }
}

#[test]
fn bad_parquet_files_are_clear_errors() {
    let e = load_folder(&parquet_fixture("bad"), None).unwrap_err().to_string();
    assert!(e.contains("bad/train.parquet:2") && e.contains("`text` must be a string"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read(parquet_fixture("words/data/train-00000-of-00002.parquet")).unwrap();
    for (what, bytes) in [("truncated", &good[..good.len() / 2]), ("garbage", &b"PAR1 not a parquet file PAR1"[..]), ("empty", &[][..])] {
        std::fs::write(dir.path().join("train.parquet"), bytes).unwrap();
        let e = load_folder(dir.path(), None).unwrap_err().to_string();
        assert!(e.contains("train.parquet") && e.contains("Parquet"), "{what}: {e}");
    }
    std::fs::remove_file(dir.path().join("train.parquet")).unwrap();
    std::fs::write(dir.path().join("notes.parquet"), &good).unwrap();
    let e = load_folder(dir.path(), None).unwrap_err().to_string();
    assert!(e.contains("no training split") && e.contains("train.parquet"), "{e}");
}

#[test]
fn a_parquet_hub_data_set_trains_from_the_cache_offline() {
    let (cache, snapshot) = common::fake_hub_cache("datasets", "blossom-test", "words-parquet");
    std::fs::create_dir_all(snapshot.join("data")).unwrap();
    for file in ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet", "validation-00000-of-00001.parquet"] {
        std::fs::copy(parquet_fixture("words/data").join(file), snapshot.join("data").join(file)).unwrap();
    }
    let adapter = cache.path().join("adapter");
    let args = ["--set", "lora.num_layers=2", "train", "--model", "tiny", "--data", "hf:blossom-test/words-parquet", "--iters", "4"];
    let output = common::run_offline(cache.path(), &[&args[..], &["--steps-per-eval", "4", "--val-rows", "4", "--exact-match-rows", "0", "--adapter-path", adapter.to_str().unwrap()]].concat());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("train_rows=20"), "trained on the 20 rows of both shards: {stderr}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("step 4: train loss"), "{}", String::from_utf8_lossy(&output.stdout));
    assert!(adapter.join("adapters.safetensors").is_file());
}

/// `--quant bfloat16`: the base computes in bfloat16 (dense or quantized),
/// the adapter stays float32, and the losses follow float32's.
#[test]
fn bfloat16_training_follows_float32() {
    use mlx_rs::Dtype;
    let data = builtin();
    let rows = &data.valid[..8];
    for (dora, quantized) in [(false, false), (true, true)] {
        let config = config(dora);
        let float = load_model("tiny", &LoadOptions { quant: QuantMode::Keep }).unwrap();
        let mut float_decoder = float.decoder.clone();
        if quantized {
            float_decoder.quantize(32, 8).unwrap();
        }
        let half_decoder = float_decoder.with_float_dtype(Dtype::Bfloat16).unwrap();
        for (name, array) in half_decoder.weights().unwrap().into_inner() {
            let expected = if name.ends_with(".weight") && quantized && !name.contains("norm") { Dtype::Uint32 } else { Dtype::Bfloat16 };
            assert_eq!(array.dtype(), expected, "{name}");
        }
        let settings = LoraSettings::from_config(&config.lora);
        let mut float_trainer = MlxTrainer::new(float_decoder, float.tokenizer.clone(), settings.clone(), config.train.clone(), 20).unwrap();
        let mut half_trainer = MlxTrainer::new(half_decoder, float.tokenizer.clone(), settings.clone(), config.train.clone(), 20).unwrap();
        // Activations stay bfloat16 through the adapted projections.
        let tokens = Array::from_slice(&[3i32, 9, 27, 4], &[1, 4]);
        let applier = LoraApplier { params: half_trainer.adapter(), settings: &settings, dropout: None };
        let logits = half_trainer.decoder.forward_adapted(&tokens, None, Layout::ROWS, Some(&applier)).unwrap();
        assert_eq!(logits.dtype(), Dtype::Bfloat16, "dora={dora} quantized={quantized}");
        let (float_before, half_before) = (float_trainer.evaluate(rows).unwrap().loss, half_trainer.evaluate(rows).unwrap().loss);
        float_trainer.train_steps(&data.train, 20, 0).unwrap();
        half_trainer.train_steps(&data.train, 20, 0).unwrap();
        let (float_after, half_after) = (float_trainer.evaluate(rows).unwrap().loss, half_trainer.evaluate(rows).unwrap().loss);
        let label = format!("dora={dora} quantized={quantized}: float32 {float_before} -> {float_after}, bfloat16 {half_before} -> {half_after}");
        eprintln!("{label}");
        assert!((half_before - float_before).abs() < 0.02 * float_before, "{label}");
        assert!(half_after < half_before - 0.2, "{label}");
        assert!((half_after - float_after).abs() < 0.05 * float_after, "{label}");
        assert!(half_trainer.adapter().values().all(|a| a.dtype() == Dtype::Float32), "{label}: the adapter left float32");
    }
}

/// The warm-up of rows of mixed lengths traces every batch shape an epoch
/// holds, on throwaway state: an epoch of training afterwards traces
/// nothing new, and the adapter is what it was.
#[test]
fn tracing_every_shape_leaves_nothing_to_trace_in_an_epoch() {
    let mut config = config(false);
    config.train.batch_size = 4;
    config.train.pad_to = Some(8);
    let rows: Vec<Row> = (0..32u64)
        .map(|i| Row {
            index: i,
            sample: Sample::Text { text: format!("{i} {}", "the river carried the boat ".repeat(1 + i as usize % 7)) },
        })
        .collect();
    let mut trainer = trainer(&config, 40);
    let before = trainer.adapter().clone();
    let shapes = trainer.trace_every_shape(&rows).unwrap();
    assert!(shapes >= 4, "only {shapes} shapes in rows of 7 lengths");
    assert!(same(&before, trainer.adapter()), "the warm-up changed the adapter");
    let traced = trainer.traced_shapes();
    assert!(traced >= shapes, "{traced} traces for {shapes} shapes");
    trainer.train_steps(&rows, 8, 0).unwrap();
    assert_eq!(trainer.traced_shapes(), traced, "an epoch after the warm-up traced new shapes");
}
