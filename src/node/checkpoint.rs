//! Round checkpoints of a training node: after each round, the outer state
//! (the adapter it will train from next, and the outer momentum if any),
//! its optimizer state, the round and the RNG state, in one file per run
//! written atomically (`crate::durable`). The previous
//! checkpoint is kept beside it until the new one is in place, so a crash at
//! any moment leaves at least one whole checkpoint.
//!
//! The RNG state is the global step with the seed: batch order and dropout
//! masks are pure functions of (seed, step), so a resumed node trains the
//! same batches it would have without the crash.
//!
//! Layout: magic, u32 header length, JSON header, u64 + adapter bytes,
//! u64 + optimizer bytes (the canonical adapter encoding), blake3 of all
//! that. Every length is checked before anything is allocated.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::aggregate::Tensors;
use crate::wire::codec::{Digest, Limits};
use crate::wire::tensors::{decode_checked, encode};

const MAGIC: &[u8; 8] = b"BLSMCKP1";
const MAX_HEADER: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint {path}: {message}")]
    Io { path: String, message: String },
    #[error("checkpoint {path} is damaged ({why}) and so is the previous one; remove {dir} to start this node afresh (it catches up from its peers)")]
    Damaged { path: String, why: String, dir: String },
    #[error("checkpoint {path} was written with train.seed = {found}, this node has {expected}; set it back, or remove the file to start afresh")]
    Seed { path: String, found: u64, expected: u64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Header {
    run_id: Digest,
    /// The next round to train.
    round: u64,
    /// Hash of the adapter's canonical bytes.
    adapter_hash: Digest,
    seed: u64,
    /// Global training step of the next round (RNG state with the seed).
    step: u64,
}

/// What a node needs to go on after a crash.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundCheckpoint {
    pub run_id: Digest,
    /// The next round to train.
    pub round: u64,
    pub seed: u64,
    pub step: u64,
    /// The average the next round trains from.
    pub adapter: Tensors,
    /// This node's optimizer state (may be empty: SGD, or before a step).
    pub optimizer: Tensors,
}

/// The checkpoints of one run in `dir`, for a node with this seed and
/// round length.
#[derive(Debug, Clone)]
pub struct CheckpointFile {
    dir: PathBuf,
    run_id: Digest,
    seed: u64,
    steps_per_round: u64,
}

impl CheckpointFile {
    pub fn new(dir: &Path, run_id: Digest, seed: u64, steps_per_round: u64) -> Self {
        Self {
            dir: dir.to_owned(),
            run_id,
            seed,
            steps_per_round,
        }
    }

    /// The checkpoint of a node about to train `round`.
    pub fn at(&self, round: u64, adapter: Tensors, optimizer: Tensors) -> RoundCheckpoint {
        RoundCheckpoint {
            run_id: self.run_id,
            round,
            seed: self.seed,
            step: round * self.steps_per_round,
            adapter,
            optimizer,
        }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(format!("{}.ckpt", self.run_id.to_hex()))
    }

    fn previous(&self) -> PathBuf {
        self.dir.join(format!("{}.prev.ckpt", self.run_id.to_hex()))
    }

    fn temp(&self) -> PathBuf {
        self.dir.join(format!(".{}.ckpt.tmp", self.run_id.to_hex()))
    }

    fn io(&self, path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
        let path = path.display().to_string();
        move |e| CheckpointError::Io {
            path: path.clone(),
            message: e.to_string(),
        }
    }

    /// Writes `checkpoint` (blocking: fsyncs).
    pub fn save(&self, checkpoint: &RoundCheckpoint) -> Result<(), CheckpointError> {
        std::fs::create_dir_all(&self.dir).map_err(self.io(&self.dir))?;
        let bytes = to_bytes(checkpoint).map_err(|message| CheckpointError::Io {
            path: self.path().display().to_string(),
            message,
        })?;
        let (path, previous) = (self.path(), self.previous());
        // The current one becomes the previous one; a crash between this
        // rename and the next leaves only the previous, which `load` takes.
        if path.exists() {
            std::fs::rename(&path, &previous).map_err(self.io(&path))?;
        }
        crate::durable::write_atomically(&self.temp(), &path, &bytes, "checkpoint-write").map_err(self.io(&path))?;
        Ok(())
    }

