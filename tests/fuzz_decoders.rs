//! Every decoder that reads bytes from the network (and the GGUF structure
//! check that guards MLX's parser) fed arbitrary and mutated input: it must
//! return an error or a value, never panic, and never accept a tampered
//! manifest. Short in the test suite (2,000 cases each); the long run is
//! `BLOSSOM_FUZZ_CASES=100000 cargo test --test fuzz_decoders`.

use blossom_p2p::p2p::chunk_protocol::{ChunkCodec, PROTOCOL};
use blossom_p2p::wire::codec::{ChunkMessage, Digest, Limits, TensorBytes, TensorDtype, decode_adapter, encode_adapter, reassemble, split_chunks};
use blossom_p2p::wire::manifest::{Manifest, SignedManifest};
use libp2p::request_response::Codec;
use libp2p_identity::Keypair;
use proptest::prelude::*;

fn cases() -> u32 {
    std::env::var("BLOSSOM_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

fn valid_adapter() -> Vec<u8> {
    encode_adapter(&[
        TensorBytes {
            name: "model.layers.0.self_attn.q_proj.lora_a".into(),
            dtype: TensorDtype::F32,
            shape: vec![4, 2],
            data: (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect(),
        },
        TensorBytes {
            name: "model.layers.0.self_attn.q_proj.lora_b".into(),
            dtype: TensorDtype::F32,
            shape: vec![2, 3],
            data: (0..6u32).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect(),
        },
    ])
    .unwrap()
}

fn signed_manifest() -> (Vec<u8>, Manifest) {
    let key = Keypair::ed25519_from_bytes([7u8; 32]).unwrap();
    let manifest = Manifest::describe(Digest::of(b"run"), 3, &key.public().to_peer_id(), &valid_adapter());
    (SignedManifest::sign(&manifest, &key).unwrap().to_bytes().unwrap(), manifest)
}

/// `bytes` with `flips` (position, xor) applied.
fn mutate(mut bytes: Vec<u8>, flips: &[(usize, u8)]) -> Vec<u8> {
    for (position, xor) in flips {
        if !bytes.is_empty() {
            let i = position % bytes.len();
            bytes[i] ^= xor.max(&1);
        }
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn manifests_from_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        if let Ok(signed) = SignedManifest::from_bytes(&bytes) {
            let _ = signed.verify(&Limits::default());
        }
    }

    #[test]
    fn a_tampered_manifest_never_verifies(flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let (bytes, original) = signed_manifest();
        let tampered = mutate(bytes.clone(), &flips);
        if let Ok(signed) = SignedManifest::from_bytes(&tampered)
            && let Ok((manifest, _)) = signed.verify(&Limits::default())
        {
            // Only an encoding-level change that decodes to the same signed
            // content may pass.
            prop_assert_eq!(manifest, original);
        }
    }

    #[test]
    fn chunk_messages_from_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = ChunkMessage::from_bytes(&bytes);
    }

    #[test]
    fn adapters_from_arbitrary_and_mutated_bytes(
        bytes in prop::collection::vec(any::<u8>(), 0..4096),
        flips in prop::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let limits = Limits { max_adapter_bytes: 1 << 20, max_tensors: 64 };
        let _ = decode_adapter(&bytes, &limits);
        let _ = decode_adapter(&mutate(valid_adapter(), &flips), &limits);
    }

    #[test]
    fn reassembly_rejects_wrong_pieces(
        pieces in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..512), 0..4),
    ) {
        let adapter = valid_adapter();
        let ids: Vec<Digest> = split_chunks(&adapter).into_iter().map(|(id, _)| id).collect();
        let parts: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        let result = reassemble(&ids, &parts, &Digest::of(&adapter), &Limits::default());
        if let Ok(bytes) = result {
            prop_assert_eq!(bytes, adapter);
        }
    }

    #[test]
    fn protocol_frames_from_arbitrary_streams(bytes in prop::collection::vec(any::<u8>(), 0..1024), length_prefix in any::<u32>()) {
        let mut framed = length_prefix.to_be_bytes().to_vec();
        framed.extend(&bytes);
        futures::executor::block_on(async {
            let mut codec = ChunkCodec;
            let _ = codec.read_request(&PROTOCOL, &mut futures::io::Cursor::new(framed.clone())).await;
            let _ = codec.read_response(&PROTOCOL, &mut futures::io::Cursor::new(framed)).await;
        });
    }

    #[test]
    fn gguf_header_reader_on_arbitrary_files(
        body in prop::collection::vec(any::<u8>(), 0..2048),
        version in 0u32..5,
        counts in (0u64..8, 0u64..8),
    ) {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(version.to_le_bytes());
        bytes.extend(counts.0.to_le_bytes());
        bytes.extend(counts.1.to_le_bytes());
        bytes.extend(&body);
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &bytes).unwrap();
        let _ = blossom_p2p::model::gguf_header::read_header(file.path());
    }
}
