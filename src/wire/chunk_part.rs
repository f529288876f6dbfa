//! Part of a chunk, proven under the chunk's id (its BLAKE3 hash) without
//! the rest of the chunk: a bao slice, i.e. the chunk's 1 KiB blocks that
//! cover the part and the parent hashes on their paths to the root. An
//! audit of part of a slice (docs/PROTOCOL.md, "The reduce exchange") fetches
//! only that part of every input.

use std::io::{Cursor, Read};

use super::codec::Digest;

/// The bao slice that proves bytes `start..start + len` of `chunk`; `None`
/// for an empty range or one past the chunk's end.
pub fn prove(chunk: &[u8], start: u32, len: u32) -> Option<Vec<u8>> {
    let end = start.checked_add(len)?;
    if len == 0 || end as usize > chunk.len() {
        return None;
    }
    let (outboard, _) = bao::encode::outboard(chunk);
    let mut slice = Vec::new();
    bao::encode::SliceExtractor::new_outboard(Cursor::new(chunk), Cursor::new(&outboard), start.into(), len.into())
        .read_to_end(&mut slice)
        .ok()?;
    Some(slice)
}

/// Bytes `start..start + len` of the chunk whose id is `id`, if `slice`
/// proves them (any other bytes, or a slice of another chunk, do not).
pub fn verify(id: &Digest, start: u32, len: u32, slice: &[u8]) -> Option<Vec<u8>> {
    let hash = bao::Hash::from(id.0);
    let mut bytes = Vec::with_capacity(len as usize);
    bao::decode::SliceDecoder::new(slice, &hash, start.into(), len.into()).read_to_end(&mut bytes).ok()?;
    (len > 0 && bytes.len() == len as usize).then_some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn a_part_is_proven_under_the_chunk_id_and_costs_less_than_the_chunk() {
        let bytes = chunk(54_000);
        let id = Digest::of(&bytes);
        for (start, len) in [(0, 4), (1000, 6_752), (8_192, 8_192), (53_996, 4), (0, 54_000)] {
            let slice = prove(&bytes, start, len).unwrap();
            let part = verify(&id, start, len, &slice).unwrap();
            assert_eq!(part, &bytes[start as usize..(start + len) as usize], "{start}+{len}");
            if len < 10_000 {
                assert!(slice.len() < len as usize + 3 * 1024, "{start}+{len}: {} bytes", slice.len());
            }
        }
    }

    #[test]
    fn other_bytes_or_another_chunk_are_refused() {
        let bytes = chunk(20_000);
        let id = Digest::of(&bytes);
        let slice = prove(&bytes, 4_096, 2_048).unwrap();
        // Any flipped byte: refused, or (the length header, which the part's
        // path does not depend on while the tree keeps its shape) still the
        // chunk's own bytes. Never other bytes.
        let genuine = bytes[4_096..6_144].to_vec();
        for i in 0..slice.len() {
            let mut tampered = slice.clone();
            tampered[i] ^= 1;
            match verify(&id, 4_096, 2_048, &tampered) {
                None => {}
                Some(part) => assert!(i < 8 && part == genuine, "byte {i} flipped gave other bytes"),
            }
        }
        assert_eq!(verify(&Digest::of(b"another chunk"), 4_096, 2_048, &slice), None);
        assert_eq!(verify(&id, 4_096, 2_048, &slice[..slice.len() - 1]), None, "cut short");
        assert_eq!(prove(&bytes, 19_999, 2), None, "past the end");
        assert_eq!(prove(&bytes, 0, 0), None, "empty");
        assert_eq!(prove(&bytes, u32::MAX, 2), None, "overflow");
    }
}
