//! A bounded walk over a GGUF file's header, key-value metadata and tensor
//! table before MLX's own parser sees it: that parser trusts lengths and
//! counts, and a corrupt file can crash the process. Every length here is
//! checked against the bytes left in the file before it is used.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
/// Deeper nesting than arrays of arrays is not GGUF.
const MAX_DEPTH: u32 = 2;

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

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.bytes(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.bytes(8, what)?;
        let mut word = [0u8; 8];
        word.copy_from_slice(&b);
        Ok(u64::from_le_bytes(word))
    }

    fn skip(&mut self, n: u64, what: &str) -> Result<(), String> {
        if n > self.left {
            return Err(format!("{what} needs {n} bytes but the file has {} left (truncated or corrupt)", self.left));
        }
        std::io::copy(&mut (&mut self.reader).take(n), &mut std::io::sink()).map_err(|e| format!("{what}: {e}"))?;
        self.left -= n;
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<(), String> {
        let len = self.u64(what)?;
        self.skip(len, what)
    }

    fn value(&mut self, kind: u32, what: &str, depth: u32) -> Result<(), String> {
        let size = match kind {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => return self.string(what),
            9 if depth < MAX_DEPTH => {
                let element = self.u32(what)?;
                let count = self.u64(what)?;
                // Even one-byte elements cannot outnumber the bytes left.
                if count > self.left {
                    return Err(format!("{what}: an array of {count} elements in {} bytes", self.left));
                }
                for _ in 0..count {
                    self.value(element, what, depth + 1)?;
                }
                return Ok(());
            }
            other => return Err(format!("{what}: unknown value type {other}")),
        };
        self.skip(size, what)
    }
}

/// Checks that `path` is a structurally sound GGUF file (versions 2 and 3).
pub fn check(path: &Path) -> Result<(), String> {
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
    let tensors = cursor.u64("the tensor count")?;
    let pairs = cursor.u64("the metadata count")?;
    for i in 0..pairs {
        let what = format!("metadata entry {i}");
        cursor.string(&what)?;
        let kind = cursor.u32(&what)?;
        cursor.value(kind, &what, 0)?;
    }
    for i in 0..tensors {
        let what = format!("tensor {i}");
        cursor.string(&what)?;
        let dims = cursor.u32(&what)?;
        if dims > 4 {
            return Err(format!("{what} has {dims} dimensions"));
        }
        let mut elements: u64 = 1;
        for _ in 0..dims {
            elements = elements.saturating_mul(cursor.u64(&what)?);
        }
        // No real tensor has 2^40 elements; a corrupt one would make MLX
        // allocate it.
        if elements > 1 << 40 {
            return Err(format!("{what} claims {elements} elements"));
        }
        let kind = cursor.u32(&what)?;
        if kind > 63 {
            return Err(format!("{what} has unknown element type {kind}"));
        }
        let offset = cursor.u64(&what)?;
        if offset >= cursor.left {
            return Err(format!("{what} starts at data offset {offset}, past the end of the file"));
        }
    }
    Ok(())
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
        assert!(check(&write("a", b"GGML")).unwrap_err().contains("magic"));
        let mut header = b"GGUF".to_vec();
        header.extend(3u32.to_le_bytes());
        header.extend(0u64.to_le_bytes());
        header.extend(1u64.to_le_bytes());
        // A key that claims to be 2^60 bytes long.
        header.extend((1u64 << 60).to_le_bytes());
        assert!(check(&write("b", &header)).unwrap_err().contains("truncated or corrupt"));
        let mut empty = b"GGUF".to_vec();
        empty.extend(3u32.to_le_bytes());
        empty.extend(0u64.to_le_bytes());
        empty.extend(0u64.to_le_bytes());
        assert!(check(&write("c", &empty)).is_ok());
    }
}
