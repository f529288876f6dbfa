//! The round engine against a hostile peer, over real libp2p swarms on
//! 127.0.0.1, with a fake trainer (plain tensors, no MLX): what one peer
//! sends must not crash a node, stall its rounds, or outweigh the others.
//! Every wait is bounded.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use blossom_p2p::aggregate::{Method, Tensor, Tensors};
use blossom_p2p::aggregate::outer::OuterOptimizer;
use blossom_p2p::wire::compression::Compression;
use blossom_p2p::node::engine::{Engine, EngineEvent, EngineSettings, LocalResult, PartitionMode, RoundClock, RoundTrainer};
use blossom_p2p::p2p::network::{Average, Exchange, NetworkEvent, NetworkHandle, spawn};
use blossom_p2p::wire::codec::{Digest, Limits};
use blossom_p2p::wire::inputs::encode_inputs;
use blossom_p2p::wire::manifest::{Manifest, ManifestKind, SignedManifest};
use blossom_p2p::wire::tensors::encode;
use libp2p::Multiaddr;
use libp2p_identity::Keypair;
use tokio::sync::mpsc::Receiver;

mod common;

const WAIT: Duration = Duration::from_secs(120);
const EXAMPLES_PER_ROUND: u64 = 10;

/// A trainer that adds 0.01 to every value: enough for the engine.
#[derive(Clone)]
struct FakeTrainer;

fn adapter(value: f32) -> Tensors {
    let mut tensors = Tensors::new();
    tensors.insert("x.lora_a".into(), Tensor::new(vec![2, 2], vec![value; 4]).unwrap());
    tensors.insert("x.lora_b".into(), Tensor::new(vec![2, 2], vec![0.0; 4]).unwrap());
    tensors
}

impl RoundTrainer for FakeTrainer {
    async fn initial(&self) -> Result<Tensors, String> {
        Ok(adapter(0.5))
    }

    async fn train(&self, mut start: Tensors, rows: Vec<u64>, _round: u64) -> Result<(Tensors, LocalResult), String> {
        start.values_mut().flat_map(|t| t.values.iter_mut()).for_each(|v| *v += 0.01);
        let examples = if rows.is_empty() { 0 } else { EXAMPLES_PER_ROUND };
        Ok((start, LocalResult { loss: 1.0, examples, tokens: examples * 8 }))
    }

    async fn evaluate(&self, _adapter: Tensors) -> Result<f32, String> {
        Ok(1.0)
    }

    async fn save(&self, _adapter: Tensors, _dir: std::path::PathBuf) -> Result<(), String> {
        Ok(())
    }

    async fn optimizer_state(&self) -> Result<Tensors, String> {
        Ok(Tensors::new())
    }

    async fn restore_optimizer_state(&self, _state: Tensors) -> Result<(), String> {
        Ok(())
    }
}

fn network(dir: &tempfile::TempDir, name: &str, keypair: Keypair, bootstrap: Vec<Multiaddr>) -> (NetworkHandle, Receiver<NetworkEvent>) {
    let options = common::loopback_options(dir.path().join(name), bootstrap);
    spawn(keypair, options).expect("network starts")
}

fn settings(run_id: Digest, rounds: u64) -> EngineSettings {
    EngineSettings {
        run_id,
        rounds,
        method: Method::FedAvg,
        outer: OuterOptimizer::Average,
        compression: Compression::None,
        partition: PartitionMode::Hash { buckets: 16 },
        fingerprint: "test rows".into(),
        train_rows: Arc::new((0..64).collect()),
        clock: RoundClock::Wall { timeout: Duration::from_secs(4) },
        catch_up: true,
        min_members: 2,
        grace: Duration::from_millis(200),
        evaluate: false,
        save_every: 0,
        save_dir: None,
        limits: Limits::default(),
        measure_drift: false,
        checkpoint: None,
        examples_per_round: EXAMPLES_PER_ROUND,
        exchange: Exchange::Gossip,
        replicas: 2,
        audit: 0.0,
        misbehaviour: None,
    }
}

/// A manifest of `kind` for `round` of `run_id`, signed by `author`.
fn forged(author: &Keypair, run_id: Digest, round: u64, kind: ManifestKind, examples: u64, tensors: &Tensors) -> (SignedManifest, Manifest, Vec<u8>) {
    let bytes = encode(tensors).unwrap();
    let manifest = Manifest {
        kind,
        examples,
        ..Manifest::describe(run_id, round, &author.public().to_peer_id(), &bytes)
    };
    (SignedManifest::sign(&manifest, author).unwrap(), manifest, bytes)
}

/// Serves a forged average of `round` in a certificate the forger signs
/// alone, naming itself as the round's only contributor: every signature
/// checks out, but one contributor is below the run's quorum.
async fn serve_self_certified(net: &NetworkHandle, key: &Keypair, run_id: Digest, round: u64, tensors: &Tensors) {
    let (_, manifest, bytes) = forged(key, run_id, round, ManifestKind::Average, 0, tensors);
    let me = key.public().to_peer_id();
    let inputs = encode_inputs(&[(me, Digest::of(b"its own update"))]);
    let manifest = Manifest { inputs: Some(Digest::of(&inputs)), ..manifest };
    let attestation = Manifest::attestation(run_id, round, &me, manifest.adapter_hash, manifest.adapter_len, Digest::of(&inputs));
    let average = Average {
        signed: SignedManifest::sign(&manifest, key).unwrap(),
        attestation: SignedManifest::sign(&attestation, key).unwrap(),
        manifest,
        bytes,
        inputs,
    };
    net.keep_average(average).await.unwrap();
}

