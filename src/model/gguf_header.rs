//! A GGUF file's header, read with every length checked against the bytes
//! left in the file before it is used (a corrupt file must not crash the
//! process or make it allocate what the file claims): the version, the
//! key-value metadata, and the table of tensors (name, shape, type, where
//! its bytes are). MLX's own parser trusts lengths and counts, so this runs
//! first on every GGUF file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

use super::gguf_quants::GgmlType;

const MAGIC: &[u8; 4] = b"GGUF";
/// Deeper nesting than arrays of arrays is not GGUF.
const MAX_DEPTH: u32 = 2;
/// Where tensor data starts and each tensor is aligned, unless
/// `general.alignment` says otherwise.
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
}

/// One tensor of the table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// MLX's order (outermost first): GGUF lists the innermost first.
    pub shape: Vec<i32>,
    pub kind: Result<GgmlType, String>,
    /// From the start of the file.
    pub start: u64,
    pub bytes: u64,
}

#[derive(Debug)]
pub struct GgufHeader {
    pub metadata: HashMap<String, MetaValue>,
    pub tensors: Vec<TensorInfo>,
}

struct Cursor<R> {
    reader: R,
    left: u64,
}

impl<R: Read> Cursor<R> {
    fn bytes(&mut self, n: u64, what: &str) -> Result<Vec<u8>, String> {
        if n > self.left {
            return Err(format!("{what} needs {n} bytes but the file has {} left (truncated or corrupt)", self.left));
        }
        let mut buf = vec![0u8; n as usize];
        self.reader.read_exact(&mut buf).map_err(|e| format!("{what}: {e}"))?;
        self.left -= n;
        Ok(buf)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let bytes = self.bytes(N as u64, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let len = self.u64(what)?;
        String::from_utf8(self.bytes(len, what)?).map_err(|_| format!("{what}: a string that is not UTF-8"))
    }

    fn value(&mut self, kind: u32, what: &str, depth: u32) -> Result<MetaValue, String> {
        Ok(match kind {
            0 => MetaValue::Int(u8::from_le_bytes(self.array(what)?).into()),
            1 => MetaValue::Int(i8::from_le_bytes(self.array(what)?).into()),
            2 => MetaValue::Int(u16::from_le_bytes(self.array(what)?).into()),
            3 => MetaValue::Int(i16::from_le_bytes(self.array(what)?).into()),
            4 => MetaValue::Int(u32::from_le_bytes(self.array(what)?).into()),
            5 => MetaValue::Int(i32::from_le_bytes(self.array(what)?).into()),
            6 => MetaValue::Float(f32::from_le_bytes(self.array(what)?).into()),
            7 => MetaValue::Bool(self.array::<1>(what)?[0] != 0),
            8 => MetaValue::Str(self.string(what)?),
            9 if depth < MAX_DEPTH => {
                let element = self.u32(what)?;
                let count = self.u64(what)?;
                // Even one-byte elements cannot outnumber the bytes left.
                if count > self.left {
                    return Err(format!("{what}: an array of {count} elements in {} bytes", self.left));
                }
                let mut values = Vec::with_capacity(count.min(1 << 16) as usize);
                for _ in 0..count {
                    values.push(self.value(element, what, depth + 1)?);
                }
                MetaValue::Array(values)
            }
            10 => {
                let value = u64::from_le_bytes(self.array(what)?);
                i64::try_from(value).map(MetaValue::Int).unwrap_or(MetaValue::Float(value as f64))
            }
            11 => MetaValue::Int(i64::from_le_bytes(self.array(what)?)),
            12 => MetaValue::Float(f64::from_le_bytes(self.array(what)?)),
            other => return Err(format!("{what}: unknown value type {other}")),
        })
    }
}

/// Reads the header of the GGUF file at `path` (versions 2 and 3), checking
/// that every tensor's bytes lie inside the file.
pub fn read_header(path: &Path) -> Result<GgufHeader, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let len = file.metadata().map_err(|e| e.to_string())?.len();
    let mut cursor = Cursor {
        reader: BufReader::new(file),
        left: len,
    };
    if cursor.bytes(4, "the magic number")? != MAGIC {
        return Err("it does not start with the GGUF magic number".into());
    }
    let version = cursor.u32("the version")?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} (versions 2 and 3 are supported)"));
    }
    let tensor_count = cursor.u64("the tensor count")?;
    let pairs = cursor.u64("the metadata count")?;
    let mut metadata = HashMap::new();
    for i in 0..pairs {
        let what = format!("metadata entry {i}");
        let key = cursor.string(&what)?;
        let kind = cursor.u32(&what)?;
        let value = cursor.value(kind, &format!("metadata `{key}`"), 0)?;
        metadata.insert(key, value);
    }
    let mut tensors = Vec::new();
    for i in 0..tensor_count {
        let what = format!("tensor {i}");
        let name = cursor.string(&what)?;
        let what = format!("tensor `{name}`");
        let dims = cursor.u32(&what)?;
        if dims > 4 {
            return Err(format!("{what} has {dims} dimensions"));
        }
        let mut shape = Vec::new();
        let mut elements: u64 = 1;
        for _ in 0..dims {
            let dim = cursor.u64(&what)?;
            elements = elements.saturating_mul(dim);
            shape.insert(0, i32::try_from(dim).map_err(|_| format!("{what} has a dimension of {dim}"))?);
        }
        // No real tensor has 2^40 elements; a corrupt one would make MLX
        // allocate it.
        if elements > 1 << 40 {
            return Err(format!("{what} claims {elements} elements"));
        }
        let kind_id = cursor.u32(&what)?;
        let kind = GgmlType::from_id(kind_id);
        let offset = cursor.u64(&what)?;
        // Sized where the type is known; an unknown one is named when the
        // tensor is loaded, by the loader that cannot read it.
        let bytes = match kind {
            Ok(kind) => kind.bytes_for(elements).map_err(|e| format!("{what}: {e}"))?,
            Err(_) => 0,
        };
        tensors.push(TensorInfo { name, shape, kind, start: offset, bytes });
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(MetaValue::Int(a)) if *a > 0 && (*a as u64).is_power_of_two() => *a as u64,
        Some(other) => return Err(format!("metadata `general.alignment` is {other:?}, not a power of two")),
    };
    let header_end = len - cursor.left;
    let data_start = header_end.div_ceil(alignment).saturating_mul(alignment);
    for tensor in &mut tensors {
        let end = data_start.checked_add(tensor.start).and_then(|start| start.checked_add(tensor.bytes));
        match end {
            Some(end) if end <= len => tensor.start += data_start,
            _ => return Err(format!("tensor `{}` ends past the end of the file (truncated or corrupt)", tensor.name)),
        }
    }
    Ok(GgufHeader { metadata, tensors })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_truncation_are_errors_not_crashes() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        assert!(read_header(&write("a", b"GGML")).unwrap_err().contains("magic"));
        let mut header = b"GGUF".to_vec();
        header.extend(3u32.to_le_bytes());
        header.extend(0u64.to_le_bytes());
        header.extend(1u64.to_le_bytes());
        // A key that claims to be 2^60 bytes long.
        header.extend((1u64 << 60).to_le_bytes());
        assert!(read_header(&write("b", &header)).unwrap_err().contains("truncated or corrupt"));
        let mut empty = b"GGUF".to_vec();
        empty.extend(3u32.to_le_bytes());
        empty.extend(0u64.to_le_bytes());
        empty.extend(0u64.to_le_bytes());
        assert!(read_header(&write("c", &empty)).is_ok());
    }
}
