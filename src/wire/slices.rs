//! Slices of the canonical adapter encoding (docs/PROTOCOL.md, "The reduce
//! exchange"): in `reduce` mode an update is chunked into a round's slices
//! instead of fixed 256 KiB chunks, so that chunk s of every update, and
//! chunk s of the average, cover the same bytes: the same tensors' values
//! at the same offsets. Every honest adapter of a run has the same names
//! and shapes, so the same header and the same offsets.

use std::ops::Range;

use crate::aggregate::{Tensor, Tensors};

use super::codec::{CHUNK_SIZE, Limits, decode_adapter};
use super::compression::Compression;
use super::tensors::encode_as;

/// Where one tensor's values lie in the canonical encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlace {
    pub name: String,
    pub shape: Vec<usize>,
    /// Byte range of its values in the encoding.
    pub bytes: Range<usize>,
}

/// The canonical encoding of a run's adapters, cut into `count` slices.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceLayout {
    /// The header every honest adapter of the run starts with.
    pub header: Vec<u8>,
    pub total_len: usize,
    pub chunk_size: usize,
    /// Tensors in encoding order (the data follows the header in this order).
    pub tensors: Vec<TensorPlace>,
    /// How the values are written (int8 tensors are whole 8-byte blocks,
    /// so every slice and part on the 8-byte grid holds whole blocks).
    pub compression: Compression,
}

impl SliceLayout {
    /// The layout of `layout`'s encoding (values as `compression` writes
    /// them) cut into at least `slices` slices (more if a slice would
    /// exceed the chunk protocol's 256 KiB), each a multiple of the
    /// compression's alignment (8 bytes, or an int8 block), so no value or
    /// block is ever split between slices.
    pub fn new(layout: &Tensors, slices: usize, compression: Compression) -> Result<Self, String> {
        let len = encode_as(layout, compression)?.len();
        let count = slices.max(1).max(len.div_ceil(CHUNK_SIZE));
        Self::with_chunk_size(layout, len.div_ceil(count).next_multiple_of(compression.alignment()).min(CHUNK_SIZE), compression)
    }

    /// The layout of `layout`'s encoding cut into slices of `chunk_size`
    /// bytes (a multiple of the alignment, at most 256 KiB: what peers'
    /// manifests say).
    pub fn with_chunk_size(layout: &Tensors, chunk_size: usize, compression: Compression) -> Result<Self, String> {
        let align = compression.alignment();
        if chunk_size % align != 0 || !(align..=CHUNK_SIZE).contains(&chunk_size) {
            return Err(format!("slices of {chunk_size} bytes: a slice is a multiple of {align} bytes, at most {CHUNK_SIZE}"));
        }
        let bytes = encode_as(layout, compression)?;
        let limits = Limits {
            max_adapter_bytes: bytes.len(),
            ..Limits::default()
        };
        let mut decoded = decode_adapter(&bytes, &limits).map_err(|e| e.to_string())?;
        let header_len = bytes.len() - decoded.iter().map(|t| t.data.len()).sum::<usize>();
        if header_len % align != 0 {
            return Err(format!("the encoding's header is {header_len} bytes, not a multiple of {align}"));
        }
        // The canonical encoding puts the data in name order after the
        // header (`wire::codec::encode_adapter`); checked here.
        decoded.sort_by(|a, b| a.name.cmp(&b.name));
        let mut tensors = Vec::with_capacity(decoded.len());
        let mut offset = header_len;
        for t in decoded {
            let end = offset + t.data.len();
            if bytes.get(offset..end) != Some(t.data.as_slice()) {
                return Err(format!("tensor {} is not where the canonical encoding puts it", t.name));
            }
            let shape = layout.get(&t.name).map_or(t.shape, |tensor| tensor.shape.clone());
            tensors.push(TensorPlace {
                name: t.name,
                shape,
                bytes: offset..end,
            });
            offset = end;
        }
        Ok(Self {
            header: bytes[..header_len].to_vec(),
            total_len: bytes.len(),
            chunk_size,
            tensors,
            compression,
        })
    }

    /// How many slices (chunks) the encoding has.
    pub fn count(&self) -> usize {
        self.total_len.div_ceil(self.chunk_size)
    }

    /// The bytes of slice `s` in the encoding.
    pub fn range(&self, s: usize) -> Range<usize> {
        let start = (s * self.chunk_size).min(self.total_len);
        start..(start + self.chunk_size).min(self.total_len)
    }

    /// The part of slice `s` that holds float values (slice 0 starts with
    /// the header).
    pub fn value_range(&self, s: usize) -> Range<usize> {
        let range = self.range(s);
        range.start.max(self.header.len())..range.end.max(self.header.len())
    }

    /// The values at `bytes` of an encoding of which `buffer` holds the
    /// bytes from offset `start` on (int8 padding included, as zeros);
    /// `None` if it does not cover them.
    pub fn values(&self, buffer: &[u8], start: usize, bytes: &Range<usize>) -> Option<Vec<f32>> {
        let part = buffer.get(bytes.start.checked_sub(start)?..bytes.end.checked_sub(start)?)?;
        self.compression.decode(part)
    }

