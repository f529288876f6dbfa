//! Where a data set's splits are, in a folder or a Hub repository, and
//! loading them in the one order every node uses.
//!
//! A split is read from, at the root or under `data/`, the first of:
//! - `{split}.jsonl` (mlx-lm's layout);
//! - `{split}.parquet`, or shards `{split}-00000-of-00002.parquet`, … (how
//!   `datasets.push_to_hub` publishes), in file-name order;
//! - `default/{split}/*.parquet` (the Hub's own Parquet conversion, on the
//!   revision `refs/convert/parquet`), in file-name order.
//!
//! The validation split may be named `valid`, `validation`, `val` or `dev`.
//! Row indices run on across shards and splits (train, then valid, then
//! test), and without a validation split the last tenth of the training
//! rows is held out, as for jsonl: the same files give the same indices and
//! the same fingerprint on every node.

use std::path::{Path, PathBuf};

use super::template::PromptTemplate;
use super::{DataError, Dataset, Row, Split, jsonl, parquet};

/// Folder depth searched below a data set's root (`default/train/0000.parquet`).
const MAX_DEPTH: usize = 3;
/// The most files a data set's folder listing may hold.
const MAX_FILES: usize = 100_000;

/// The files of one split, relative to the data set's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SplitFiles {
    Jsonl(String),
    Parquet(Vec<String>),
}

impl SplitFiles {
    pub fn names(&self) -> Vec<&str> {
        match self {
            SplitFiles::Jsonl(file) => vec![file.as_str()],
            SplitFiles::Parquet(files) => files.iter().map(String::as_str).collect(),
        }
    }
}

/// Where each split of a data set is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub train: SplitFiles,
    pub valid: Option<SplitFiles>,
    pub test: Option<SplitFiles>,
}

fn split_names(split: Split) -> &'static [&'static str] {
    match split {
        Split::Train => &["train"],
        Split::Valid => &["valid", "validation", "val", "dev"],
        Split::Test => &["test"],
    }
}

/// A Parquet file of split `name` directly in `dir` (`dir` ends with `/` or is empty).
fn is_parquet_of(file: &str, dir: &str, name: &str) -> bool {
    let Some(rest) = file.strip_prefix(dir) else { return false };
    let Some(stem) = rest.strip_suffix(".parquet") else { return false };
    !stem.contains('/') && (stem == name || stem.strip_prefix(name).is_some_and(|s| s.starts_with('-')))
}

/// The Parquet files that `matches` picks, in file-name order, if any.
fn parquet_files(files: &[String], matches: impl Fn(&str) -> bool) -> Option<SplitFiles> {
    let mut parquet: Vec<String> = files.iter().filter(|f| matches(f)).cloned().collect();
    parquet.sort();
    (!parquet.is_empty()).then_some(SplitFiles::Parquet(parquet))
}

fn find_split(files: &[String], split: Split) -> Option<SplitFiles> {
    for dir in ["", "data/"] {
        for name in split_names(split) {
            let jsonl = format!("{dir}{name}.jsonl");
            if files.contains(&jsonl) {
                return Some(SplitFiles::Jsonl(jsonl));
            }
            if let Some(found) = parquet_files(files, |f| is_parquet_of(f, dir, name)) {
                return Some(found);
            }
        }
    }
    split_names(split).iter().find_map(|name| {
        let dir = format!("default/{name}/");
        parquet_files(files, |f| f.strip_prefix(&dir).is_some_and(|rest| !rest.contains('/') && rest.ends_with(".parquet")))
    })
}

impl Layout {
    /// The layout of a data set with these files (paths relative to its
    /// root, `/`-separated); an error names what was looked for.
    pub fn find(files: &[String]) -> Result<Self, String> {
        let train = find_split(files, Split::Train).ok_or_else(|| {
            "no training split: expected train.jsonl, train.parquet or train-*.parquet (at the root or under data/), \
             or default/train/*.parquet"
                .to_owned()
        })?;
        Ok(Self {
            train,
            valid: find_split(files, Split::Valid),
            test: find_split(files, Split::Test),
        })
    }

    /// Every file the layout reads.
    pub fn files(&self) -> Vec<&str> {
        [Some(&self.train), self.valid.as_ref(), self.test.as_ref()].into_iter().flatten().flat_map(SplitFiles::names).collect()
    }
}

