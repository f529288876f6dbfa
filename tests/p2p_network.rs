//! Real libp2p swarms on 127.0.0.1: a 5 MB adapter published by one node is
//! reassembled bit-identically by another through gossip; a late joiner
//! catches up through request-response; a forged manifest is rejected.
//! Every wait is bounded.

use std::collections::HashSet;
use std::time::Duration;

use blossom_p2p::p2p::network::{Average, Exchange, NetworkEvent, NetworkHandle, NetworkOptions, Piece, spawn};
use blossom_p2p::wire::codec::{Digest, TensorBytes, TensorDtype, encode_adapter};
use blossom_p2p::wire::inputs::encode_inputs;
use blossom_p2p::wire::manifest::{Manifest, ManifestKind, SignedManifest};
use libp2p::pnet::PreSharedKey;
use libp2p::{Multiaddr, PeerId};
use libp2p_identity::Keypair;
use tokio::sync::mpsc::Receiver;

mod common;

const WAIT: Duration = Duration::from_secs(30);

fn node(dir: &tempfile::TempDir, name: &str, bootstrap: Vec<Multiaddr>) -> (Keypair, NetworkHandle, Receiver<NetworkEvent>) {
    private_node(dir, name, bootstrap, None)
}

fn private_node(dir: &tempfile::TempDir, name: &str, bootstrap: Vec<Multiaddr>, psk: Option<PreSharedKey>) -> (Keypair, NetworkHandle, Receiver<NetworkEvent>) {
    let keypair = Keypair::generate_ed25519();
    let (handle, events) = spawn_node(dir, name, keypair.clone(), bootstrap, psk, None);
    (keypair, handle, events)
}

fn spawn_node(
    dir: &tempfile::TempDir,
    name: &str,
    keypair: Keypair,
    bootstrap: Vec<Multiaddr>,
    psk: Option<PreSharedKey>,
    allowed_peers: Option<HashSet<PeerId>>,
) -> (NetworkHandle, Receiver<NetworkEvent>) {
    let options = NetworkOptions {
        psk,
        allowed_peers,
        ..common::loopback_options(dir.path().join(name), bootstrap)
    };
    spawn(keypair, options).expect("network starts")
}

async fn listen_addr(events: &mut Receiver<NetworkEvent>) -> Multiaddr {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(NetworkEvent::Listening(addr)) = events.recv().await {
                return addr;
            }
        }
    })
    .await
    .expect("a listen address")
}

/// The next event that `pick` accepts, within the bounded wait.
async fn wait_for<T>(events: &mut Receiver<NetworkEvent>, mut pick: impl FnMut(NetworkEvent) -> Option<T>) -> T {
    tokio::time::timeout(WAIT, async {
        loop {
            let event = events.recv().await.expect("the network task is alive");
            if let Some(found) = pick(event) {
                return found;
            }
        }
    })
    .await
    .expect("the event arrived in time")
}

/// The reason of the first rejection in `events` that contains `needle`.
async fn rejection(events: &mut Receiver<NetworkEvent>, needle: &str) -> String {
    wait_for(events, |e| match e {
        NetworkEvent::Rejected { reason, .. } if reason.contains(needle) => Some(reason),
        _ => None,
    })
    .await
}

fn adapter_bytes(megabytes: usize) -> Vec<u8> {
    let count = megabytes * 1024 * 1024 / 4;
    let data: Vec<u8> = (0..count).flat_map(|i| ((i % 1000) as f32 / 1000.0).to_le_bytes()).collect();
    encode_adapter(&[TensorBytes {
        name: "model.layers.0.self_attn.q_proj.lora_a".into(),
        dtype: TensorDtype::F32,
        shape: vec![count],
        data,
    }])
    .unwrap()
}

fn make_manifest(run_id: Digest, author: &Keypair, bytes: &[u8]) -> Manifest {
    Manifest::describe(run_id, 1, &author.public().to_peer_id(), bytes)
}