    /// The bytes of `values` as this layout writes them (a slice's or a
    /// part's values, which start on the 8-byte grid).
    pub fn encode_values(&self, values: &[f32]) -> Vec<u8> {
        self.compression.encode(values)
    }

    /// The tensors that hold any value in `bytes`.
    pub fn tensors_in(&self, bytes: &Range<usize>) -> impl Iterator<Item = &TensorPlace> {
        let bytes = bytes.clone();
        self.tensors.iter().filter(move |t| t.bytes.start < bytes.end && bytes.start < t.bytes.end)
    }

    /// The bytes of every value of the tensors that hold any value in
    /// `bytes` (whole tensors: one contiguous range, as they lie in order).
    pub fn whole_tensors(&self, bytes: &Range<usize>) -> Range<usize> {
        let mut touched = self.tensors_in(bytes);
        match touched.next() {
            None => bytes.clone(),
            Some(first) => first.bytes.start..touched.last().unwrap_or(first).bytes.end,
        }
    }

    /// The tensors in `places`, taken from `values`, the decoded values of
    /// the encoding from offset `start` on (what [`values`](Self::values)
    /// gives there); `None` if they do not cover them.
    pub fn read_values(&self, values: &[f32], start: usize, places: &[&TensorPlace]) -> Option<Tensors> {
        places
            .iter()
            .map(|place| {
                let first = self.compression.values_in(place.bytes.start.checked_sub(start)?);
                let count = place.shape.iter().product::<usize>();
                let values = values.get(first..first.checked_add(count)?)?.to_vec();
                Some((place.name.clone(), Tensor { shape: place.shape.clone(), values }))
            })
            .collect()
    }

    /// The tensors in `places`, read from `buffer` (the encoding's bytes from
    /// offset `start` on); `None` if it does not cover them.
    pub fn read(&self, buffer: &[u8], start: usize, places: &[&TensorPlace]) -> Option<Tensors> {
        places
            .iter()
            .map(|place| {
                let mut values = self.values(buffer, start, &place.bytes)?;
                values.truncate(place.shape.iter().product());
                Some((place.name.clone(), Tensor { shape: place.shape.clone(), values }))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::tensors::encode;

    fn adapter() -> Tensors {
        let mut t = Tensors::new();
        for (name, n) in [("b.lora_a", 10), ("a.lora_b", 7), ("a.lora_a", 33), ("b.lora_b", 5)] {
            t.insert(name.into(), Tensor::new(vec![n], (0..n).map(|i| i as f32 * 0.5).collect()).unwrap());
        }
        t
    }

    #[test]
    fn slices_cover_the_encoding_on_float_boundaries() {
        let tensors = adapter();
        let bytes = encode(&tensors).unwrap();
        for wanted in [1, 2, 3, 7, 40] {
            let layout = SliceLayout::new(&tensors, wanted, Compression::None).unwrap();
            assert_eq!(layout.total_len, bytes.len());
            assert!(layout.count() >= 1 && layout.count() <= wanted.max(1));
            assert_eq!(layout.chunk_size % 8, 0);
            let joined: Vec<u8> = (0..layout.count()).flat_map(|s| bytes[layout.range(s)].to_vec()).collect();
            assert_eq!(joined, bytes);
            assert_eq!(&bytes[..layout.header.len()], layout.header.as_slice());
            for place in &layout.tensors {
                let read = layout.values(&bytes, 0, &place.bytes).unwrap();
                assert_eq!(layout.tensors_in(&place.bytes).count(), 1);
                assert_eq!(read, tensors[&place.name].values, "{}", place.name);
            }
        }
    }

    /// Compressed encodings keep the grid: every slice holds whole values
    /// (whole int8 blocks), and reading a tensor's place gives what
    /// decoding the whole update gives.
    #[test]
    fn compressed_slices_hold_whole_values() {
        let tensors = adapter();
        for compression in [Compression::Fp16, Compression::Int8] {
            let bytes = encode_as(&tensors, compression).unwrap();
            let whole = crate::wire::tensors::decode_checked_as(&bytes, &tensors, compression, &Limits::default()).unwrap();
            for wanted in [1, 3, 7] {
                let layout = SliceLayout::new(&tensors, wanted, compression).unwrap();
                assert_eq!(layout.total_len, bytes.len());
                for s in 0..layout.count() {
                    let values = layout.value_range(s);
                    assert_eq!(values.start % compression.alignment(), 0);
                    assert!(layout.values(&bytes, 0, &values).is_some(), "{compression:?} slice {s} {values:?}");
                }
                let places: Vec<&TensorPlace> = layout.tensors.iter().collect();
                assert_eq!(layout.read(&bytes, 0, &places).unwrap(), whole, "{compression:?}");
            }
        }
    }
}