    /// The newest whole checkpoint, checked against the layout of what the
    /// node saves (its outer state, and its error feedback's residual) and
    /// of its adapter (the optimizer keeps moments of each adapter tensor),
    /// and the node's seed; `None` if this run has none. A leftover
    /// temporary file (a crash during a write) is removed; a damaged
    /// checkpoint falls back to the previous one.
    pub fn load(&self, layout: (&Tensors, &Tensors), limits: &Limits) -> Result<Option<RoundCheckpoint>, CheckpointError> {
        let temp = self.temp();
        if temp.exists() {
            tracing::warn!(path = %temp.display(), "removed a checkpoint a crash left half written");
            std::fs::remove_file(&temp).map_err(self.io(&temp))?;
        }
        let mut damage = None;
        for path in [self.path(), self.previous()] {
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(self.io(&path)(e)),
            };
            match from_bytes(&bytes, layout, limits) {
                Ok(checkpoint) if checkpoint.run_id != self.run_id => {
                    damage.get_or_insert((path, format!("it belongs to run {}", checkpoint.run_id)));
                }
                Ok(checkpoint) if checkpoint.seed != self.seed => {
                    return Err(CheckpointError::Seed {
                        path: path.display().to_string(),
                        found: checkpoint.seed,
                        expected: self.seed,
                    });
                }
                Ok(checkpoint) => return Ok(Some(checkpoint)),
                Err(why) => {
                    tracing::warn!(path = %path.display(), %why, "a damaged checkpoint; trying the previous one");
                    damage.get_or_insert((path, why));
                }
            }
        }
        match damage {
            None => Ok(None),
            Some((path, why)) => Err(CheckpointError::Damaged {
                path: path.display().to_string(),
                why,
                dir: self.dir.display().to_string(),
            }),
        }
    }
}

fn to_bytes(checkpoint: &RoundCheckpoint) -> Result<Vec<u8>, String> {
    let adapter = encode(&checkpoint.adapter)?;
    let optimizer = if checkpoint.optimizer.is_empty() { Vec::new() } else { encode(&checkpoint.optimizer)? };
    let header = Header {
        run_id: checkpoint.run_id,
        round: checkpoint.round,
        adapter_hash: Digest::of(&adapter),
        seed: checkpoint.seed,
        step: checkpoint.step,
    };
    let header = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(MAGIC.len() + 4 + header.len() + 16 + adapter.len() + optimizer.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    for section in [&adapter, &optimizer] {
        out.extend_from_slice(&(section.len() as u64).to_le_bytes());
        out.extend_from_slice(section);
    }
    let sum = Digest::of(&out);
    out.extend_from_slice(&sum.0);
    Ok(out)
}

/// Reads `n` bytes at `*at`, if there are that many.
fn take<'a>(bytes: &'a [u8], at: &mut usize, n: usize) -> Result<&'a [u8], String> {
    let end = at.checked_add(n).filter(|end| *end <= bytes.len()).ok_or("truncated")?;
    let part = &bytes[*at..end];
    *at = end;
    Ok(part)
}

fn from_bytes(bytes: &[u8], (layout, adapter_layout): (&Tensors, &Tensors), limits: &Limits) -> Result<RoundCheckpoint, String> {
    let body_len = bytes.len().checked_sub(32).ok_or("truncated")?;
    let (body, sum) = bytes.split_at(body_len);
    if Digest::of(body).0 != sum {
        return Err("its checksum does not match (truncated or corrupt)".into());
    }
    let mut at = 0;
    if take(body, &mut at, MAGIC.len())? != MAGIC {
        return Err("not a blossom-p2p checkpoint".into());
    }
    let header_len = u32::from_le_bytes(take(body, &mut at, 4)?.try_into().map_err(|_| "truncated")?) as usize;
    if header_len > MAX_HEADER {
        return Err(format!("a header of {header_len} bytes"));
    }
    let header: Header = serde_json::from_slice(take(body, &mut at, header_len)?).map_err(|e| format!("header: {e}"))?;
    let mut section = |what: &str| -> Result<&[u8], String> {
        let len = u64::from_le_bytes(take(body, &mut at, 8)?.try_into().map_err(|_| "truncated")?);
        let len = usize::try_from(len).ok().filter(|len| *len <= limits.max_adapter_bytes * 2).ok_or(format!("a {what} of {len} bytes"))?;
        take(body, &mut at, len)
    };
    let adapter_bytes = section("adapter")?;
    let optimizer_bytes = section("optimizer state")?;
    if Digest::of(adapter_bytes) != header.adapter_hash {
        return Err("the adapter does not match its hash".into());
    }
    let adapter = decode_checked(adapter_bytes, layout, limits).map_err(|e| format!("adapter: {e}"))?;
    let optimizer = if optimizer_bytes.is_empty() {
        Tensors::new()
    } else {
        let limits = Limits {
            max_adapter_bytes: limits.max_adapter_bytes * 2,
            max_tensors: limits.max_tensors * 2,
        };
        decode_checked(optimizer_bytes, &moment_layout(adapter_layout), &limits).map_err(|e| format!("optimizer state: {e}"))?
    };
    Ok(RoundCheckpoint {
        run_id: header.run_id,
        round: header.round,
        seed: header.seed,
        step: header.step,
        adapter,
        optimizer,
    })
}

