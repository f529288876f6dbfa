//! `hf:org/name[@revision]`: files from the Hugging Face Hub through the
//! standard cache (`HF_HOME`, or `HF_HUB_CACHE`), shared with Python tools.
//! With `HF_HUB_OFFLINE=1` only the cache is used, and a missing file is a
//! clear error instead of a network timeout. Models and data sets both use it.

use std::path::PathBuf;

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, CacheRepo, Repo};

pub use hf_hub::RepoType;

#[derive(Debug, thiserror::Error)]
#[error("hf:{spec}: {message}")]
pub struct HubError {
    pub spec: String,
    pub message: String,
}

/// Parses `org/name[@revision]` (after `hf:`).
pub fn parse_spec(spec: &str) -> Result<(String, String), HubError> {
    let bad = |message: &str| HubError {
        spec: spec.to_owned(),
        message: message.to_owned(),
    };
    let (id, revision) = match spec.split_once('@') {
        Some((id, revision)) if !revision.is_empty() => (id, revision),
        Some(_) => return Err(bad("empty revision after `@`")),
        None => (spec, "main"),
    };
    let valid = |part: &str| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) && part != ".." && part != ".";
    match id.split_once('/') {
        Some((org, name)) if valid(org) && valid(name) => Ok((id.to_owned(), revision.to_owned())),
        _ => Err(bad("expected hf:org/name or hf:org/name@revision")),
    }
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// One repository, read through the cache and, when online, the Hub.
pub struct HubRepo {
    spec: String,
    repo: Repo,
    cache_path: PathBuf,
    cached: CacheRepo,
    /// `None` when offline.
    remote: Option<ApiRepo>,
}

impl HubRepo {
    pub fn open(spec: &str, kind: RepoType) -> Result<Self, HubError> {
        let (id, revision) = parse_spec(spec)?;
        let repo = Repo::with_revision(id, kind, revision);
        let cache = match std::env::var_os("HF_HUB_CACHE") {
            Some(path) => Cache::new(PathBuf::from(path)),
            None => Cache::from_env(),
        };
        let remote = if offline() {
            None
        } else {
            let api = ApiBuilder::from_env()
                .with_cache_dir(cache.path().clone())
                .with_progress(true)
                .build()
                .map_err(|e| HubError {
                    spec: spec.to_owned(),
                    message: format!("cannot reach the Hugging Face Hub: {e}"),
                })?;
            Some(api.repo(repo.clone()))
        };
        Ok(Self {
            spec: spec.to_owned(),
            cache_path: cache.path().clone(),
            cached: cache.repo(repo.clone()),
            repo,
            remote,
        })
    }

    fn error(&self, message: String) -> HubError {
        HubError {
            spec: self.spec.clone(),
            message,
        }
    }

    /// Offline, `what` is not in the cache.
    fn not_cached(&self, what: &str) -> HubError {
        self.error(format!(
            "{what} not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set; download it once online (unset HF_HUB_OFFLINE) or pass a local path",
            self.cache_path.display()
        ))
    }

    /// The local path of `file`, downloaded first unless offline.
    pub fn get(&self, file: &str) -> Result<PathBuf, HubError> {
        let err = |message: String| self.error(message);
        match &self.remote {
            Some(remote) => remote
                .get(file)
                .map_err(|e| err(format!("{file}: {e} (set HF_HUB_OFFLINE=1 to use only the cache)"))),
            None => self.cached.get(file).ok_or_else(|| self.not_cached(&format!("{file} is"))),
        }
    }

    /// The paths of every file in the repository at its revision: the Hub's
    /// listing when online, the cached snapshot's files when offline.
    pub fn files(&self) -> Result<Vec<String>, HubError> {
        if let Some(remote) = &self.remote {
            let info = remote.info().map_err(|e| self.error(format!("cannot list the repository: {e} (set HF_HUB_OFFLINE=1 to use only the cache)")))?;
            return Ok(info.siblings.into_iter().map(|s| s.rfilename).collect());
        }
        let folder = self.cache_path.join(self.repo.folder_name());
        let missing = || self.not_cached("the repository is");
        let commit = std::fs::read_to_string(folder.join("refs").join(self.repo.revision())).map_err(|_| missing())?;
        let snapshot = folder.join("snapshots").join(commit.trim());
        if !snapshot.is_dir() {
            return Err(missing());
        }
        Ok(crate::data::layout::list_files(&snapshot))
    }

    /// Like `get`, for files a repository may not have.
    pub fn get_optional(&self, file: &str) -> Option<PathBuf> {
        self.get(file).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_rejected() {
        assert_eq!(parse_spec("org/name").unwrap(), ("org/name".into(), "main".into()));
        assert_eq!(parse_spec("org/name@v1.0").unwrap(), ("org/name".into(), "v1.0".into()));
        for bad in ["name", "org/", "/name", "org/name@", "org/../x", "a/b/c", "org/na me"] {
            assert!(parse_spec(bad).is_err(), "{bad}");
        }
    }
}
