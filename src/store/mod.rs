//! The content-addressed store on disk: chunks under `chunks/<2 hex>/<rest>`
//! named by their blake3, verified on write, on read and when the store
//! opens, written atomically (temporary file, fsync, rename; without the
//! fsyncs for what a peer sent; leftovers of a crash are removed on open);
//! signed manifests by round; garbage
//! collection of old rounds; and a disk quota.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};

use crate::durable::Durability;
use crate::wire::codec::{Digest, Limits};
use crate::wire::manifest::SignedManifest;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {message}")]
    Io { path: String, message: String },
    #[error("chunk {expected:?} does not hash to its id (got {actual:?})")]
    WrongHash { expected: Digest, actual: Digest },
    #[error("the store quota of {quota} bytes would be exceeded ({used} used, {incoming} incoming); raise network.store_quota_mb or free disk space")]
    Quota { quota: u64, used: u64, incoming: u64 },
    #[error("stored chunk {0:?} is corrupt and was removed")]
    Corrupt(Digest),
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcReport {
    pub manifests_removed: usize,
    pub chunks_removed: usize,
    pub bytes_freed: u64,
}

#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    quota: u64,
    used: u64,
}

impl Store {
    /// Opens (creating) the store under `root`, counting what it holds.
    pub fn open(root: &Path, quota: u64) -> Result<Self, StoreError> {
        for dir in ["chunks", "manifests", "tmp"] {
            fs::create_dir_all(root.join(dir)).map_err(io_err(root))?;
        }
        // Leftovers of writes interrupted by a crash.
        for entry in fs::read_dir(root.join("tmp")).map_err(io_err(root))?.flatten() {
            let _ = fs::remove_file(entry.path());
        }
        // A chunk whose content does not match its name (a disk that lost a
        // write the rename had made visible) is dropped: peers have it.
        let mut used = 0;
        for (id, path) in walk_chunks(&root.join("chunks"))? {
            match fs::read(&path) {
                Ok(bytes) if Digest::of(&bytes) == id => used += bytes.len() as u64,
                _ => {
                    tracing::warn!(chunk = ?id, path = %path.display(), "removed a stored chunk that does not match its name");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        Ok(Self {
            root: root.to_owned(),
            quota,
            used,
        })
    }

    pub fn used_bytes(&self) -> u64 {
        self.used
    }

    fn chunk_path(&self, id: &Digest) -> PathBuf {
        let hex = id.to_hex();
        self.root.join("chunks").join(&hex[..2]).join(&hex[2..])
    }

    pub fn has_chunk(&self, id: &Digest) -> bool {
        self.chunk_path(id).is_file()
    }

    /// Stores a chunk after checking it hashes to `id`, durably; `false`
    /// if it was already there.
    pub fn put_chunk(&mut self, id: &Digest, bytes: &[u8]) -> Result<bool, StoreError> {
        self.put_chunk_with(id, bytes, Durability::Synced)
    }

    /// `put_chunk` for a chunk a peer sent, which peers can send again:
    /// not fsynced (`durable::Durability::Cached`).
    pub fn cache_chunk(&mut self, id: &Digest, bytes: &[u8]) -> Result<bool, StoreError> {
        self.put_chunk_with(id, bytes, Durability::Cached)
    }

    fn put_chunk_with(&mut self, id: &Digest, bytes: &[u8], durability: Durability) -> Result<bool, StoreError> {
        let actual = Digest::of(bytes);
        if actual != *id {
            return Err(StoreError::WrongHash { expected: *id, actual });
        }
        let path = self.chunk_path(id);
        if path.is_file() {
            return Ok(false);
        }
        if self.used + bytes.len() as u64 > self.quota {
            return Err(StoreError::Quota {
                quota: self.quota,
                used: self.used,
                incoming: bytes.len() as u64,
            });
        }
        self.write_atomically(&path, bytes, "chunk-write", durability)?;
        self.used += bytes.len() as u64;
        Ok(true)
    }

    /// Reads a chunk and checks it still hashes to its id; a corrupt file is
    /// removed (it can be fetched again) and reported.
    pub fn get_chunk(&mut self, id: &Digest) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.chunk_path(id);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        if Digest::of(&bytes) != *id {
            let _ = fs::remove_file(&path);
            self.used = self.used.saturating_sub(bytes.len() as u64);
            return Err(StoreError::Corrupt(*id));
        }
        Ok(Some(bytes))
    }

    /// Keeps a verified signed manifest under its round, durably.
    pub fn put_manifest(&mut self, round: u64, signed: &SignedManifest) -> Result<(), StoreError> {
        self.put_manifest_with(round, signed, Durability::Synced)
    }

    /// `put_manifest` for a peer's manifest: not fsynced (`durable::Durability::Cached`).
    pub fn cache_manifest(&mut self, round: u64, signed: &SignedManifest) -> Result<(), StoreError> {
        self.put_manifest_with(round, signed, Durability::Cached)
    }

    fn put_manifest_with(&mut self, round: u64, signed: &SignedManifest, durability: Durability) -> Result<(), StoreError> {
        let bytes = signed.to_bytes().map_err(|e| StoreError::Io {
            path: "manifest".into(),
            message: e.to_string(),
        })?;
        let dir = self.root.join("manifests").join(format!("{round:020}"));
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        self.write_atomically(&dir.join(format!("{}.bin", Digest::of(&bytes).to_hex())), &bytes, "manifest-write", durability)
    }

    /// The signed manifests kept for `round` (re-verified by the caller).
    pub fn manifests(&self, round: u64) -> Result<Vec<SignedManifest>, StoreError> {
        let dir = self.root.join("manifests").join(format!("{round:020}"));
        let Ok(entries) = fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let bytes = fs::read(entry.path()).map_err(io_err(&entry.path()))?;
            if let Ok(signed) = SignedManifest::from_bytes(&bytes) {
                out.push(signed);
            }
        }
        Ok(out)
    }

    /// Drops the manifests of rounds before `keep_from_round` and every chunk
    /// that no remaining manifest (nor `pinned`) references.
    pub fn gc(&mut self, keep_from_round: u64, pinned: &HashSet<Digest>) -> Result<GcReport, StoreError> {
        let mut report = GcReport::default();
        let manifests_dir = self.root.join("manifests");
        let mut referenced: HashSet<Digest> = pinned.clone();
        for entry in fs::read_dir(&manifests_dir).map_err(io_err(&manifests_dir))?.flatten() {
            let round: Option<u64> = entry.file_name().to_str().and_then(|n| n.parse().ok());
            match round {
                Some(round) if round >= keep_from_round => {
                    for signed in self.manifests(round)? {
                        if let Ok((manifest, _)) = signed.verify(&Limits::default()) {
                            referenced.extend(manifest.chunk_ids);
                        }
                    }
                }
                _ => {
                    report.manifests_removed += fs::read_dir(entry.path()).map(|d| d.count()).unwrap_or(0);
                    fs::remove_dir_all(entry.path()).map_err(io_err(&entry.path()))?;
                }
            }
        }
        // Recount while sweeping, so the quota also heals from files changed
        // behind the store's back.
        let mut used = 0;
        for (id, path) in walk_chunks(&self.root.join("chunks"))? {
            let size = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if referenced.contains(&id) {
                used += size;
            } else {
                fs::remove_file(&path).map_err(io_err(&path))?;
                report.chunks_removed += 1;
                report.bytes_freed += size;
            }
        }
        self.used = used;
        Ok(report)
    }

    fn write_atomically(&self, path: &Path, bytes: &[u8], point: &str, durability: Durability) -> Result<(), StoreError> {
        let parent = path.parent().unwrap_or(&self.root);
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        let temp = self.root.join("tmp").join(format!("{}.{}", std::process::id(), Digest::of(path.as_os_str().as_encoded_bytes()).to_hex()));
        crate::durable::write_replacing(&temp, path, bytes, point, durability).map_err(io_err(path))
    }
}

/// Every `chunks/<2 hex>/<62 hex>` file with its id; other files are ignored.
fn walk_chunks(dir: &Path) -> Result<Vec<(Digest, PathBuf)>, StoreError> {
    let mut out = Vec::new();
    for prefix in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
        let Some(head) = prefix.file_name().to_str().map(str::to_owned) else { continue };
        let Ok(files) = fs::read_dir(prefix.path()) else { continue };
        for file in files.flatten() {
            if let Some(id) = file.file_name().to_str().and_then(|tail| Digest::from_hex(&format!("{head}{tail}"))) {
                out.push((id, file.path()));
            }
        }
    }
    Ok(out)
}
