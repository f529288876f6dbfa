//! The reduce exchange's pure parts (docs/PROTOCOL.md, "The reduce
//! exchange"): who owns which slice of a round's average, what an owner
//! needs of every update, and how it computes its slice, so that the
//! slices put together are byte for byte the average that averaging the
//! whole updates gives.

use std::ops::Range;

use libp2p::PeerId;

use crate::aggregate::{Contribution, Method, Tensor, Tensors, aggregate};
use crate::wire::codec::Digest;
use crate::wire::slices::SliceLayout;

/// The round's owners of every slice: the inputs' authors in an order
/// hashed from (run, round), slice s owned by the `replicas` authors from
/// position s on. Each author owns the same number of slices (±1): the
/// largest owner's load is the mean load, where independent rendezvous
/// hashing per slice would give some authors several times the mean.
pub fn owners(run_id: &Digest, round: u64, authors: &[PeerId], slices: usize, replicas: usize) -> Vec<Vec<PeerId>> {
    let mut ring: Vec<(Digest, PeerId)> = authors
        .iter()
        .map(|peer| {
            let mut key = run_id.0.to_vec();
            key.extend_from_slice(&round.to_le_bytes());
            key.extend_from_slice(&peer.to_bytes());
            (Digest::of(&key), *peer)
        })
        .collect();
    ring.sort();
    let n = ring.len();
    (0..slices).map(|s| (0..replicas.min(n)).map(|k| ring[(s + k) % n].1).collect()).collect()
}

/// The slice count for `authors` inputs: a multiple of their number, so
/// that every author owns as many slices, and enough for slices of at most
/// 256 KiB (`SliceLayout::new` adds those).
pub fn slice_count(authors: usize) -> usize {
    authors.max(1)
}

/// The bytes of every update that the owner of slice `s` needs: the
/// slice's own values for the per-coordinate methods; whole tensors for
/// exact averaging (whole modules: a module's tensors lie side by side in
/// name order, and A·B needs both); everything for norm clipping (each
/// update's norm is over all of it).
pub fn needed(layout: &SliceLayout, s: usize, method: Method) -> Range<usize> {
    let values = layout.value_range(s);
    match method {
        Method::FedAvg | Method::Median | Method::TrimmedMean { .. } => values,
        Method::Exact => {
            // Widen to whole modules (names up to the last '.').
            let tensors = layout.whole_tensors(&values);
            let module = |name: &str| name.rsplit_once('.').map_or(name.to_owned(), |(m, _)| m.to_owned());
            let touched: Vec<String> = layout.tensors_in(&tensors).map(|t| module(&t.name)).collect();
            let mut all = layout.tensors.iter().filter(|t| touched.contains(&module(&t.name)));
            match all.next() {
                None => values,
                Some(first) => first.bytes.start..all.next_back().unwrap_or(first).bytes.end,
            }
        }
        Method::NormClip => layout.header.len()..layout.total_len,
    }
}

/// Whether `method` averages coordinate by coordinate, so that any part of
/// a slice can be computed from the same part of every input.
pub fn per_coordinate(method: Method) -> bool {
    matches!(method, Method::FedAvg | Method::Median | Method::TrimmedMean { .. })
}

/// Parts an audit cuts a slice into, for the per-coordinate methods: it
/// checks one part, fetching only that part of every input, so that an
/// audit costs an eighth of an adapter instead of a whole one.
pub const AUDIT_PARTS: usize = 8;
/// The smallest part worth checking alone: each input's part is a request
/// of its own, and its proof comes in whole 1 KiB blocks.
const MIN_AUDIT_PART: usize = 4096;

/// The part of slice `s` an audit picked by `pick` checks (a byte range of
/// the encoding inside the slice's values), or `None` where the whole
/// slice is checked: other methods than the per-coordinate ones, and
/// slices smaller than two parts of `MIN_AUDIT_PART`. Parts start on 1 KiB
/// from the slice's values and hold whole floats.
pub fn audit_part(layout: &SliceLayout, s: usize, method: Method, pick: u64) -> Option<Range<usize>> {
    let values = layout.value_range(s);
    let wanted = AUDIT_PARTS.min(values.len() / MIN_AUDIT_PART);
    if !per_coordinate(method) || wanted < 2 {
        return None;
    }
    let part_len = values.len().div_ceil(wanted).next_multiple_of(1024);
    let parts = values.len().div_ceil(part_len);
    let start = values.start + (pick % parts as u64) as usize * part_len;
    Some(start..(start + part_len).min(values.end))
}

/// One update's part of a slice computation.
pub struct SliceInput {
    pub author: Vec<u8>,
    pub examples: u64,
    /// The update's bytes `needed(layout, s, method)` (for an audited part,
    /// the part's).
    pub bytes: Vec<u8>,
}

