"""``DataConfig``: where the training text comes from and how it is tokenised and batched.

Every check lives in ``__post_init__`` and raises a one-line ``ValueError`` naming the key to
change, so the CLI can print it as is. Checks that need the file system (``data.path`` exists,
``data.text_field`` is a column) run when the data is loaded, in ``sources.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("bundled", "jsonl", "json", "parquet", "text")


@dataclass
class DataConfig:
    """Data pipeline settings (the ``data.*`` keys)."""

    source: str = "bundled"
    """``bundled`` (pydoc prose + synthetic passkey documents, no download), or a local
    ``jsonl`` / ``json`` / ``parquet`` / ``text`` dataset read with ``datasets.load_dataset``.
    With ``text`` every file is one document (long files are split into ``seq_len`` chunks)."""

    path: str | None = None
    """File, glob or directory of the local dataset; required unless ``source`` is bundled."""

    text_field: str = "text"
    """Column holding the document text (``text`` sources always have a ``text`` column)."""

    tokenizer: str = "bundled"
    """``bundled`` (byte-level BPE, vocab 4096, shipped in ``assets/tokenizer.json``), a path to
    a ``tokenizer.json`` file, or a local Hugging Face tokenizer directory."""

    micro_batch_size: int = 1
    """Packed rows of ``train.seq_len`` tokens per micro-batch (per data-parallel rank)."""

    passkey_fraction: float = 0.25
    """Fraction of bundled documents that are synthetic passkey-retrieval documents."""

    shuffle: bool = True
    """Shuffle documents before packing and packed rows every epoch (seeded)."""

    add_eos: bool = True
    """Append the tokenizer's end-of-text token to every document."""

    add_bos: bool = False
    """Prepend the tokenizer's begin-of-text token to every document (Llama-3 style fine-tuning
    data; the tokenizer must define one)."""

    val_fraction: float = 0.0
    """Fraction of documents held out for validation (0 = no validation split)."""

    max_documents: int | None = None
    """Use at most this many documents (quick runs); ``None`` = all."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"data.source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        if self.source == "bundled":
            if self.path is not None:
                raise ValueError(
                    f"data.path={self.path!r} is set but data.source='bundled' ignores it; "
                    "set data.source to jsonl, json, parquet or text"
                )
        elif not isinstance(self.path, str) or not self.path:
            raise ValueError(f"data.path is required when data.source={self.source!r}; got {self.path!r}")
        _check_nonempty_str("data.text_field", self.text_field)
        _check_nonempty_str("data.tokenizer", self.tokenizer)
        _check_positive_int("data.micro_batch_size", self.micro_batch_size)
        _check_fraction("data.passkey_fraction", self.passkey_fraction, upper_inclusive=True)
        _check_bool("data.shuffle", self.shuffle)
        _check_bool("data.add_eos", self.add_eos)
        _check_bool("data.add_bos", self.add_bos)
        _check_fraction("data.val_fraction", self.val_fraction, upper_inclusive=False)
        if self.max_documents is not None:
            _check_positive_int("data.max_documents", self.max_documents)


def _check_nonempty_str(key: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{key} must be a non-empty string, got {value!r}")


def _check_positive_int(key: str, value: object) -> None:
    # bool is an int subclass; `micro_batch_size: true` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{key} must be a positive int, got {value!r}")


def _check_bool(key: str, value: object) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")


def _check_fraction(key: str, value: object, *, upper_inclusive: bool) -> None:
    ok = False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ok = 0.0 <= value <= 1.0 if upper_inclusive else 0.0 <= value < 1.0
    if not ok:
        interval = "[0, 1]" if upper_inclusive else "[0, 1)"
        raise ValueError(f"{key} must be in {interval}, got {value!r}")
