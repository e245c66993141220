"""Hugging Face ``datasets`` side of a shards folder: sizes.json, parquet index, dataset card, loaders.

A shards folder written by :mod:`curate.shards` is a loadable HF dataset:

* ``datasets.load_dataset("webdataset", data_files={"train": ".../shard-*.tar"})`` — features are inferred from
  the first samples (every sample has the same non-null JSON fields, so inference is stable; an all-empty
  ``concept_ids`` list in the first samples would still infer ``list<null>``: pass ``features=FEATURES`` or use
  :func:`load_shards`, which does);
* ``datasets.load_dataset(FOLDER)`` — the ``README.md`` card carries ``configs:`` (data files) AND
  ``dataset_info.features``, so no inference happens at all;
* ``datasets.load_dataset("parquet", data_files=".../index.parquet")`` — one row per sample (key, shard, uid,
  caption, concept_ids, source, url, sha256, width, height); :func:`load_index`.

``sizes.json`` maps each shard's file name to its sample count (the convention open_clip / webdataset
loaders read to know the epoch size without opening the tars).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from curate.catalog import Catalog
from tether.fileio import atomic_write

SHARD_GLOB = "shard-*.tar"


def features():
    """The ``datasets.Features`` of a tether webdataset sample (as the webdataset builder names them)."""
    from datasets import Features, Image, Value

    try:
        from datasets import List
    except ImportError:  # datasets < 4
        from datasets import Sequence as List

    return Features({
        "jpg": Image(),
        "txt": Value("string"),
        "json": {
            "uid": Value("string"), "caption": Value("string"), "concept_ids": List(Value("string")),
            "source": Value("string"), "url": Value("string"), "sha256": Value("string"),
            "width": Value("int64"), "height": Value("int64"),
        },
        "__key__": Value("string"),
        "__url__": Value("string"),
    })


def write_sizes(cat: Catalog, out: Path) -> dict[str, int]:
    sizes = dict(cat.execute("SELECT shard, count(*) FROM shard_index GROUP BY 1 ORDER BY 1").fetchall())
    atomic_write(out / "sizes.json", json.dumps(sizes, indent=1, sort_keys=True) + "\n")
    return sizes


def write_index(cat: Catalog, out: Path) -> Path:
    """``index.parquet``: one row per sample, the same fields as the tar's JSON plus key and shard."""
    path = out / "index.parquet"
    tmp = out / ".index.parquet.tmp"
    q = str(tmp).replace("'", "''")
    cat.execute(f"""COPY (
        SELECT s.key, s.shard, m.uid, coalesce(m.caption, '') AS caption,
               coalesce(m.concept_ids, []::VARCHAR[]) AS concept_ids, coalesce(m.source, '') AS source,
               coalesce(m.url, '') AS url, coalesce(d.sha256, '') AS sha256,
               coalesce(d.width, 0)::BIGINT AS width, coalesce(d.height, 0)::BIGINT AS height
        FROM shard_index s JOIN media_rows m USING (uid) JOIN downloads d USING (uid) ORDER BY s.pos
        ) TO '{q}' (FORMAT parquet)""")
    os.replace(tmp, path)
    return path


# ``DatasetInfo(features=features())._to_yaml_dict()`` written out, so that writing a card does not import
# ``datasets`` (seconds of start-up); tests/test_shards.py checks that the two agree.
FEATURES_YAML: list[dict] = [
    {"name": "jpg", "dtype": "image"},
    {"name": "txt", "dtype": "string"},
    {"name": "json", "struct": [
        {"name": "uid", "dtype": "string"}, {"name": "caption", "dtype": "string"},
        {"name": "concept_ids", "list": "string"}, {"name": "source", "dtype": "string"},
        {"name": "url", "dtype": "string"}, {"name": "sha256", "dtype": "string"},
        {"name": "width", "dtype": "int64"}, {"name": "height", "dtype": "int64"}]},
    {"name": "__key__", "dtype": "string"},
    {"name": "__url__", "dtype": "string"},
]


def card_text(name: str, shards: int, samples: int, seed: int) -> str:
    meta = {
        "pretty_name": name,
        "task_categories": ["image-to-text", "zero-shot-image-classification"],
        "size_categories": [_size_category(samples)],
        "configs": [{"config_name": "default", "default": True,
                     "data_files": [{"split": "train", "path": SHARD_GLOB}]}],
        "dataset_info": {"config_name": "default", "features": FEATURES_YAML},
    }
    body = f"""# {name}

Image–caption pairs curated by **tether** (concept matching, balancing, deduplication) and stored as
WebDataset shards: {samples:,} samples in {shards:,} shards (`{SHARD_GLOB}`, shuffled with seed {seed}).

Each sample: `KEY.jpg` (image), `KEY.txt` (caption), `KEY.json` (`uid`, `caption`, `concept_ids`, `source`,
`url`, `sha256` of the source image bytes, stored `width`/`height`). `sizes.json` gives the samples per shard;
`index.parquet` holds one row per sample (plus `key` and `shard`).

```python
from datasets import load_dataset
ds = load_dataset("path/to/this/folder", split="train")            # uses this card's configs + features
idx = load_dataset("parquet", data_files="path/to/this/folder/index.parquet", split="train")
```

Images keep the licences of their sources; the catalog of the build records where each came from.
"""
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + body


def _size_category(n: int) -> str:
    for lim, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                       (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M")):
        if n < lim:
            return label
    return "n>1B" if n > 1_000_000_000 else "100M<n<1B"


def write_dataset_card(out: Path, name: str, shards: int, samples: int, seed: int) -> Path:
    path = Path(out) / "README.md"
    atomic_write(path, card_text(name, shards, samples, seed))
    return path


def shard_files(folder: str | Path) -> list[str]:
    return sorted(str(p) for p in Path(folder).glob(SHARD_GLOB))


def load_shards(folder: str | Path, split: str = "train", streaming: bool = False, **kw):
    """``load_dataset("webdataset", ...)`` over a shards folder with the explicit features."""
    from datasets import load_dataset

    files = shard_files(folder)
    if not files:
        raise FileNotFoundError(f"{folder}: no {SHARD_GLOB} files")
    return load_dataset("webdataset", data_files={split: files}, features=features(), split=split,
                        streaming=streaming, **kw)


def load_index(folder: str | Path, split: str = "train", **kw):
    from datasets import load_dataset

    return load_dataset("parquet", data_files={split: str(Path(folder) / "index.parquet")}, split=split, **kw)
