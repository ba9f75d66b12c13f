"""Read document texts: the bundled corpus, or local jsonl/json/parquet/text via ``datasets``.

Local files go through ``datasets.load_dataset(<builder>, data_files=..., split="train")``, which
makes no network call for local files (works with ``HF_DATASETS_OFFLINE=1``). The Arrow cache is
written to a temporary directory that is deleted afterwards, so nothing is left on disk.
"""

from __future__ import annotations

import glob
import os
import tempfile
from pathlib import Path

import datasets

from longtrain.config_checks import ConfigError
from longtrain.trainer.data.bundled import bundled_documents
from longtrain.trainer.data.config import DataConfig

# data.source -> (datasets builder, file suffixes picked up when data.path is a directory)
_BUILDERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "jsonl": ("json", (".jsonl", ".jsonl.gz", ".jsonl.zst")),
    "json": ("json", (".json", ".json.gz", ".jsonl", ".jsonl.gz")),
    "parquet": ("parquet", (".parquet",)),
    "text": ("text", (".txt", ".txt.gz", ".md")),
}


def load_texts(cfg: DataConfig, *, seed: int) -> list[str]:
    """Document texts for ``cfg`` in a deterministic order, capped at ``cfg.max_documents``."""
    if cfg.source == "bundled":
        texts = bundled_documents(cfg.passkey_fraction, seed)
        return texts[: cfg.max_documents]
    return _load_local(cfg)


def resolve_data_files(source: str, path: str) -> list[str]:
    """``data.path`` as a sorted list of files: a file, a glob, or a directory (by suffix)."""
    suffixes = _BUILDERS[source][1]
    expanded = os.path.expanduser(path)
    if glob.has_magic(expanded):
        files = sorted(f for f in glob.glob(expanded, recursive=True) if os.path.isfile(f))
        if not files:
            raise ConfigError(f"data.path: no files match {path}")
        return files
    p = Path(expanded)
    if p.is_file():
        return [str(p)]
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.name.endswith(suffixes))
        if not files:
            raise ConfigError(
                f"data.path: directory {path} has no {' / '.join(suffixes)} files for data.source={source}"
            )
        return files
    raise ConfigError(f"data.path: no such file or directory: {path}")


def _load_local(cfg: DataConfig) -> list[str]:
    assert cfg.path is not None  # DataConfig guarantees it for non-bundled sources
    files = resolve_data_files(cfg.source, cfg.path)
    builder = _BUILDERS[cfg.source][0]
    # text: one document per file (the builder's default is one row per line, which would cut
    # hard-wrapped prose into one-line documents).
    extra = {"sample_by": "document"} if builder == "text" else {}
    with tempfile.TemporaryDirectory(prefix="longtrain-datasets-") as cache_dir:
        try:
            ds = datasets.load_dataset(
                builder, data_files=files, split="train", cache_dir=cache_dir, keep_in_memory=True, **extra
            )
        except Exception as e:  # parse errors arrive as multi-line pyarrow/datasets errors
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"data.path: cannot read {cfg.path} as {cfg.source}: {first_line}") from e
    if cfg.text_field not in ds.column_names:
        raise ConfigError(
            f"data.text_field={cfg.text_field!r} is not a column of {cfg.path}; "
            f"available columns: {', '.join(ds.column_names)}"
        )
    if cfg.max_documents is not None:
        ds = ds.select(range(min(cfg.max_documents, len(ds))))
    texts = [t for t in ds[cfg.text_field] if t]  # drop None / empty rows
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise ConfigError(f"data.text_field={cfg.text_field!r} must hold strings, found {type(bad).__name__}")
    return texts