/// Publishing needs the gossip mesh to exist; retry for a bounded time.
async fn publish_when_meshed(handle: &NetworkHandle, signed: &SignedManifest, manifest: &Manifest, bytes: &[u8]) {
    for _ in 0..60 {
        if handle.publish(signed.clone(), manifest.clone(), bytes.to_vec()).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("could not publish within 15 s");
}

type Node = (Keypair, NetworkHandle, Receiver<NetworkEvent>);

/// B, then A dialing B, both in `run_id`'s topics, connected; and B's address.
async fn connected_pair(dir: &tempfile::TempDir, run_id: Digest, exchange: Exchange) -> (Node, Node, Multiaddr) {
    let (b_key, b, mut b_events) = node(dir, "b", vec![]);
    let b_addr = listen_addr(&mut b_events).await;
    let (a_key, a, mut a_events) = node(dir, "a", vec![b_addr.clone()]);
    a.subscribe(run_id, exchange).await.unwrap();
    b.subscribe(run_id, exchange).await.unwrap();
    wait_for(&mut a_events, |e| matches!(e, NetworkEvent::PeerConnected(_)).then_some(())).await;
    ((a_key, a, a_events), (b_key, b, b_events), b_addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_travel_by_gossip_and_late_joiners_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let run_id = Digest::of(b"test run");
    let ((_, a, mut a_events), (b_key, b, mut b_events), b_addr) = connected_pair(&dir, run_id, Exchange::Gossip).await;

    let bytes = adapter_bytes(5);
    let manifest = make_manifest(run_id, &b_key, &bytes);
    let signed = SignedManifest::sign(&manifest, &b_key).unwrap();
    publish_when_meshed(&b, &signed, &manifest, &bytes).await;
    let received = wait_for(&mut a_events, |e| match e {
        NetworkEvent::AdapterReady { bytes, author, .. } => Some((bytes, author)),
        _ => None,
    })
    .await;
    assert_eq!(received.1, b.peer_id);
    assert_eq!(Digest::of(&received.0), manifest.adapter_hash);
    assert!(received.0 == bytes, "reassembled adapter differs");

    // C joins after the gossip is over and catches up by request-response.
    let (_, c, mut c_events) = node(&dir, "c", vec![b_addr.clone()]);
    c.subscribe(run_id, Exchange::Gossip).await.unwrap();
    wait_for(&mut c_events, |e| matches!(e, NetworkEvent::PeerConnected(_)).then_some(())).await;
    c.catch_up(run_id).await.unwrap();
    let late = wait_for(&mut c_events, |e| match e {
        NetworkEvent::AdapterReady { bytes, .. } => Some(bytes),
        _ => None,
    })
    .await;
    assert!(late == bytes, "the late joiner got different bytes");

    // A manifest B really signed, followed by chunks that are not the
    // adapter it names: A rejects the chunks (they are not forwarded), and
    // B's score at A turns negative.
    let real = adapter_bytes(1);
    let mut wrong = real.clone();
    let last = wrong.len() - 1;
    wrong[last] ^= 0x01;
    // Of round 2: a second update for round 1 would be equivocation.
    let honest_manifest = Manifest { round: 2, ..make_manifest(run_id, &b_key, &real) };
    let signed = SignedManifest::sign(&honest_manifest, &b_key).unwrap();
    publish_when_meshed(&b, &signed, &honest_manifest, &wrong).await;
    let reason = rejection(&mut a_events, "does not match its manifest").await;
    assert!(reason.contains("chunk"), "{reason}");

    // C publishes a manifest signed by someone else in B's name: B, its
    // neighbour, rejects it.
    let mallory = Keypair::generate_ed25519();
    let small = adapter_bytes(1);
    let forged_manifest = make_manifest(run_id, &b_key, &small);
    let forged = SignedManifest::sign(&forged_manifest, &mallory).unwrap();
    publish_when_meshed(&c, &forged, &forged_manifest, &small).await;
    let reason = rejection(&mut b_events, "signature does not match the author's key").await;
    assert!(reason.contains("signature"), "{reason}");
    let score = a.peer_score(b.peer_id).await.unwrap().expect("A scores B");
    assert!(score < 0.0, "B's score after invalid messages is {score}");
}

/// An outer state is served by its hash, certified or not: a node whose
/// start is not the one most of a round's updates trained from takes that
/// one (compressed changes add up only on one start). Its chunks are
/// checked against the hash asked for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncertified_state_is_served_by_its_hash() {
    let dir = tempfile::tempdir().unwrap();
    let run_id = Digest::of(b"test run");
    let ((_, a, mut a_events), (b_key, b, _b_events), _) = connected_pair(&dir, run_id, Exchange::Gossip).await;
    let bytes = adapter_bytes(2);
    // Its input list names three authors: B's attestation alone certifies nothing.
    let others = [Keypair::generate_ed25519(), Keypair::generate_ed25519()].map(|k| k.public().to_peer_id());
    let inputs = encode_inputs(&[(b.peer_id, Digest::of(b"b")), (others[0], Digest::of(b"c")), (others[1], Digest::of(b"d"))]);
    let manifest = Manifest {
        kind: ManifestKind::Average,
        round: 3,
        inputs: Some(Digest::of(&inputs)),
        ..make_manifest(run_id, &b_key, &bytes)
    };
    let hash = manifest.adapter_hash;
    let attestation = Manifest::attestation(run_id, 3, &b.peer_id, hash, manifest.adapter_len, Digest::of(&inputs));
    let average = Average {
        signed: SignedManifest::sign(&manifest, &b_key).unwrap(),
        attestation: SignedManifest::sign(&attestation, &b_key).unwrap(),
        manifest,
        bytes: bytes.clone(),
        inputs,
    };
    b.keep_average(average).await.unwrap();
    // A state nobody holds brings nothing; the one B kept, its bytes.
    a.ask_state(run_id, Digest::of(b"no such state")).await.unwrap();
    a.ask_state(run_id, hash).await.unwrap();
    let (kind, got_hash, got) = wait_for(&mut a_events, |e| match e {
        NetworkEvent::AdapterReady { manifest, bytes, .. } => Some((manifest.kind, manifest.adapter_hash, bytes)),
        _ => None,
    })
    .await;
    assert_eq!((kind, got_hash), (ManifestKind::Average, hash));
    assert!(got == bytes, "the state arrived with other bytes");
}

/// The reduce exchange's update manifests name their chunks by a Merkle
/// root: a chunk is fetched point to point by (adapter, index) with its
/// proof, checked against the signed root, and served on by whoever
/// fetched it; a proof that does not reach the root is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_of_a_rooted_update_are_proven_and_served_on() {
    let dir = tempfile::tempdir().unwrap();
    let run_id = Digest::of(b"reduce run");
    let ((_, a, mut a_events), (b_key, b, _b_events), _) = connected_pair(&dir, run_id, Exchange::Reduce).await;

    let bytes = adapter_bytes(1);
    let chunk_size = 64 * 1024;
    let listed = Manifest::describe_chunked(run_id, 1, &b.peer_id, &bytes, chunk_size);
    let ids = listed.chunk_ids.clone();
    let manifest = listed.rooted();
    assert!(manifest.chunk_ids.is_empty());
    let signed = SignedManifest::sign(&manifest, &b_key).unwrap();
    // Kept by B whether or not the gossip mesh is up yet.
    let _ = b.publish(signed, manifest.clone(), bytes.clone()).await;
    let piece = Piece {
        adapter: manifest.adapter_hash,
        index: 3,
        root: manifest.chunk_root.unwrap(),
        count: manifest.chunk_count(),
        part: None,
    };
    let expected = &bytes[3 * chunk_size..4 * chunk_size];
    let got = a.fetch_piece(piece, vec![b.peer_id]).await.unwrap().expect("B serves its piece");
    assert_eq!(got, expected);
    assert_eq!(Digest::of(&got), ids[3]);

    // A proof that does not reach the root it is checked against.
    let wrong = Piece { root: Digest::of(b"another root"), index: 4, ..piece };
    assert!(a.fetch_piece(wrong, vec![b.peer_id]).await.unwrap().is_none());
    let reason = rejection(&mut a_events, "proof").await;
    assert!(reason.contains("signed root"), "{reason}");

    // C fetches the piece from A, which fetched it and kept its proof.
    let a_addrs = a.listen_addrs().await.unwrap();
    let (_, c, mut c_events) = node(&dir, "c", a_addrs);
    c.subscribe(run_id, Exchange::Reduce).await.unwrap();
    wait_for(&mut c_events, |e| matches!(e, NetworkEvent::PeerConnected(_)).then_some(())).await;
    let served_on = c.fetch_piece(piece, vec![a.peer_id]).await.unwrap().expect("A serves the piece on");
    assert_eq!(served_on, expected);

    // Part of a piece (what an audit of part of a slice fetches): only
    // those bytes, proven under the chunk's id, from its author or from a
    // peer that kept the piece.
    let part = Piece { index: 5, part: Some((1000, 4096)), ..piece };
    let got = a.fetch_piece(part, vec![b.peer_id]).await.unwrap().expect("B serves part of its piece");
    assert_eq!(got, &bytes[5 * chunk_size + 1000..5 * chunk_size + 5096]);
    let part_on = Piece { part: Some((chunk_size as u32 - 8, 8)), ..piece };
    let got = c.fetch_piece(part_on, vec![a.peer_id]).await.unwrap().expect("A serves part of the piece on");
    assert_eq!(got, &expected[chunk_size - 8..]);
    let past_the_end = Piece { part: Some((chunk_size as u32 - 8, 16)), ..part };
    assert!(a.fetch_piece(past_the_end, vec![b.peer_id]).await.unwrap().is_none());
    let wrong_part = Piece { root: Digest::of(b"another root"), index: 6, ..part };
    assert!(a.fetch_piece(wrong_part, vec![b.peer_id]).await.unwrap().is_none());
    let reason = rejection(&mut a_events, "part of piece 6").await;
    assert!(reason.contains("signed root"), "{reason}");
}