/// An input and its values over the bytes being averaged.
type Valued<'a> = (&'a SliceInput, Vec<f32>);

/// Each input's values over `bytes` (its `bytes` start there), a non-finite
/// one taken as `base`'s (the previous average's: that input moved nothing
/// there), and the inputs that happened to.
fn finite_values<'a>(layout: &SliceLayout, inputs: &'a [SliceInput], base: &[f32], bytes: &Range<usize>) -> Result<(Vec<Valued<'a>>, Vec<usize>), String> {
    let mut bad = Vec::new();
    let mut contributions = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.iter().enumerate() {
        let mut values = layout
            .values(&input.bytes, bytes.start, bytes)
            .ok_or_else(|| format!("input {i} has {} bytes of the {} needed", input.bytes.len(), bytes.len()))?;
        let mut finite = true;
        for (v, p) in values.iter_mut().zip(base) {
            if !v.is_finite() {
                *v = *p;
                finite = false;
            }
        }
        if !finite {
            bad.push(i);
        }
        contributions.push((input, values));
    }
    Ok((contributions, bad))
}

/// A per-coordinate method's average of flat values, as `layout` writes
/// them: a slice's values as one flat tensor give the same numbers,
/// coordinate for coordinate, as the whole tensors.
fn average_coordinates(layout: &SliceLayout, method: Method, contributions: Vec<Valued<'_>>) -> Result<Vec<u8>, String> {
    let as_flat = |values: Vec<f32>| Tensors::from([("slice".to_owned(), Tensor { shape: vec![values.len()], values })]);
    let contributions = contributions
        .into_iter()
        .map(|(input, values)| Contribution {
            author: input.author.clone(),
            examples: input.examples,
            tensors: as_flat(values),
        })
        .collect();
    let result = aggregate(method, contributions, None).map_err(|e| e.to_string())?;
    Ok(result.get("slice").map(|t| layout.encode_values(&t.values)).unwrap_or_default())
}

/// Part `part` of the average (`audit_part`) for a per-coordinate method:
/// `previous` holds the previous average's bytes over the part, each input
/// its own. The same bytes as that part of `compute_slice`'s result.
pub fn compute_part(layout: &SliceLayout, method: Method, part: &Range<usize>, previous: &[u8], inputs: &[SliceInput]) -> Result<Vec<u8>, String> {
    if !per_coordinate(method) {
        return Err(format!("{method:?} does not average coordinate by coordinate"));
    }
    let base = layout.values(previous, part.start, part).ok_or("the previous average does not cover the part")?;
    let (contributions, _) = finite_values(layout, inputs, &base, part)?;
    average_coordinates(layout, method, contributions)
}

