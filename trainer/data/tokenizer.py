"""Tokenizers: the bundled byte-level BPE (vocab 4096) and a thin wrapper over foreign ones.

``load_tokenizer(spec)`` accepts ``bundled``, a ``tokenizer.json`` file, or a local Hugging Face
tokenizer directory, and returns a ``Tokenizer`` with one small interface whatever the backend.
Text is encoded without special tokens; the pipeline appends ``eos_id`` itself.

The bundled file is produced by ``train_bundled_tokenizer`` (run ``scripts/build_tokenizer.py``);
BPE training in ``tokenizers`` is deterministic, so the script reproduces the file byte for byte
on the same Python version (the corpus is the interpreter's ``pydoc_data``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from longtrain.config_checks import ConfigError

BUNDLED_TOKENIZER_PATH = Path(__file__).parent / "assets" / "tokenizer.json"
BUNDLED_VOCAB_SIZE = 4096
BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<|bos|>", "<|eos|>", "<|pad|>"

# Names that mark the special tokens in tokenizer.json files that lack a tokenizer_config.json.
_EOS_NAMES = (EOS_TOKEN, "<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
_BOS_NAMES = (BOS_TOKEN, "<|begin_of_text|>", "<s>", "<bos>")
_PAD_NAMES = (PAD_TOKEN, "<pad>", "<|padding|>")


class Tokenizer:
    """Encode/decode plus the special-token ids the pipeline needs.

    Wraps either a ``tokenizers.Tokenizer`` (``backend="tokenizers"``) or a ``transformers``
    tokenizer (``backend="transformers"``). ``pad_id`` falls back to ``eos_id`` (padding is masked
    out of the loss, so its id never matters); ``bos_id`` may be ``None``.
    """

    def __init__(
        self, backend: Any, *, name: str, vocab_size: int, eos_id: int, bos_id: int | None, pad_id: int | None
    ) -> None:
        self._backend = backend
        self._is_hf = not isinstance(backend, tokenizers.Tokenizer)
        self.name = name
        self.vocab_size = vocab_size
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.pad_id = eos_id if pad_id is None else pad_id

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if self._is_hf:
            return list(self._backend(list(texts), add_special_tokens=False)["input_ids"])
        # tokenizers parallelises the batch in Rust
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the tokenizer as files that ``transformers.AutoTokenizer.from_pretrained`` loads
        (a ``tokenizers`` backend is wrapped in a ``PreTrainedTokenizerFast`` with its special tokens)."""
        if self._is_hf:
            self._backend.save_pretrained(str(directory))
            return
        from transformers import PreTrainedTokenizerFast

        token = self._backend.id_to_token
        PreTrainedTokenizerFast(
            tokenizer_object=self._backend,
            eos_token=token(self.eos_id),
            bos_token=None if self.bos_id is None else token(self.bos_id),
            pad_token=token(self.pad_id),
        ).save_pretrained(str(directory))

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
            f"bos_id={self.bos_id}, pad_id={self.pad_id})"
        )


def load_tokenizer(spec: str) -> Tokenizer:
    """``bundled``, a path to a ``tokenizer.json``, or a local Hugging Face tokenizer directory."""
    if spec == "bundled":
        return _from_tokenizer_json(BUNDLED_TOKENIZER_PATH, name="bundled")
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"data.tokenizer: no such file or directory: {spec}")
    if path.is_file():
        return _from_tokenizer_json(path, name=spec)
    if (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        return _from_tokenizer_json(path / "tokenizer.json", name=spec)
    return _from_transformers_dir(path, name=spec)


def _from_tokenizer_json(path: Path, *, name: str) -> Tokenizer:
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ConfigError(f"data.tokenizer: cannot read {path} as a tokenizer.json: {e}") from e

    def find(names: tuple[str, ...]) -> int | None:
        ids = (backend.token_to_id(n) for n in names)
        return next((i for i in ids if i is not None), None)

    eos_id = find(_EOS_NAMES)
    if eos_id is None:
        raise ConfigError(
            f"data.tokenizer: {path} has no end-of-text token (looked for {', '.join(_EOS_NAMES)}); "
            "use a Hugging Face tokenizer directory whose tokenizer_config.json sets eos_token"
        )
    return Tokenizer(
        backend,
        name=name,
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
        eos_id=eos_id,
        bos_id=find(_BOS_NAMES),
        pad_id=find(_PAD_NAMES),
    )


def _from_transformers_dir(path: Path, *, name: str) -> Tokenizer:
    # Imported here: transformers takes ~5 s to import and only this path needs it.
    from transformers import AutoTokenizer

    try:
        backend = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"data.tokenizer: cannot load a tokenizer from {path}: {first_line}") from e
    if backend.eos_token_id is None:
        raise ConfigError(f"data.tokenizer: {path} defines no eos_token; set it in tokenizer_config.json")
    return Tokenizer(
        backend,
        name=name,
        vocab_size=len(backend),
        eos_id=backend.eos_token_id,
        bos_id=backend.bos_token_id,
        pad_id=backend.pad_token_id,
    )


def train_bundled_tokenizer(texts: Sequence[str]) -> tokenizers.Tokenizer:
    """Train the bundled byte-level BPE on ``texts`` (used by ``scripts/build_tokenizer.py``).

    Ids 0, 1, 2 are ``<|bos|>``, ``<|eos|>``, ``<|pad|>``; then the 256 byte symbols; then merges
    up to a total of ``BUNDLED_VOCAB_SIZE``. Byte-level means every string round-trips exactly.
    """
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BUNDLED_VOCAB_SIZE,
        special_tokens=[BOS_TOKEN, EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if tok.get_vocab_size(with_added_tokens=True) != BUNDLED_VOCAB_SIZE:
        raise RuntimeError(
            f"bundled tokenizer has vocab {tok.get_vocab_size(with_added_tokens=True)}, "
            f"expected {BUNDLED_VOCAB_SIZE}: the training text is too small"
        )
    return tok
