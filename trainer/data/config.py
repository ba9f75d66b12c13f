"""``DataConfig``: where the training text comes from and how it is tokenised and batched.

Every check lives in ``__post_init__`` and raises a one-line ``ConfigError`` naming the key to
change, so the CLI can print it as is. Checks that need the file system (``data.path`` exists,
``data.text_field`` is a column) run when the data is loaded, in ``sources.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.config_checks import ConfigError, check_fields, option

SOURCES = ("bundled", "jsonl", "json", "parquet", "text")


@dataclass
class DataConfig:
    """Data pipeline settings (the ``data.*`` keys)."""

    source: str = option("bundled", choices=SOURCES)
    """``bundled`` (pydoc prose + synthetic passkey documents, no download), or a local
    ``jsonl`` / ``json`` / ``parquet`` / ``text`` dataset read with ``datasets.load_dataset``.
    With ``text`` every file is one document (long files are split into ``seq_len`` chunks)."""

    path: str | None = None
    """File, glob or directory of the local dataset; required unless ``source`` is bundled."""

    text_field: str = option("text", nonempty=True)
    """Column holding the document text (``text`` sources always have a ``text`` column)."""

    tokenizer: str = option("bundled", nonempty=True)
    """``bundled`` (byte-level BPE, vocab 4096, shipped in ``assets/tokenizer.json``), a path to
    a ``tokenizer.json`` file, or a local Hugging Face tokenizer directory."""

    micro_batch_size: int = option(1, min=1)
    """Packed rows of ``train.seq_len`` tokens per micro-batch (per data-parallel rank)."""

    passkey_fraction: float = option(0.25, min=0.0, max=1.0)
    """Fraction of bundled documents that are synthetic passkey-retrieval documents."""

    shuffle: bool = True
    """Shuffle documents before packing and packed rows every epoch (seeded)."""

    add_eos: bool = True
    """Append the tokenizer's end-of-text token to every document."""

    add_bos: bool = False
    """Prepend the tokenizer's begin-of-text token to every document (Llama-3 style fine-tuning
    data; the tokenizer must define one)."""

    val_fraction: float = option(0.0, min=0.0, max=1.0, max_open=True)
    """Fraction of documents held out for validation (0 = no validation split)."""

    max_documents: int | None = option(None, min=1)
    """Use at most this many documents (quick runs); ``None`` = all."""

    def __post_init__(self) -> None:
        check_fields(self, "data")
        if self.source == "bundled":
            if self.path is not None:
                raise ConfigError(
                    f"data.path={self.path!r} is set but data.source='bundled' ignores it; "
                    "set data.source to jsonl, json, parquet or text"
                )
        elif not self.path:
            raise ConfigError(f"data.path is required when data.source={self.source!r}; got {self.path!r}")
