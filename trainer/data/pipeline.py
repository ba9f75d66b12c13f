"""``build_data``: config -> tokenizer + packed rows -> resumable loader, in one readable pass.

    texts     = load_texts(cfg)                      # bundled prose+passkey, or local files
    documents = [bos] + encode(text) + [eos]          # token lists (bos with data.add_bos)
    train/val = split documents (seeded)             # only when data.val_fraction > 0
    rows      = pack_documents(train, seq_len)       # [n, s] input_ids / labels / position_ids
    loader    = PackedLoader(rows, B, rank, world)   # micro-batch g -> rows, by index

Everything is recomputed at start-up (the bundled source takes about a second) and nothing is
cached on disk.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import cast

from longtrain.config_checks import ConfigError, Limits, check_value
from longtrain.trainer.data.config import DataConfig
from longtrain.trainer.data.loader import PackedLoader
from longtrain.trainer.data.packing import PackedRows, pack_documents
from longtrain.trainer.data.sources import load_texts
from longtrain.trainer.data.tokenizer import Tokenizer, load_tokenizer

_ENCODE_CHUNK = 1024  # texts per encode_batch call (bounds peak memory of the Rust encoder)


@dataclass(frozen=True)
class PackedData:
    """Tokenizer plus the packed train rows and, with ``data.val_fraction > 0``, val rows."""

    tokenizer: Tokenizer
    train: PackedRows
    val: PackedRows | None


def build_datasets(cfg: DataConfig, *, seq_len: int, seed: int) -> PackedData:
    """Load, tokenise, split and pack; identical on every rank for the same arguments."""
    check_value("train.seq_len", seq_len, int, Limits(min=1))
    tokenizer = load_tokenizer(cfg.tokenizer)
    texts = load_texts(cfg, seed=seed)
    if not texts:
        raise ConfigError(f"data.path={cfg.path!r} holds no non-empty {cfg.text_field!r} values")

    if cfg.add_bos and tokenizer.bos_id is None:
        raise ConfigError(
            f"data.add_bos=true but the tokenizer {tokenizer.name!r} defines no begin-of-text token; "
            "set data.add_bos=false or use a tokenizer with one"
        )
    bos = [cast(int, tokenizer.bos_id)] if cfg.add_bos else []  # checked just above
    eos = [tokenizer.eos_id] if cfg.add_eos else []
    documents: list[list[int]] = []
    for i in range(0, len(texts), _ENCODE_CHUNK):
        documents += [bos + ids + eos for ids in tokenizer.encode_batch(texts[i : i + _ENCODE_CHUNK])]

    order = list(range(len(documents)))
    if cfg.shuffle:
        random.Random(seed).shuffle(order)
    num_val = 0 if cfg.val_fraction == 0 else max(1, round(cfg.val_fraction * len(documents)))
    if num_val >= len(documents):
        raise ConfigError(
            f"data.val_fraction={cfg.val_fraction} leaves no training documents out of {len(documents)}"
        )
    train_docs = [documents[i] for i in order[: len(order) - num_val]]
    val_docs = [documents[i] for i in order[len(order) - num_val :]]

    pack_seed = seed if cfg.shuffle else None
    train = pack_documents(train_docs, seq_len, tokenizer.pad_id, seed=pack_seed)
    val = pack_documents(val_docs, seq_len, tokenizer.pad_id) if val_docs else None
    return PackedData(tokenizer=tokenizer, train=train, val=val)


def build_data(
    cfg: DataConfig, *, seq_len: int, seed: int, dp_rank: int = 0, dp_world: int = 1
) -> tuple[Tokenizer, PackedLoader]:
    """The tokenizer and this rank's training loader (see ``build_datasets`` for the val rows)."""
    data = build_datasets(cfg, seq_len=seq_len, seed=seed)
    return data.tokenizer, train_loader(data, cfg, seed=seed, dp_rank=dp_rank, dp_world=dp_world)


def train_loader(
    data: PackedData, cfg: DataConfig, *, seed: int, dp_rank: int = 0, dp_world: int = 1
) -> PackedLoader:
    """This rank's resumable loader over the packed training rows."""
    return PackedLoader(
        data.train,
        micro_batch_size=cfg.micro_batch_size,
        dp_rank=dp_rank,
        dp_world=dp_world,
        seed=seed,
        shuffle=cfg.shuffle,
    )