/// Slice `s` of the average: the bytes at `layout.range(s)` of the
/// canonical encoding of `aggregate(method, inputs, previous)`. `previous`
/// is the encoding of the average the inputs trained from; a non-finite
/// value of an input is taken as the previous average's (that input moved
/// nothing there), and the inputs it happened to are returned, so that
/// every node computing the slice gets the same bytes.
pub fn compute_slice(layout: &SliceLayout, s: usize, method: Method, previous: &[u8], inputs: &[SliceInput]) -> Result<(Vec<u8>, Vec<usize>), String> {
    let range = layout.range(s);
    let needed = needed(layout, s, method);
    let base = layout.values(previous, 0, &needed).ok_or("the previous average does not have the run's layout")?;
    let (contributions, bad) = finite_values(layout, inputs, &base, &needed).map_err(|e| format!("slice {s}: {e}"))?;
    let mut out = Vec::with_capacity(range.len());
    out.extend_from_slice(layout.header.get(range.start.min(layout.header.len())..range.end.min(layout.header.len())).unwrap_or(&[]));
    let values = layout.value_range(s);
    if values.is_empty() {
        return Ok((out, bad));
    }
    let averaged: Vec<u8> = match method {
        Method::FedAvg | Method::Median | Method::TrimmedMean { .. } => average_coordinates(layout, method, contributions)?,
        Method::Exact | Method::NormClip => {
            let places: Vec<_> = layout.tensors_in(&needed).collect();
            let as_tensors = |values: &[f32]| -> Result<Tensors, String> {
                layout.read_values(values, needed.start, &places).ok_or_else(|| "the slice's tensors are not whole".to_owned())
            };
            let previous = as_tensors(&base)?;
            let contributions = contributions
                .into_iter()
                .map(|(input, values)| {
                    Ok(Contribution {
                        author: input.author.clone(),
                        examples: input.examples,
                        tensors: as_tensors(&values)?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            let result = aggregate(method, contributions, Some(&previous)).map_err(|e| e.to_string())?;
            // The result's bytes over `needed`, in encoding order, then the
            // part that is this slice.
            let mut bytes = Vec::with_capacity(needed.len());
            for place in &places {
                let tensor = result.get(&place.name).ok_or_else(|| format!("the average has no {}", place.name))?;
                bytes.extend(layout.encode_values(&tensor.values));
            }
            bytes.get(values.start - needed.start..values.end - needed.start).ok_or("the slice is outside its tensors")?.to_vec()
        }
    };
    out.extend_from_slice(&averaged);
    Ok((out, bad))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::rng::SeededRng;
    use crate::wire::compression::Compression;
    use crate::wire::tensors::encode;

    fn adapter(rng: &mut SeededRng, scale: f32) -> Tensors {
        let mut t = Tensors::new();
        for (module, rows, cols) in [("layers.0.q", 12, 5), ("layers.0.v", 7, 9), ("layers.1.q", 3, 4)] {
            let rank = 2;
            let mut values = |n: usize| (0..n).map(|_| (rng.next_f64() as f32 - 0.5) * scale).collect::<Vec<f32>>();
            t.insert(format!("{module}.lora_a"), Tensor::new(vec![rows, rank], values(rows * rank)).unwrap());
            t.insert(format!("{module}.lora_b"), Tensor::new(vec![rank, cols], values(rank * cols)).unwrap());
            t.insert(format!("{module}.m"), Tensor::new(vec![cols], values(cols)).unwrap());
        }
        t
    }

    /// Every method, several slice counts: the slices put together are the
    /// encoding of the whole average, byte for byte.
    #[test]
    fn slices_put_together_are_the_whole_average() {
        let mut rng = SeededRng::new(7);
        let previous = adapter(&mut rng, 1.0);
        let updates: Vec<Tensors> = (0..5).map(|i| adapter(&mut rng, 1.0 + i as f32)).collect();
        let authors: Vec<Vec<u8>> = (0..5u8).map(|i| vec![9 - i]).collect();
        let methods = [Method::FedAvg, Method::Exact, Method::Median, Method::TrimmedMean { fraction: 0.2 }, Method::NormClip];
        let previous_bytes = encode(&previous).unwrap();
        let encoded: Vec<Vec<u8>> = updates.iter().map(|u| encode(u).unwrap()).collect();
        for method in methods {
            let contributions = updates
                .iter()
                .zip(&authors)
                .enumerate()
                .map(|(i, (u, a))| Contribution {
                    author: a.clone(),
                    examples: 10 + i as u64,
                    tensors: u.clone(),
                })
                .collect();
            let whole = encode(&aggregate(method, contributions, Some(&previous)).unwrap()).unwrap();
            for slices in [1, 2, 3, 5, 16, 64] {
                let layout = SliceLayout::new(&previous, slices, Compression::None).unwrap();
                let mut joined = Vec::new();
                for s in 0..layout.count() {
                    let needed = needed(&layout, s, method);
                    let inputs: Vec<SliceInput> = encoded
                        .iter()
                        .zip(&authors)
                        .enumerate()
                        .map(|(i, (bytes, a))| SliceInput {
                            author: a.clone(),
                            examples: 10 + i as u64,
                            bytes: bytes[needed.clone()].to_vec(),
                        })
                        .collect();
                    let (chunk, bad) = compute_slice(&layout, s, method, &previous_bytes, &inputs).unwrap();
                    assert!(bad.is_empty());
                    assert_eq!(chunk.len(), layout.range(s).len());
                    joined.extend(chunk);
                }
                assert_eq!(Digest::of(&joined), Digest::of(&whole), "{method:?} with {slices} slices");
            }
        }
    }

    /// Compressed updates: the slices put together are the compressed
    /// encoding of averaging the decoded updates whole, byte for byte, so
    /// the gossip and reduce exchanges and every owner agree.
    #[test]
    fn compressed_slices_put_together_are_the_whole_compressed_average() {
        let mut rng = SeededRng::new(13);
        let layout_tensors = adapter(&mut rng, 1.0);
        let zeros = crate::aggregate::zeros_like(&layout_tensors);
        for compression in [Compression::Fp16, Compression::Int8] {
            let encoded: Vec<Vec<u8>> = (0..4).map(|i| crate::wire::tensors::encode_as(&adapter(&mut rng, 0.01 * (1 + i) as f32), compression).unwrap()).collect();
            let limits = crate::wire::codec::Limits::default();
            let decoded: Vec<Tensors> = encoded.iter().map(|b| crate::wire::tensors::decode_checked_as(b, &layout_tensors, compression, &limits).unwrap()).collect();
            let previous = crate::wire::tensors::encode_as(&zeros, compression).unwrap();
            for method in [Method::FedAvg, Method::Median, Method::TrimmedMean { fraction: 0.25 }, Method::NormClip] {
                let contributions = decoded.iter().enumerate().map(|(i, t)| Contribution { author: vec![i as u8], examples: 5, tensors: t.clone() }).collect();
                let whole = crate::wire::tensors::encode_as(&aggregate(method, contributions, Some(&zeros)).unwrap(), compression).unwrap();
                for slices in [1, 3, 7] {
                    let layout = SliceLayout::new(&layout_tensors, slices, compression).unwrap();
                    let mut joined = Vec::new();
                    for s in 0..layout.count() {
                        let needed = needed(&layout, s, method);
                        let inputs: Vec<SliceInput> = encoded.iter().enumerate().map(|(i, b)| SliceInput { author: vec![i as u8], examples: 5, bytes: b[needed.clone()].to_vec() }).collect();
                        joined.extend(compute_slice(&layout, s, method, &previous, &inputs).unwrap().0);
                    }
                    assert_eq!(joined, whole, "{compression:?} {method:?} with {slices} slices");
                }
            }
        }
    }

    /// An audited part of a slice, computed from the same part of every
    /// input, is that part of the whole slice's result, byte for byte; the
    /// parts cover the slice's values.
    #[test]
    fn an_audited_part_is_that_part_of_the_slice() {
        let mut rng = SeededRng::new(11);
        let big = |rng: &mut SeededRng, scale: f32| -> Tensors {
            let mut t = Tensors::new();
            for (name, n) in [("layers.0.q.lora_a", 6000), ("layers.0.q.lora_b", 2500), ("layers.1.v.lora_a", 4100)] {
                t.insert(name.to_owned(), Tensor::new(vec![n], (0..n).map(|_| (rng.next_f64() as f32 - 0.5) * scale).collect()).unwrap());
            }
            t
        };
        let previous = encode(&big(&mut rng, 1.0)).unwrap();
        let mut encoded: Vec<Vec<u8>> = (0..5).map(|i| encode(&big(&mut rng, 1.0 + i as f32)).unwrap()).collect();
        // A non-finite value is the previous average's in a part as in a slice.
        let at = encoded[2].len() - 400;
        encoded[2][at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let layout = SliceLayout::new(&big(&mut rng, 1.0), 2, Compression::None).unwrap();
        let inputs_over = |range: &Range<usize>| -> Vec<SliceInput> {
            encoded
                .iter()
                .enumerate()
                .map(|(i, bytes)| SliceInput {
                    author: vec![i as u8],
                    examples: 10 + i as u64,
                    bytes: bytes[range.clone()].to_vec(),
                })
                .collect()
        };
        for method in [Method::FedAvg, Method::Median, Method::TrimmedMean { fraction: 0.2 }] {
            for s in 0..layout.count() {
                let range = layout.range(s);
                let (whole, _) = compute_slice(&layout, s, method, &previous, &inputs_over(&needed(&layout, s, method))).unwrap();
                let mut covered = BTreeSet::new();
                for pick in 0..AUDIT_PARTS as u64 * 2 {
                    let part = audit_part(&layout, s, method, pick).expect("a slice of 25 KB is cut into parts");
                    assert!(part.start >= layout.value_range(s).start && part.end <= range.end && part.len() % 4 == 0);
                    assert!(part.len() >= 2048, "a part of {} bytes is not worth its requests", part.len());
                    let got = compute_part(&layout, method, &part, &previous[part.clone()], &inputs_over(&part)).unwrap();
                    assert_eq!(got, &whole[part.start - range.start..part.end - range.start], "{method:?}, slice {s}, {part:?}");
                    covered.insert((part.start, part.end));
                }
                let joined: usize = covered.iter().map(|(a, b)| b - a).sum();
                assert_eq!(joined, layout.value_range(s).len(), "the parts cover slice {s}'s values");
                assert!(covered.len() > 1 && covered.len() <= AUDIT_PARTS);
            }
        }
        // Whole modules or whole updates: the whole slice is audited.
        assert_eq!(audit_part(&layout, 0, Method::Exact, 3), None);
        assert_eq!(audit_part(&layout, 0, Method::NormClip, 3), None);
        // Too small to cut.
        let small = SliceLayout::new(&big(&mut rng, 1.0), 16, Compression::None).unwrap();
        assert_eq!(audit_part(&small, 1, Method::FedAvg, 3), None);
    }

    #[test]
    fn every_author_owns_as_many_slices() {
        let run = Digest::of(b"run");
        let authors: Vec<PeerId> = (0..7).map(|_| PeerId::random()).collect();
        let owners = owners(&run, 3, &authors, 14, 2);
        for author in &authors {
            let owned = owners.iter().filter(|o| o.contains(author)).count();
            assert_eq!(owned, 4, "14 slices × 2 owners over 7 authors");
        }
        assert!(owners.iter().all(|o| o.len() == 2 && o[0] != o[1]));
        // Another round, another order.
        assert_ne!(owners, super::owners(&run, 4, &authors, 14, 2));
    }
}
