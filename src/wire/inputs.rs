//! A round's input list: the sorted (author, update hash) pairs an average
//! was computed over. Slice claims and round certificates name it by its
//! blake3 (`inputs_digest`); the list itself travels as bytes
//! (`encode_inputs`), so whoever holds those bytes can check them against
//! the digest and read who contributed.

use libp2p_identity::PeerId;

use super::codec::Digest;

/// The most inputs an input list may name (`decode_inputs`): more than
/// any run this code is meant for, and a bound on what a peer can make a
/// node decode.
pub const MAX_INPUTS: usize = 65_536;

/// The sorted (author, update hash) pairs, encoded: what a slice claim
/// says it averaged. A claim carries only its blake3 (`inputs_digest`);
/// the list itself is served as a chunk under that hash, so a node whose
/// own view of the round differs can fetch the owners' list, check it
/// against the manifests it holds, and adopt it.
pub fn encode_inputs(inputs: &[(PeerId, Digest)]) -> Vec<u8> {
    let mut sorted: Vec<(Vec<u8>, Digest)> = inputs.iter().map(|(p, h)| (p.to_bytes(), *h)).collect();
    sorted.sort();
    let mut bytes = Vec::new();
    for (author, hash) in sorted {
        push_peer(&mut bytes, &author);
        bytes.extend_from_slice(&hash.0);
    }
    bytes
}

/// Appends a peer id's bytes, prefixed by their length (u32 LE): how peer
/// lists are written to be hashed.
pub fn push_peer(bytes: &mut Vec<u8>, peer: &[u8]) {
    bytes.extend_from_slice(&(peer.len() as u32).to_le_bytes());
    bytes.extend_from_slice(peer);
}

/// blake3 of `encode_inputs`.
pub fn inputs_digest(inputs: &[(PeerId, Digest)]) -> Digest {
    Digest::of(&encode_inputs(inputs))
}

/// An input list from a peer (checked against its hash by the fetch):
/// every entry whole, every author a valid peer id, sorted without
/// repeats, at most `MAX_INPUTS` entries.
pub fn decode_inputs(mut bytes: &[u8]) -> Result<Vec<(PeerId, Digest)>, String> {
    let mut out: Vec<(PeerId, Digest)> = Vec::new();
    let mut previous: Option<Vec<u8>> = None;
    while !bytes.is_empty() {
        if out.len() >= MAX_INPUTS {
            return Err(format!("an input list of more than {MAX_INPUTS} entries"));
        }
        let (len, rest) = bytes.split_first_chunk::<4>().ok_or("an input list entry cut short")?;
        let len = u32::from_le_bytes(*len) as usize;
        let author = rest.get(..len).ok_or("an input list entry cut short")?;
        let hash = rest.get(len..len.saturating_add(32)).ok_or("an input list entry cut short")?;
        let peer = PeerId::from_bytes(author).map_err(|e| format!("an input list names an invalid peer id: {e}"))?;
        if previous.as_deref().is_some_and(|p| p >= author) {
            return Err("an input list that is not sorted or repeats an author".into());
        }
        previous = Some(author.to_vec());
        let mut digest = [0u8; 32];
        digest.copy_from_slice(hash);
        out.push((peer, Digest(digest)));
        bytes = &rest[len + 32..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_lists_round_trip_and_bad_ones_are_refused() {
        let inputs: Vec<(PeerId, Digest)> = (0..5u8).map(|i| (PeerId::random(), Digest::of(&[i]))).collect();
        let bytes = encode_inputs(&inputs);
        let mut decoded = decode_inputs(&bytes).unwrap();
        let mut sorted = inputs.clone();
        sorted.sort_by_key(|(p, _)| p.to_bytes());
        decoded.sort_by_key(|(p, _)| p.to_bytes());
        assert_eq!(decoded, sorted);
        assert_eq!(Digest::of(&bytes), inputs_digest(&inputs));
        assert!(decode_inputs(&bytes[..bytes.len() - 1]).unwrap_err().contains("cut short"));
        let mut doubled = encode_inputs(&inputs[..1]);
        doubled.extend(encode_inputs(&inputs[..1]));
        assert!(decode_inputs(&doubled).unwrap_err().contains("repeats"));
        let mut garbage = 3u32.to_le_bytes().to_vec();
        garbage.extend([0xff; 35]);
        assert!(decode_inputs(&garbage).unwrap_err().contains("invalid peer id"));
        assert!(decode_inputs(&u32::MAX.to_le_bytes()).unwrap_err().contains("cut short"));
    }
}