/// Adam's moments: `<name>.m1` and `<name>.m2` for every adapter tensor.
fn moment_layout(layout: &Tensors) -> Tensors {
    layout
        .iter()
        .flat_map(|(name, t)| [(format!("{name}.m1"), t.clone()), (format!("{name}.m2"), t.clone())])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Tensor;

    fn file(dir: &Path, seed: u64) -> CheckpointFile {
        CheckpointFile::new(dir, Digest::of(b"run"), seed, 10)
    }

    fn checkpoint(round: u64) -> RoundCheckpoint {
        let tensor = |v: f32| Tensor::new(vec![2, 2], vec![v, 1.0, 2.0, 3.0]).unwrap();
        let adapter: Tensors = [("a".to_owned(), tensor(round as f32))].into();
        file(Path::new("."), 7).at(round, adapter.clone(), moment_layout(&adapter))
    }

    #[test]
    fn a_checkpoint_comes_back_and_a_damaged_one_falls_back_to_the_previous() {
        let dir = tempfile::tempdir().unwrap();
        let file = file(dir.path(), 7);
        let layout = checkpoint(0).adapter;
        assert_eq!(file.load((&layout, &layout), &Limits::default()).unwrap(), None);
        file.save(&checkpoint(1)).unwrap();
        file.save(&checkpoint(2)).unwrap();
        assert_eq!(file.load((&layout, &layout), &Limits::default()).unwrap(), Some(checkpoint(2)));
        // A half-written temporary file is removed; a truncated current
        // checkpoint gives way to the previous one.
        std::fs::write(file.temp(), b"BLSMCKP1 half").unwrap();
        let bytes = std::fs::read(file.path()).unwrap();
        std::fs::write(file.path(), &bytes[..bytes.len() - 5]).unwrap();
        assert_eq!(file.load((&layout, &layout), &Limits::default()).unwrap(), Some(checkpoint(1)));
        assert!(!file.temp().exists());
        // Another seed is a clear error; so is damage to both.
        let other_seed = CheckpointFile::new(dir.path(), Digest::of(b"run"), 8, 10);
        assert!(matches!(other_seed.load((&layout, &layout), &Limits::default()), Err(CheckpointError::Seed { found: 7, expected: 8, .. })));
        std::fs::write(file.previous(), b"garbage").unwrap();
        let error = file.load((&layout, &layout), &Limits::default()).unwrap_err().to_string();
        assert!(error.contains("damaged") && error.contains("remove"), "{error}");
    }

    /// A state with the outer momentum and the error feedback's residual
    /// beside the adapter comes back whole; the optimizer's moments follow
    /// the adapter's tensors only.
    #[test]
    fn a_state_with_momentum_and_residual_comes_back() {
        use crate::aggregate::outer::{MOMENTUM_SUFFIX, OuterOptimizer, initial_state};
        let dir = tempfile::tempdir().unwrap();
        let file = file(dir.path(), 7);
        let adapter = checkpoint(0).adapter;
        let mut state = initial_state(OuterOptimizer::Nesterov { lr: 0.7, momentum: 0.9 }, &adapter);
        state.get_mut(&format!("a{MOMENTUM_SUFFIX}")).unwrap().values = vec![0.25, -1.0, 3.5, 1e-7];
        state.insert("a.residual".to_owned(), Tensor::new(vec![2, 2], vec![1e-6, 0.0, -2e-6, 5e-7]).unwrap());
        let saved = file.at(4, state.clone(), moment_layout(&adapter));
        file.save(&saved).unwrap();
        assert_eq!(file.load((&state, &adapter), &Limits::default()).unwrap(), Some(saved));
    }

    #[test]
    fn every_truncation_is_refused_without_a_panic() {
        let layout = checkpoint(0).adapter;
        let bytes = to_bytes(&checkpoint(3)).unwrap();
        for cut in 0..bytes.len() {
            assert!(from_bytes(&bytes[..cut], (&layout, &layout), &Limits::default()).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert!(from_bytes(&flipped, (&layout, &layout), &Limits::default()).is_err());
        assert_eq!(from_bytes(&bytes, (&layout, &layout), &Limits::default()).unwrap(), checkpoint(3));
    }
}