/// Files under `root`, relative and `/`-separated, sorted; hidden entries
/// (`.git`, `.cache`) and anything deeper than `MAX_DEPTH` are left out.
pub fn list_files(root: &Path) -> Vec<String> {
    fn walk(dir: &Path, prefix: &str, depth: usize, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for entry in entries.flatten() {
            if out.len() >= MAX_FILES {
                return;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            let path = entry.path();
            // `is_dir` follows symlinks: the Hub cache's snapshots are links.
            if path.is_dir() {
                if depth < MAX_DEPTH {
                    walk(&path, &format!("{prefix}{name}/"), depth + 1, out);
                }
            } else {
                out.push(format!("{prefix}{name}"));
            }
        }
    }
    let mut files = Vec::new();
    walk(root, "", 0, &mut files);
    files.sort();
    files
}

fn read_split(files: &SplitFiles, first_index: u64, resolve: &impl Fn(&str) -> Result<PathBuf, DataError>, template: Option<&PromptTemplate>) -> Result<Vec<Row>, DataError> {
    match files {
        SplitFiles::Jsonl(file) => jsonl::read_rows(&resolve(file)?, first_index, template),
        SplitFiles::Parquet(shards) => {
            let mut rows = Vec::new();
            for shard in shards {
                let next = first_index + rows.len() as u64;
                rows.extend(parquet::read_rows(&resolve(shard)?, next, template)?);
            }
            Ok(rows)
        }
    }
}

/// Reads the splits of `layout` (each file's local path from `resolve`).
pub fn load(name: &str, layout: &Layout, resolve: impl Fn(&str) -> Result<PathBuf, DataError>, template: Option<&PromptTemplate>) -> Result<Dataset, DataError> {
    let mut train = read_split(&layout.train, 0, &resolve, template)?;
    let mut next = train.len() as u64;
    let valid = match &layout.valid {
        Some(files) => read_split(files, next, &resolve, template)?,
        None => {
            let held_out = train.len() / 10;
            train.split_off(train.len() - held_out)
        }
    };
    next += valid.len() as u64;
    let test = match &layout.test {
        Some(files) => read_split(files, next, &resolve, template)?,
        None => Vec::new(),
    };
    Dataset::new(name.to_owned(), train, valid, test)
}

/// A local data folder in any of the layouts above.
pub fn load_folder(dir: &Path, template: Option<&PromptTemplate>) -> Result<Dataset, DataError> {
    if !dir.is_dir() {
        return Err(DataError::Read {
            path: dir.display().to_string(),
            message: "not a folder (expected `builtin`, `hf:org/name`, or a folder with train.jsonl or train.parquet)".into(),
        });
    }
    let layout = Layout::find(&list_files(dir)).map_err(|message| DataError::Read {
        path: dir.display().to_string(),
        message,
    })?;
    load(&dir.display().to_string(), &layout, |file| Ok(dir.join(file)), template)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| (*n).to_owned()).collect()
    }

    #[test]
    fn jsonl_comes_first_then_parquet_shards_in_name_order() {
        let layout = Layout::find(&files(&["train.jsonl", "train.parquet", "valid.jsonl"])).unwrap();
        assert_eq!(layout.train, SplitFiles::Jsonl("train.jsonl".into()));
        let layout = Layout::find(&files(&[
            "README.md",
            "data/train-00001-of-00002.parquet",
            "data/train-00000-of-00002.parquet",
            "data/validation-00000-of-00001.parquet",
            "data/trainer.parquet",
        ]))
        .unwrap();
        assert_eq!(
            layout.train,
            SplitFiles::Parquet(vec!["data/train-00000-of-00002.parquet".into(), "data/train-00001-of-00002.parquet".into()])
        );
        assert_eq!(layout.valid, Some(SplitFiles::Parquet(vec!["data/validation-00000-of-00001.parquet".into()])));
        assert_eq!(layout.test, None);
    }

    #[test]
    fn the_hubs_parquet_conversion_is_found() {
        let layout = Layout::find(&files(&["default/train/0001.parquet", "default/train/0000.parquet", "default/test/0000.parquet"])).unwrap();
        assert_eq!(layout.train, SplitFiles::Parquet(vec!["default/train/0000.parquet".into(), "default/train/0001.parquet".into()]));
        assert_eq!(layout.test, Some(SplitFiles::Parquet(vec!["default/test/0000.parquet".into()])));
        assert_eq!(layout.files().len(), 3);
    }

    #[test]
    fn no_training_split_is_an_error_that_says_what_was_looked_for() {
        let err = Layout::find(&files(&["valid.jsonl", "notes/train.parquet"])).unwrap_err();
        assert!(err.contains("train.parquet") && err.contains("train.jsonl"), "{err}");
    }
}
