#!/usr/bin/env python3
"""Writes the Parquet test fixtures in tests/fixtures/parquet with pyarrow,
the reference writer (`datasets` and the Hub's conversion use it):

- words/: the built-in task's shape as prompt/completion rows, published as
  `datasets.push_to_hub` does (data/train-0000N-of-00002.parquet shards and a
  validation split, snappy), plus words.jsonl/ with the same rows as jsonl;
- chat/: `messages` rows (a list of role/content structs), gzip, with a
  train and a test split in the Hub conversion's layout (default/{split}/);
- bad/: a `text` column whose second value is null (a bad row).

Usage: pip install pyarrow; python3 scripts/make_parquet_fixtures.py
"""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "parquet")
WORDS = ["apple", "river", "stone", "cloud", "green", "seven", "music", "paper"]


def words_rows(start, count):
    rows = []
    for i in range(start, start + count):
        picked = [WORDS[(i * 3 + k) % len(WORDS)] for k in range(3)]
        rows.append({"prompt": "Reverse the order of these words: " + " ".join(picked),
                     "completion": " ".join(reversed(picked))})
    return rows


def write(path, rows, compression):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, compression=compression)


train = words_rows(0, 20)
valid = words_rows(20, 4)
write(os.path.join(ROOT, "words/data/train-00000-of-00002.parquet"), train[:12], "snappy")
write(os.path.join(ROOT, "words/data/train-00001-of-00002.parquet"), train[12:], "snappy")
write(os.path.join(ROOT, "words/data/validation-00000-of-00001.parquet"), valid, "snappy")
os.makedirs(os.path.join(ROOT, "words.jsonl"), exist_ok=True)
for name, rows in [("train", train), ("valid", valid)]:
    with open(os.path.join(ROOT, "words.jsonl", name + ".jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

chat = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
        for r in words_rows(100, 10)]
write(os.path.join(ROOT, "chat/default/train/0000.parquet"), chat[:8], "gzip")
write(os.path.join(ROOT, "chat/default/test/0000.parquet"), chat[8:], "gzip")
# A column no row format knows, in the second record's row group too.
write(os.path.join(ROOT, "bad/train.parquet"), [{"text": "fine"}, {"text": None}], "snappy")
print("written under", os.path.normpath(ROOT))
