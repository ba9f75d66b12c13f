"""The bundled corpus: real English prose that needs no download, plus synthetic passkey documents.

* Prose: the CPython stdlib module ``pydoc_data.topics`` (79 help topics, ~465 KB of the Python
  language reference). Each topic is split on blank lines and consecutive paragraphs are grouped
  into documents of roughly 1-4 KB. The text is whatever the running Python ships, so it (and the
  token counts) can change slightly between Python versions; it is fixed for a given interpreter.
* Passkey retrieval (Mohtashami & Jaggi, 2023): filler sentences with a five-digit key hidden at a
  random depth, ending in the question and its answer. A model can only predict the final key by
  attending back to the needle, so these documents exercise long-range attention. Lengths are
  log-uniform over ~50-4000 tokens, so some are long relative to ``seq_len``.

Everything here is a pure function of its arguments (seeded ``random.Random``, sorted keys).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pydoc_data.topics import topics

MIN_DOC_CHARS = 1024  # group paragraphs until a document has at least this many characters
MAX_DOC_CHARS = 4096  # ...unless the next paragraph would push it past this

FILLER_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
    "The river flows to the sea.",
    "Birds sing in the morning.",
    "The road is long and quiet.",
)
MIN_FILLER_SENTENCES = 10  # ~50 tokens with the bundled tokenizer
MAX_FILLER_SENTENCES = 800  # ~4000 tokens


def corpus_documents() -> list[str]:
    """The pydoc prose as ~1-4 KB documents, in a fixed order (sorted topic names)."""
    documents: list[str] = []
    for name in sorted(topics):
        paragraphs = [p.strip() for p in topics[name].split("\n\n") if p.strip()]
        current: list[str] = []
        size = 0
        for paragraph in paragraphs:
            if current and (size >= MIN_DOC_CHARS or size + len(paragraph) > MAX_DOC_CHARS):
                documents.append("\n\n".join(current))
                current, size = [], 0
            current.append(paragraph)
            size += len(paragraph) + 2
        if current:
            documents.append("\n\n".join(current))
    return documents


@dataclass(frozen=True)
class PasskeyDocument:
    """One passkey-retrieval document; ``text == prompt + answer``."""

    text: str
    key: str  # five digits, e.g. "48213"
    depth: float  # where the needle sits, as a fraction of the filler sentences (0 = start)
    prompt: str  # everything up to and including "What is the pass key? The pass key is"
    answer: str  # " 48213." -- what a model should generate after the prompt


def make_passkey_document(seed: int, num_filler_sentences: int | None = None) -> PasskeyDocument:
    """A passkey document, deterministic given ``seed`` (and the length, drawn if not given)."""
    rng = random.Random(seed)
    if num_filler_sentences is None:
        # log-uniform: as many short documents as long ones per factor of two in length
        log_n = rng.uniform(math.log(MIN_FILLER_SENTENCES), math.log(MAX_FILLER_SENTENCES))
        num_filler_sentences = round(math.exp(log_n))
    key = str(rng.randint(10000, 99999))
    filler = [rng.choice(FILLER_SENTENCES) for _ in range(num_filler_sentences)]
    insert_at = rng.randint(0, num_filler_sentences)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    sentences = filler[:insert_at] + [needle] + filler[insert_at:]
    prompt = " ".join(sentences) + "\n\nWhat is the pass key? The pass key is"
    answer = f" {key}."
    depth = insert_at / max(num_filler_sentences, 1)
    return PasskeyDocument(text=prompt + answer, key=key, depth=depth, prompt=prompt, answer=answer)


def num_passkey_documents(num_corpus_documents: int, passkey_fraction: float) -> int:
    """How many passkey documents make them ``passkey_fraction`` of all bundled documents."""
    if passkey_fraction >= 1.0:
        return num_corpus_documents  # all passkey: as many documents as the prose would give
    return round(passkey_fraction * num_corpus_documents / (1.0 - passkey_fraction))


def bundled_documents(passkey_fraction: float, seed: int) -> list[str]:
    """Prose and passkey documents, shuffled together so a ``max_documents`` prefix keeps the mix."""
    prose = corpus_documents()
    num_passkey = num_passkey_documents(len(prose), passkey_fraction)
    rng = random.Random(seed)
    passkey = [make_passkey_document(rng.getrandbits(63)).text for _ in range(num_passkey)]
    documents = passkey if passkey_fraction >= 1.0 else prose + passkey
    rng.shuffle(documents)
    return documents
