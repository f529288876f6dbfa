//! Property tests of averaging: order independence and byte-identical
//! results (what lets nodes agree on one adapter hash), weights, shapes.

use blossom_p2p::aggregate::{Contribution, Method, Tensor, Tensors, aggregate};
use proptest::prelude::*;

const METHODS: [Method; 5] = [Method::FedAvg, Method::Exact, Method::Median, Method::TrimmedMean { fraction: 0.2 }, Method::NormClip];

fn contribution(author: u8, examples: u64, values: &[f32], (input, rank, output): (usize, usize, usize)) -> Contribution {
    let (a_len, b_len) = (input * rank, rank * output);
    let mut tensors = Tensors::new();
    tensors.insert("x.lora_a".into(), Tensor::new(vec![input, rank], values[..a_len].to_vec()).unwrap());
    tensors.insert("x.lora_b".into(), Tensor::new(vec![rank, output], values[a_len..a_len + b_len].to_vec()).unwrap());
    Contribution {
        author: vec![author, 7],
        examples,
        tensors,
    }
}

fn bits(t: &Tensors) -> Vec<(String, Vec<u32>)> {
    t.iter().map(|(n, t)| (n.clone(), t.values.iter().map(|v| v.to_bits()).collect())).collect()
}

prop_compose! {
    fn round_inputs()(n in 1usize..6, input in 1usize..6, rank in 1usize..3, output in 1usize..5)
        (values in prop::collection::vec(prop::collection::vec(-2.0f32..2.0, input * rank + rank * output), n),
         examples in prop::collection::vec(0u64..50, n),
         previous in prop::collection::vec(-2.0f32..2.0, input * rank + rank * output),
         dims in Just((input, rank, output)))
        -> (Vec<Contribution>, Contribution)
    {
        let inputs = values.iter().zip(&examples).enumerate().map(|(i, (v, e))| contribution(i as u8 + 1, *e, v, dims)).collect();
        (inputs, contribution(0, 0, &previous, dims))
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_order_gives_the_same_bits((inputs, previous) in round_inputs(), rotation in 0usize..6) {
        for method in METHODS {
            let forward = aggregate(method, inputs.clone(), Some(&previous.tensors)).unwrap();
            let mut shuffled = inputs.clone();
            shuffled.reverse();
            let len = shuffled.len();
            shuffled.rotate_left(rotation % len);
            let other = aggregate(method, shuffled, Some(&previous.tensors)).unwrap();
            prop_assert_eq!(bits(&forward), bits(&other), "{:?}", method);
        }
    }

    #[test]
    fn one_input_comes_back((inputs, previous) in round_inputs()) {
        let single = vec![inputs[0].clone()];
        for method in [Method::FedAvg, Method::Median, Method::TrimmedMean { fraction: 0.4 }, Method::NormClip] {
            let out = aggregate(method, single.clone(), Some(&previous.tensors)).unwrap();
            for (name, tensor) in &out {
                let want = &single[0].tensors[name].values;
                for (got, want) in tensor.values.iter().zip(want) {
                    prop_assert!((got - want).abs() <= 1e-5 * (1.0 + want.abs()), "{:?} {}: {} vs {}", method, name, got, want);
                }
            }
        }
    }

    #[test]
    fn fedavg_stays_within_the_inputs_and_follows_the_weights((inputs, _previous) in round_inputs()) {
        let out = aggregate(Method::FedAvg, inputs.clone(), None).unwrap();
        for (name, tensor) in &out {
            for (i, v) in tensor.values.iter().enumerate() {
                let column: Vec<f32> = inputs.iter().map(|c| c.tensors[name].values[i]).collect();
                let (lo, hi) = column.iter().fold((f32::MAX, f32::MIN), |(l, h), x| (l.min(*x), h.max(*x)));
                prop_assert!(*v >= lo - 1e-5 && *v <= hi + 1e-5);
            }
        }
        // Doubling every weight changes nothing; only the proportions count.
        let doubled: Vec<Contribution> = inputs.iter().cloned().map(|mut c| { c.examples *= 2; c }).collect();
        prop_assert_eq!(bits(&out), bits(&aggregate(Method::FedAvg, doubled, None).unwrap()));
    }

    #[test]
    fn a_contribution_of_another_shape_is_rejected((inputs, _previous) in round_inputs()) {
        let odd = contribution(200, 1, &[0.5; 64], (7, 1, 1));
        let mut with_odd = inputs.clone();
        with_odd.push(odd);
        for method in METHODS {
            prop_assert!(aggregate(method, with_odd.clone(), Some(&inputs[0].tensors)).is_err());
        }
    }
}

#[test]
fn weights_decide_the_mean() {
    let heavy = contribution(1, 9, &[1.0, 1.0], (1, 1, 1));
    let light = contribution(2, 1, &[0.0, 0.0], (1, 1, 1));
    let out = aggregate(Method::FedAvg, vec![light, heavy], None).unwrap();
    assert!((out["x.lora_a"].values[0] - 0.9).abs() < 1e-6);
}

#[test]
fn counts_whose_sum_passes_u64_max_do_not_overflow() {
    // Two counts of u64::MAX - 1: their sum wrapped (release) or panicked
    // (debug) before; now they weigh equally.
    for method in [Method::FedAvg, Method::NormClip] {
        let a = contribution(1, u64::MAX - 1, &[1.0, 1.0], (1, 1, 1));
        let b = contribution(2, u64::MAX - 1, &[0.0, 0.0], (1, 1, 1));
        let out = aggregate(method, vec![a, b], Some(&contribution(3, 0, &[0.5, 0.5], (1, 1, 1)).tensors)).unwrap();
        assert!((out["x.lora_a"].values[0] - 0.5).abs() < 1e-6, "{method:?}: {:?}", out["x.lora_a"].values);
    }
}