/// Starts a network that listens on loopback; returns it with its address.
async fn listening(dir: &tempfile::TempDir, name: &str, key: &Keypair) -> (NetworkHandle, Multiaddr) {
    let (net, mut events) = network(dir, name, key.clone(), vec![]);
    let addr = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(NetworkEvent::Listening(addr)) = events.recv().await {
                return addr;
            }
        }
    })
    .await
    .expect("a listen address");
    // Keep its event channel drained.
    tokio::spawn(async move { while events.recv().await.is_some() {} });
    (net, addr)
}

/// Three hostile peers join a 3-round run. A silent one subscribes and
/// announces itself for round 0, and never publishes. A forger serves a
/// self-certified "average" of round u64::MAX (every value × 500) to
/// joiners. An inflater serves a self-certified forgery of round 1, inside
/// the run but certified by itself alone, and publishes an update for round
/// 0 that claims 10^12 examples. The honest node must reject all of it,
/// never crash (u64::MAX + 1 used to panic in catch-up), never train from a
/// forgery, quarantine the two whose signed words prove them hostile (not
/// the silent one: silence proves nothing), and lose one deadline to the
/// silent peer, not one a round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_peer_cannot_crash_feed_outweigh_or_stall_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let run_id = Digest::of(b"adversary test run");
    let poisoned: Tensors = adapter(500.0);
    let silent_key = Keypair::generate_ed25519();
    let (silent, silent_addr) = listening(&dir, "silent", &silent_key).await;
    silent.subscribe(run_id, Exchange::Gossip).await.unwrap();
    // It announces itself for round 0, so the honest node waits for it.
    let hello = Manifest::hello(run_id, &silent_key.public().to_peer_id());
    silent.keep(SignedManifest::sign(&hello, &silent_key).unwrap(), hello, Vec::new()).await.unwrap();
    let forger_key = Keypair::generate_ed25519();
    let (forger, forger_addr) = listening(&dir, "forger", &forger_key).await;
    serve_self_certified(&forger, &forger_key, run_id, u64::MAX, &poisoned).await;
    let inflater_key = Keypair::generate_ed25519();
    let (inflater, inflater_addr) = listening(&dir, "inflater", &inflater_key).await;
    inflater.subscribe(run_id, Exchange::Gossip).await.unwrap();
    serve_self_certified(&inflater, &inflater_key, run_id, 1, &poisoned).await;

    let honest_key = Keypair::generate_ed25519();
    let (honest, honest_events) = network(&dir, "honest", honest_key.clone(), vec![silent_addr, forger_addr, inflater_addr]);
    let (tx, mut reports) = tokio::sync::mpsc::unbounded_channel();
    let engine = Engine::new(honest, honest_events, honest_key, FakeTrainer, settings(run_id, 3), tx);
    let running = tokio::spawn(engine.run());

    // The inflated update, once the honest node is in the gossip mesh
    // (bounded: 60 tries, a quarter second apart).
    let (signed, manifest, bytes) = forged(&inflater_key, run_id, 0, ManifestKind::Update, 1_000_000_000_000, &poisoned);
    for _ in 0..60 {
        if inflater.publish(signed.clone(), manifest.clone(), bytes.clone()).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let mut rounds = BTreeMap::new();
    let mut rejected = Vec::new();
    let mut quarantined = Vec::new();
    let collected = tokio::time::timeout(WAIT, async {
        while let Some(event) = reports.recv().await {
            match event {
                EngineEvent::Round(report) => {
                    rounds.insert(report.round, report);
                }
                EngineEvent::Rejected { reason, .. } => rejected.push(reason),
                EngineEvent::Quarantined { peer, .. } => quarantined.push(peer),
                EngineEvent::CaughtUp { round, .. } => panic!("trained from a forged average (round {round})"),
                EngineEvent::Finished => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(collected.is_ok(), "the node did not finish its 3 rounds in time; rounds {:?}, rejected {rejected:?}", rounds.keys());
    running.await.expect("the engine did not panic").expect("the engine ran to the end");

    assert_eq!(rounds.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);
    assert!(rejected.iter().any(|r| r.contains("wrong weight")), "the inflated claim is rejected: {rejected:?}");
    assert!(rejected.iter().any(|r| r.contains(&u64::MAX.to_string())), "the forged average of round u64::MAX is rejected: {rejected:?}");
    for report in rounds.values() {
        assert_eq!(report.contributors, 1, "only the honest update is averaged in round {}", report.round);
        assert!(report.average.values().flat_map(|t| t.values.iter()).all(|v| v.abs() < 1.0), "round {} averaged poison", report.round);
    }
    quarantined.sort();
    let mut proven = vec![forger_key.public().to_peer_id(), inflater_key.public().to_peer_id()];
    proven.sort();
    assert_eq!(quarantined, proven, "the forger and the inflater are quarantined, the silent peer is not");
    // The silent peer costs round 0's deadline, then is not waited for.
    assert!(rounds[&0].timed_out, "round 0 waits for the subscribed peer");
    assert!(!rounds[&1].timed_out && !rounds[&2].timed_out, "later rounds do not wait for a silent peer");
}