/// Whether `events` reports a connection within `wait`.
async fn connects(events: &mut Receiver<NetworkEvent>, wait: Duration) -> bool {
    tokio::time::timeout(wait, async {
        loop {
            match events.recv().await {
                Some(NetworkEvent::PeerConnected(_)) => return true,
                Some(_) => {}
                None => return false,
            }
        }
    })
    .await
    .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pre_shared_key_keeps_outsiders_out() {
    let dir = tempfile::tempdir().unwrap();
    let key = PreSharedKey::new([7u8; 32]);
    let (_, _a, mut a_events) = private_node(&dir, "a", vec![], Some(key));
    let a_addr = listen_addr(&mut a_events).await;
    // The same key connects.
    let (_, _b, mut b_events) = private_node(&dir, "b", vec![a_addr.clone()], Some(key));
    assert!(connects(&mut b_events, WAIT).await, "a node with the key could not connect");
    // No key, or another key, does not.
    let (_, _c, mut c_events) = node(&dir, "c", vec![a_addr.clone()]);
    assert!(!connects(&mut c_events, Duration::from_secs(4)).await, "a node without the key connected");
    let (_, _d, mut d_events) = private_node(&dir, "d", vec![a_addr], Some(PreSharedKey::new([8u8; 32])));
    assert!(!connects(&mut d_events, Duration::from_secs(4)).await, "a node with another key connected");
}

/// A closed run: A and B allow each other; C, outside the list, is refused
/// by A at connection time and never becomes A's peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowlist_keeps_other_peers_out() {
    let dir = tempfile::tempdir().unwrap();
    let (a_key, b_key) = (Keypair::generate_ed25519(), Keypair::generate_ed25519());
    let allowed: HashSet<PeerId> = [a_key.public().to_peer_id(), b_key.public().to_peer_id()].into();
    let (a, mut a_events) = spawn_node(&dir, "a", a_key, vec![], None, Some(allowed.clone()));
    let a_addr = listen_addr(&mut a_events).await;
    let (b, _b_events) = spawn_node(&dir, "b", b_key, vec![a_addr.clone()], None, Some(allowed));
    let connected = wait_for(&mut a_events, |e| match e {
        NetworkEvent::PeerConnected(peer) => Some(peer),
        _ => None,
    })
    .await;
    assert_eq!(connected, b.peer_id);
    let (_, c, _c_events) = node(&dir, "c", vec![a_addr.clone()]);
    // C dials A repeatedly for a few seconds; A never takes it as a peer.
    let c_peer = c.peer_id;
    let outsider_connected = tokio::time::timeout(Duration::from_secs(4), async {
        loop {
            let _ = c.dial(a_addr.clone()).await;
            match tokio::time::timeout(Duration::from_millis(500), a_events.recv()).await {
                Ok(Some(NetworkEvent::PeerConnected(peer))) if peer == c_peer => return true,
                Ok(None) => return false,
                _ => {}
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(!outsider_connected, "a peer outside the allowlist connected");
    assert!(!a.connected_peers().await.unwrap().contains(&c_peer));
    assert!(a.connected_peers().await.unwrap().contains(&b.peer_id));
}

/// A reaches B through a `/p2p-circuit` address on the relay R.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_is_reachable_through_a_relay_circuit() {
    let dir = tempfile::tempdir().unwrap();
    let options = |name: &str, relay_server: bool, bootstrap: Vec<Multiaddr>| NetworkOptions {
        relay_server: relay_server.then(|| blossom_p2p::commands::node_args::relay_limits(&Default::default())),
        hole_punching: true,
        store_quota: 1 << 20,
        ..common::loopback_options(dir.path().join(name), bootstrap)
    };
    let (r, mut r_events) = spawn(Keypair::generate_ed25519(), options("r", true, vec![])).unwrap();
    let r_addr = listen_addr(&mut r_events).await.with(libp2p::multiaddr::Protocol::P2p(r.peer_id));
    let (b, mut b_events) = spawn(Keypair::generate_ed25519(), options("b", false, vec![r_addr.clone()])).unwrap();
    wait_for(&mut b_events, |e| matches!(e, NetworkEvent::PeerConnected(_)).then_some(())).await;
    let circuit = r_addr.clone().with(libp2p::multiaddr::Protocol::P2pCircuit);
    b.listen_on(circuit.clone()).await.unwrap();
    // The reservation is confirmed when B reports the circuit as a listen address.
    let relayed = wait_for(&mut b_events, |e| match e {
        NetworkEvent::Listening(addr) if addr.to_string().contains("p2p-circuit") => Some(addr),
        _ => None,
    })
    .await;
    assert!(relayed.to_string().starts_with(&circuit.to_string()), "{relayed}");

    // A knows only the circuit address of B.
    let (a, mut a_events) = spawn(Keypair::generate_ed25519(), options("a", false, vec![])).unwrap();
    a.dial(circuit.with(libp2p::multiaddr::Protocol::P2p(b.peer_id))).await.unwrap();
    let peer = wait_for(&mut a_events, |e| match e {
        NetworkEvent::PeerConnected(peer) if peer == b.peer_id => Some(peer),
        _ => None,
    })
    .await;
    assert_eq!(peer, b.peer_id);
    assert!(a.connected_peers().await.unwrap().contains(&b.peer_id));
}

async fn quarantined(events: &mut Receiver<NetworkEvent>) -> (PeerId, String) {
    wait_for(events, |e| match e {
        NetworkEvent::Quarantined { peer, reason } => Some((peer, reason)),
        _ => None,
    })
    .await
}

/// A and C connected to B only (C accepts no one but B), all three in
/// `run_id`'s gossip topics; C's events are drained.
async fn a_b_c_in_a_line(dir: &tempfile::TempDir, run_id: Digest) -> (Node, Node, (Keypair, NetworkHandle)) {
    let (b_key, b, mut b_events) = node(dir, "b", vec![]);
    let b_addr = listen_addr(&mut b_events).await;
    let (a_key, a, mut a_events) = node(dir, "a", vec![b_addr.clone()]);
    let c_key = Keypair::generate_ed25519();
    let (c, mut c_events) = spawn_node(dir, "c", c_key.clone(), vec![b_addr], None, Some(HashSet::from([b.peer_id])));
    for net in [&a, &b, &c] {
        net.subscribe(run_id, Exchange::Gossip).await.unwrap();
    }
    wait_for(&mut a_events, |e| matches!(e, NetworkEvent::PeerConnected(_)).then_some(())).await;
    wait_for(&mut c_events, |e| matches!(e, NetworkEvent::PeerConnected(_)).then_some(())).await;
    tokio::spawn(async move { while c_events.recv().await.is_some() {} });
    ((a_key, a, a_events), (b_key, b, b_events), (c_key, c))
}

/// C signs two different updates for one round. B, its only link to A
/// (C accepts no one but B), sees both, rejects the second and gossips the
/// pair as evidence; A, which only ever got the first, checks the evidence
/// and quarantines C too. C's own node refuses to sign a second update
/// through the normal path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equivocation_evidence_reaches_a_node_that_saw_one_update() {
    let dir = tempfile::tempdir().unwrap();
    let run_id = Digest::of(b"evidence run");
    let ((_, a, mut a_events), (_, b, mut b_events), (c_key, c)) = a_b_c_in_a_line(&dir, run_id).await;

    let first = adapter_bytes(1);
    let manifest = make_manifest(run_id, &c_key, &first);
    publish_when_meshed(&c, &SignedManifest::sign(&manifest, &c_key).unwrap(), &manifest, &first).await;
    wait_for(&mut a_events, |e| matches!(e, NetworkEvent::AdapterReady { author, .. } if author == c.peer_id).then_some(())).await;

    // A got the first update through B: it is not connected to C.
    assert!(!a.connected_peers().await.unwrap().contains(&c.peer_id));
    let mut second = adapter_bytes(1);
    let last = second.len() - 1;
    second[last] ^= 1;
    let other = make_manifest(run_id, &c_key, &second);
    let refused = c.publish(SignedManifest::sign(&other, &c_key).unwrap(), other.clone(), second.clone()).await;
    assert!(refused.unwrap_err().to_string().contains("already published another update for round 1"));
    c.publish_unguarded(SignedManifest::sign(&other, &c_key).unwrap(), other, second).await.unwrap();

    let (peer, reason) = quarantined(&mut b_events).await;
    assert_eq!(peer, c.peer_id);
    assert!(reason.contains("equivocation"), "{reason}");
    let (peer, reason) = quarantined(&mut a_events).await;
    assert_eq!(peer, c.peer_id);
    assert!(reason.contains("equivocation: two different signed updates for round 1"), "{reason}");
    // B closed C's connection.
    for _ in 0..40 {
        if !b.connected_peers().await.unwrap().contains(&c.peer_id) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("B still connected to the quarantined C");
}

/// A quarantined C, still trusted by B, publishes through B, A's only
/// link to it. A refuses what B forwards from C without holding it against
/// B: gossipsub's score for B stays clean, so A's own update still reaches
/// B (a penalty for forwarding would put B below A's publish threshold).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_a_quarantined_peers_manifest_costs_the_forwarder_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run_id = Digest::of(b"forwarder run");
    let ((a_key, a, mut a_events), (b_key, b, mut b_events), (c_key, c)) = a_b_c_in_a_line(&dir, run_id).await;
    a.ban(c.peer_id);
    // Commands run in order: once this answers, C is quarantined at A.
    assert!(!a.connected_peers().await.unwrap().contains(&c.peer_id));

    let from_c = adapter_bytes(1);
    let manifest = make_manifest(run_id, &c_key, &from_c);
    publish_when_meshed(&c, &SignedManifest::sign(&manifest, &c_key).unwrap(), &manifest, &from_c).await;
    wait_for(&mut b_events, |e| matches!(e, NetworkEvent::AdapterReady { author, .. } if author == c.peer_id).then_some(())).await;
    // B forwarded C's manifest to A before it published its own: once A
    // has B's update, it has refused C's.
    let from_b = adapter_bytes(1);
    let manifest = make_manifest(run_id, &b_key, &from_b);
    publish_when_meshed(&b, &SignedManifest::sign(&manifest, &b_key).unwrap(), &manifest, &from_b).await;
    let mut refused_from_b = false;
    wait_for(&mut a_events, |e| match e {
        NetworkEvent::AdapterReady { author, .. } if author == b.peer_id => Some(()),
        NetworkEvent::Rejected { peer, .. } if peer == b.peer_id => {
            refused_from_b = true;
            None
        }
        _ => None,
    })
    .await;
    assert!(!refused_from_b, "A held C's manifest against B, who only forwarded it");

    let from_a = adapter_bytes(1);
    let manifest = make_manifest(run_id, &a_key, &from_a);
    publish_when_meshed(&a, &SignedManifest::sign(&manifest, &a_key).unwrap(), &manifest, &from_a).await;
    wait_for(&mut b_events, |e| matches!(e, NetworkEvent::AdapterReady { author, .. } if author == a.peer_id).then_some(())).await;
}
