//! The wire format: canonical adapter encoding, chunks, signed manifests and
//! the on-disk store. Property tests feed truncated and garbage bytes to every
//! decoder: they must return errors, never panic.

use std::collections::HashSet;

use blossom_p2p::wire::codec::{CHUNK_SIZE, CodecError, Digest, Limits, TensorBytes, TensorDtype, decode_adapter, encode_adapter, reassemble, split_chunks};
use blossom_p2p::wire::manifest::{Manifest, ManifestError, ManifestKind, SignedManifest, SliceClaim};
use blossom_p2p::store::{Store, StoreError};
use libp2p_identity::{Keypair, PeerId};
use libp2p::multihash::Multihash;
use proptest::prelude::*;

fn tensor(name: &str, values: &[f32], shape: &[usize]) -> TensorBytes {
    TensorBytes {
        name: name.into(),
        dtype: TensorDtype::F32,
        shape: shape.to_vec(),
        data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

fn adapter(len: usize, seed: u32) -> Vec<TensorBytes> {
    let values: Vec<f32> = (0..len).map(|i| ((i as u32).wrapping_mul(2654435761) ^ seed) as f32 / u32::MAX as f32).collect();
    vec![
        tensor("model.layers.1.self_attn.q_proj.lora_b", &values[..len / 2], &[len / 2]),
        tensor("model.layers.0.self_attn.q_proj.lora_a", &values[len / 2..], &[len - len / 2]),
    ]
}

fn manifest(keypair: &Keypair, bytes: &[u8]) -> Manifest {
    Manifest {
        parent: Some(Digest::of(b"parent")),
        examples: 40,
        tokens: 1234,
        train_loss: 0.5,
        eval_loss: Some(0.6),
        ..Manifest::describe(Digest::of(b"run"), 3, &keypair.public().to_peer_id(), bytes)
    }
}

#[test]
fn equal_tensors_give_equal_bytes_in_any_order() {
    let a = adapter(1000, 1);
    let mut b = a.clone();
    b.reverse();
    let (ea, eb) = (encode_adapter(&a).unwrap(), encode_adapter(&b).unwrap());
    assert_eq!(ea, eb);
    assert_ne!(ea, encode_adapter(&adapter(1000, 2)).unwrap());
    let decoded = decode_adapter(&ea, &Limits::default()).unwrap();
    let mut sorted = a.clone();
    sorted.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(decoded, sorted);
}

#[test]
fn a_5_mb_adapter_chunks_and_reassembles_bit_identically() {
    let bytes = encode_adapter(&adapter(5 * 1024 * 1024 / 4, 7)).unwrap();
    let chunks = split_chunks(&bytes);
    assert_eq!(chunks.len(), bytes.len().div_ceil(CHUNK_SIZE));
    assert!(chunks.iter().all(|(_, c)| c.len() <= CHUNK_SIZE));
    let ids: Vec<Digest> = chunks.iter().map(|(id, _)| *id).collect();
    let parts: Vec<&[u8]> = chunks.iter().map(|(_, c)| *c).collect();
    let back = reassemble(&ids, &parts, &Digest::of(&bytes), &Limits::default()).unwrap();
    assert_eq!(back, bytes);
    // A flipped bit in one chunk is caught and named.
    let mut corrupt = parts[2].to_vec();
    corrupt[10] ^= 1;
    let mut bad = parts.clone();
    bad[2] = &corrupt;
    assert!(matches!(reassemble(&ids, &bad, &Digest::of(&bytes), &Limits::default()), Err(CodecError::ChunkMismatch { index: 2, .. })));
    // The wrong adapter hash is caught.
    assert!(matches!(reassemble(&ids, &parts, &Digest::of(b"x"), &Limits::default()), Err(CodecError::HashMismatch { .. })));
}

#[test]
fn non_finite_values_wrong_sizes_and_limits_are_rejected() {
    let nan = encode_adapter(&[tensor("a", &[1.0, f32::NAN], &[2])]).unwrap();
    assert!(decode_adapter(&nan, &Limits::default()).unwrap_err().to_string().contains("NaN"));
    let inf = encode_adapter(&[tensor("a", &[f32::INFINITY], &[1])]).unwrap();
    assert!(decode_adapter(&inf, &Limits::default()).is_err());
    let mut short = tensor("a", &[1.0, 2.0], &[3]);
    assert!(encode_adapter(&[short.clone()]).is_err());
    short.shape = vec![2];
    assert!(encode_adapter(&[short.clone(), short]).unwrap_err().to_string().contains("twice"));
    let big = encode_adapter(&adapter(4096, 3)).unwrap();
    let tight = Limits { max_adapter_bytes: 1024, max_tensors: 10 };
    assert!(matches!(decode_adapter(&big, &tight), Err(CodecError::TooLarge(..))));
    let few = Limits { max_adapter_bytes: 1 << 20, max_tensors: 1 };
    assert!(matches!(decode_adapter(&big, &few), Err(CodecError::TooManyTensors(2, 1))));
}

#[test]
fn manifests_sign_verify_and_reject_forgeries() {
    let keypair = Keypair::generate_ed25519();
    let bytes = encode_adapter(&adapter(300_000, 5)).unwrap();
    let manifest = manifest(&keypair, &bytes);
    let signed = SignedManifest::sign(&manifest, &keypair).unwrap();
    let wire = signed.to_bytes().unwrap();
    let (back, author) = SignedManifest::from_bytes(&wire).unwrap().verify(&Limits::default()).unwrap();
    assert_eq!(back, manifest);
    assert_eq!(author, keypair.public().to_peer_id());

    // A tampered field breaks the signature.
    let mut tampered = signed.clone();
    let last = tampered.manifest.len() - 1;
    tampered.manifest[last] ^= 1;
    assert_eq!(tampered.verify(&Limits::default()).unwrap_err(), ManifestError::BadSignature);
    // Signed by someone else but claiming our author: the author's key
    // (the one its peer id embeds) does not check it.
    let mallory = Keypair::generate_ed25519();
    let forged = SignedManifest::sign(&manifest, &mallory).unwrap();
    assert_eq!(forged.verify(&Limits::default()).unwrap_err(), ManifestError::BadSignature);
    // An author whose peer id is a hash of its key cannot sign manifests.
    let hashed = PeerId::from_multihash(Multihash::wrap(0x12, &[7; 32]).unwrap()).unwrap();
    let keyless = SignedManifest::sign(&Manifest { author: hashed.to_bytes(), ..manifest.clone() }, &keypair).unwrap();
    assert!(matches!(keyless.verify(&Limits::default()), Err(ManifestError::KeylessAuthor(_))));
    // Chunk count that does not fit the length.
    let mut inconsistent = manifest.clone();
    inconsistent.chunk_ids.pop();
    let signed = SignedManifest::sign(&inconsistent, &keypair).unwrap();
    assert!(matches!(signed.verify(&Limits::default()), Err(ManifestError::Inconsistent(_))));
    let mut nan = manifest.clone();
    nan.train_loss = f32::NAN;
    assert!(matches!(SignedManifest::sign(&nan, &keypair).unwrap().verify(&Limits::default()), Err(ManifestError::Inconsistent(_))));
    // A slice claim names one slice per chunk, in increasing order.
    let claim = |indices: Vec<u32>| {
        let mut claim = Manifest::describe_chunked(manifest.run_id, 1, &keypair.public().to_peer_id(), &bytes[..1000], 400);
        claim.kind = ManifestKind::Slice;
        claim.slice = Some(SliceClaim { indices, inputs: Digest::of(b"inputs") });
        SignedManifest::sign(&claim, &keypair).unwrap().verify(&Limits::default())
    };
    assert!(claim(vec![0, 5, 9]).is_ok());
    assert!(matches!(claim(vec![0, 5]), Err(ManifestError::Inconsistent(_))), "three chunks, two slices");
    assert!(matches!(claim(vec![5, 0, 9]), Err(ManifestError::Inconsistent(_))), "out of order");
    assert!(matches!(claim(vec![5, 5, 9]), Err(ManifestError::Inconsistent(_))), "a slice twice");
    let mut future = manifest;
    future.version = 99;
    assert_eq!(SignedManifest::sign(&future, &keypair).unwrap().verify(&Limits::default()).unwrap_err(), ManifestError::Version(99));
}

#[test]
fn store_verifies_writes_atomically_collects_garbage_and_keeps_its_quota() {
    let dir = tempfile::tempdir().unwrap();
    let keypair = Keypair::generate_ed25519();
    let bytes = encode_adapter(&adapter(200_000, 9)).unwrap();
    let mut store = Store::open(dir.path(), 10 * 1024 * 1024).unwrap();
    // Chunks a peer sent are kept without fsync, the same way otherwise.
    for (i, (id, chunk)) in split_chunks(&bytes).into_iter().enumerate() {
        let put = if i % 2 == 0 { Store::put_chunk } else { Store::cache_chunk };
        assert!(put(&mut store, &id, chunk).unwrap());
        assert!(!store.put_chunk(&id, chunk).unwrap(), "already stored");
    }
    assert_eq!(store.used_bytes(), bytes.len() as u64);
    let (first_id, first) = split_chunks(&bytes)[0];
    let hex = first_id.to_hex();
    assert!(dir.path().join("chunks").join(&hex[..2]).join(&hex[2..]).is_file());
    assert_eq!(store.get_chunk(&first_id).unwrap().as_deref(), Some(first));
    assert!(matches!(store.put_chunk(&Digest::of(b"other"), first), Err(StoreError::WrongHash { .. })));

    // Reopening counts what is there; a corrupt file is detected and removed.
    drop(store);
    let mut store = Store::open(dir.path(), 10 * 1024 * 1024).unwrap();
    assert_eq!(store.used_bytes(), bytes.len() as u64);
    std::fs::write(dir.path().join("chunks").join(&hex[..2]).join(&hex[2..]), b"garbage").unwrap();
    assert!(matches!(store.get_chunk(&first_id), Err(StoreError::Corrupt(_))));
    assert_eq!(store.get_chunk(&first_id).unwrap(), None);
    store.put_chunk(&first_id, first).unwrap();

    // Round 3's manifest keeps its chunks; GC from round 4 drops them both.
    let signed = SignedManifest::sign(&manifest(&keypair, &bytes), &keypair).unwrap();
    store.put_manifest(3, &signed).unwrap();
    let stray = b"unreferenced chunk";
    store.put_chunk(&Digest::of(stray), stray).unwrap();
    let report = store.gc(3, &HashSet::new()).unwrap();
    assert_eq!((report.manifests_removed, report.chunks_removed), (0, 1));
    assert_eq!(store.manifests(3).unwrap().len(), 1);
    let report = store.gc(4, &HashSet::new()).unwrap();
    assert_eq!(report.manifests_removed, 1);
    assert_eq!(report.chunks_removed, split_chunks(&bytes).len());
    assert_eq!(store.used_bytes(), 0);

    // The quota holds.
    let mut small = Store::open(&dir.path().join("small"), 100).unwrap();
    let blob = [7u8; 80];
    small.put_chunk(&Digest::of(&blob), &blob).unwrap();
    let other = [8u8; 80];
    assert!(matches!(small.put_chunk(&Digest::of(&other), &other), Err(StoreError::Quota { .. })));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn encoding_round_trips(values in proptest::collection::vec(-1e6f32..1e6, 1..512), split in 0usize..512) {
        let split = split.min(values.len());
        let tensors = vec![tensor("b", &values[..split], &[split]), tensor("a", &values[split..], &[values.len() - split])];
        let bytes = encode_adapter(&tensors).unwrap();
        let decoded = decode_adapter(&bytes, &Limits::default()).unwrap();
        prop_assert_eq!(decoded.len(), 2);
        prop_assert_eq!(encode_adapter(&decoded).unwrap(), bytes);
    }

    #[test]
    fn truncated_adapters_are_errors(cut in 0usize..4096) {
        let bytes = encode_adapter(&adapter(1000, 11)).unwrap();
        let cut = cut.min(bytes.len() - 1);
        prop_assert!(decode_adapter(&bytes[..cut], &Limits::default()).is_err());
    }

    #[test]
    fn garbage_never_panics(garbage in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = decode_adapter(&garbage, &Limits::default());
        let _ = SignedManifest::from_bytes(&garbage).map(|m| m.verify(&Limits::default()));
    }

    #[test]
    fn truncated_or_flipped_manifests_are_errors(cut in 0usize..512, flip in 0usize..512) {
        let keypair = Keypair::generate_ed25519();
        let bytes = encode_adapter(&adapter(100, 1)).unwrap();
        let wire = SignedManifest::sign(&manifest(&keypair, &bytes), &keypair).unwrap().to_bytes().unwrap();
        let cut = cut.min(wire.len() - 1);
        prop_assert!(SignedManifest::from_bytes(&wire[..cut]).is_err());
        let mut flipped = wire.clone();
        let at = flip % flipped.len();
        flipped[at] ^= 0x40;
        let outcome = SignedManifest::from_bytes(&flipped).map(|m| m.verify(&Limits::default()));
        prop_assert!(!matches!(outcome, Ok(Ok(_))), "a flipped byte at {} was accepted", at);
    }
}
