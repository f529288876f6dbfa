//! Parquet data files, the format most Hugging Face data sets are published
//! in. Each record becomes the JSON object a jsonl line would be (strings,
//! numbers, lists, nested structs such as `messages`), and goes through the
//! same row formats and prompt templates, so a data set reads the same from
//! either format.
//!
//! Read with arrow-rs's `parquet` crate, its row API (no Arrow arrays), with
//! snappy, gzip and lz4 compression: pyarrow's and `datasets`' defaults.

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};

use super::template::PromptTemplate;
use super::{DataError, Row, jsonl};

/// Rows of one Parquet file, indexed from `first_index`; a bad record is an
/// error naming the file and the record's number (from 1).
pub fn read_rows(path: &Path, first_index: u64, template: Option<&PromptTemplate>) -> Result<Vec<Row>, DataError> {
    let unreadable = |message: String| DataError::Read {
        path: path.display().to_string(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| unreadable(e.to_string()))?;
    let reader = SerializedFileReader::new(file).map_err(|e| unreadable(format!("not a readable Parquet file: {e}")))?;
    let records = reader.get_row_iter(None).map_err(|e| unreadable(format!("cannot read its records: {e}")))?;
    let mut rows = Vec::new();
    for (number, record) in records.enumerate() {
        let bad = |message: String| DataError::BadRow {
            file: path.display().to_string(),
            line: number + 1,
            message,
        };
        let record = record.map_err(|e| bad(format!("unreadable record: {e} (supported compression: snappy, gzip, lz4, none)")))?;
        let sample = jsonl::sample_of(record.to_json_value(), template).map_err(bad)?;
        rows.push(Row {
            index: first_index + rows.len() as u64,
            sample,
        });
    }
    Ok(rows)
}
