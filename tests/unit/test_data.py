"""Unit tests for longtrain.trainer.data: config, tokenizer, bundled corpus, packing, sources, loader."""

from __future__ import annotations

import json
import random
import sys
from collections import Counter

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from longtrain.config_checks import ConfigError
from longtrain.trainer.data import (
    IGNORE_INDEX,
    DataConfig,
    MicroBatch,
    PackedLoader,
    build_data,
    build_datasets,
    eval_batches,
    load_tokenizer,
    pack_documents,
)
from longtrain.trainer.data.bundled import (
    bundled_documents,
    corpus_documents,
    make_passkey_document,
    num_passkey_documents,
)
from longtrain.trainer.data.tokenizer import BUNDLED_TOKENIZER_PATH, train_bundled_tokenizer

ENGLISH = "The quick brown fox jumps over the lazy dog. Naïve café, 48213 — déjà vu!\n\n  Indented line."


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)  # read at import time


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"micro_batch_size": 0}, "data.micro_batch_size must be a positive int, got 0"),
        ({"micro_batch_size": True}, "data.micro_batch_size must be int, got True"),
        ({"source": "csv"}, "data.source must be one of bundled, jsonl, json, parquet, text"),
        ({"source": "jsonl"}, "data.path is required when data.source='jsonl'"),
        ({"path": "x.jsonl"}, "data.path='x.jsonl' is set but data.source='bundled' ignores it"),
        ({"passkey_fraction": 1.5}, "data.passkey_fraction must be in [0, 1], got 1.5"),
        ({"val_fraction": 1.0}, "data.val_fraction must be in [0, 1), got 1.0"),
        ({"max_documents": 0}, "data.max_documents must be a positive int, got 0"),
        ({"text_field": ""}, "data.text_field must be a non-empty string"),
        ({"shuffle": "yes"}, "data.shuffle must be true or false"),
    ],
)
def test_config_errors_name_the_key(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        DataConfig(**kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_config_defaults_are_valid() -> None:
    cfg = DataConfig()
    assert (cfg.source, cfg.tokenizer, cfg.micro_batch_size) == ("bundled", "bundled", 1)
    DataConfig(source="parquet", path="data/*.parquet", passkey_fraction=1, max_documents=3)


# --- tokenizer ----------------------------------------------------------------------------------


def test_bundled_tokenizer_round_trip_and_specials() -> None:
    tok = load_tokenizer("bundled")
    assert tok.vocab_size == 4096
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    ids = tok.encode(ENGLISH)
    assert tok.decode(ids) == ENGLISH
    assert all(0 <= i < tok.vocab_size for i in ids)
    prose = "The assignment statement evaluates the expression list and assigns the result to each target."
    assert len(tok.encode(prose)) < len(prose) / 4  # real merges, not one token per byte
    texts = [ENGLISH, "", "def f(x):\n    return x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode(tok.encode("hi") + [tok.eos_id]) == "hi<|eos|>"


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="asset built from Python 3.11's pydoc_data")
def test_bundled_tokenizer_asset_is_reproducible() -> None:
    rebuilt = train_bundled_tokenizer(corpus_documents()).to_str(pretty=True) + "\n"
    assert rebuilt == BUNDLED_TOKENIZER_PATH.read_text(encoding="utf-8")


def test_tokenizer_from_file_and_hf_directory(tmp_path) -> None:
    from transformers import PreTrainedTokenizerFast

    bundled = load_tokenizer("bundled")
    from_file = load_tokenizer(str(BUNDLED_TOKENIZER_PATH))
    assert from_file.encode(ENGLISH) == bundled.encode(ENGLISH)

    hf = PreTrainedTokenizerFast(tokenizer_file=str(BUNDLED_TOKENIZER_PATH), eos_token="<|eos|>")
    hf.save_pretrained(tmp_path / "hf")
    from_dir = load_tokenizer(str(tmp_path / "hf"))
    assert from_dir.encode_batch([ENGLISH]) == [bundled.encode(ENGLISH)]
    assert from_dir.decode(bundled.encode(ENGLISH)) == ENGLISH
    assert (from_dir.eos_id, from_dir.pad_id, from_dir.vocab_size) == (1, 1, 4096)  # pad falls back to eos


def test_missing_tokenizer_names_the_key(tmp_path) -> None:
    with pytest.raises(ConfigError, match="data.tokenizer: no such file or directory"):
        load_tokenizer(str(tmp_path / "nope.json"))


# --- bundled corpus -----------------------------------------------------------------------------


def test_passkey_document_is_deterministic_and_holds_the_key() -> None:
    doc = make_passkey_document(1234)
    assert doc == make_passkey_document(1234)
    assert doc != make_passkey_document(1235)
    needle = f"The pass key is {doc.key}. Remember it. {doc.key} is the pass key."
    assert doc.text.count(needle) == 1
    assert doc.text.endswith(f"What is the pass key? The pass key is {doc.key}.")
    assert doc.text == doc.prompt + doc.answer and doc.key not in doc.prompt.split("\n\n")[-1]
    assert len(doc.key) == 5 and 0.0 <= doc.depth <= 1.0
    short, long = make_passkey_document(7, 10), make_passkey_document(7, 500)
    assert len(long.text) > 20 * len(short.text)


def test_bundled_documents_mix_and_determinism() -> None:
    prose = corpus_documents()
    assert len(prose) > 300 and all(prose)
    docs = bundled_documents(0.25, seed=0)
    assert docs == bundled_documents(0.25, seed=0)
    assert docs != bundled_documents(0.25, seed=1)
    num_passkey = sum("What is the pass key?" in d for d in docs)
    assert num_passkey == num_passkey_documents(len(prose), 0.25)
    assert num_passkey / len(docs) == pytest.approx(0.25, abs=0.01)
    assert all("What is the pass key?" not in d for d in bundled_documents(0.0, seed=0))


# --- packing ------------------------------------------------------------------------------------


def _segments(position_ids_row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of every document in a row, from position_ids == 0."""
    starts = (position_ids_row == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [len(position_ids_row)], strict=True))


def _random_documents(n: int, seq_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    # tokens >= 10 so they never equal the pad id; lengths up to 3 rows
    return [[rng.randrange(10, 1000) for _ in range(rng.randint(1, 3 * seq_len))] for _ in range(n)]


def test_packing_row_layout_and_every_token_once() -> None:
    seq_len, pad_id = 64, 2
    docs = _random_documents(60, seq_len, seed=0)
    rows = pack_documents(docs, seq_len, pad_id, seed=0)
    assert rows.input_ids.shape == rows.labels.shape == rows.position_ids.shape == (len(rows), seq_len)
    assert rows.input_ids.dtype == torch.int32

    expected_chunks = Counter(tuple(d[i : i + seq_len]) for d in docs for i in range(0, len(d), seq_len))
    seen_chunks: Counter = Counter()
    num_pad = 0
    for r in range(len(rows)):
        ids, labels, pos = rows.input_ids[r], rows.labels[r], rows.position_ids[r]
        segments = _segments(pos)
        for k, (a, b) in enumerate(segments):
            assert torch.equal(pos[a:b], torch.arange(b - a, dtype=torch.int32))  # restart, then +1
            assert labels[a] == IGNORE_INDEX  # no target at a document start
            is_padding = k == len(segments) - 1 and bool((ids[a:b] == pad_id).all())
            if is_padding:
                assert (labels[a:b] == IGNORE_INDEX).all()
                num_pad += b - a
            else:
                assert torch.equal(labels[a + 1 : b], ids[a + 1 : b])
                seen_chunks[tuple(ids[a:b].tolist())] += 1
    assert seen_chunks == expected_chunks
    assert num_pad == rows.num_pad_tokens
    assert rows.num_tokens == sum(len(d) for d in docs)
    # best-fit decreasing uses at most 11/9 OPT + 1 rows; OPT >= ceil(tokens / seq_len)
    assert len(rows) <= 11 * -(-rows.num_tokens // seq_len) // 9 + 1


def test_packing_is_deterministic_and_best_fit() -> None:
    docs = _random_documents(40, 32, seed=1)
    a, b = pack_documents(docs, 32, 0, seed=5), pack_documents(docs, 32, 0, seed=5)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.position_ids, b.position_ids)
    assert torch.equal(a.labels, b.labels)
    # lengths 6,5,4,3,2 into rows of 10: 6+4 and 5+3+2, no padding
    small = pack_documents([[7] * n for n in (2, 6, 3, 5, 4)], 10, 0)
    assert len(small) == 2 and small.num_pad_tokens == 0
    assert sorted(_segments(small.position_ids[0])) == [(0, 6), (6, 10)]


def test_hf_shift_never_crosses_a_document_boundary() -> None:
    rows = pack_documents([[11, 12, 13], [21, 22], [31]], 8, 0)
    ids, labels = rows.input_ids[0].tolist(), rows.labels[0].tolist()
    assert ids == [11, 12, 13, 21, 22, 31, 0, 0]
    assert labels == [-100, 12, 13, -100, 22, -100, -100, -100]
    assert rows.position_ids[0].tolist() == [0, 1, 2, 0, 1, 0, 0, 1]


# --- local sources through datasets -------------------------------------------------------------


def _write_jsonl(path, texts: list[str], field: str = "text") -> None:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))


def _decoded_documents(tokenizer, rows) -> list[str]:
    out = []
    for r in range(len(rows)):
        for a, b in _segments(rows.position_ids[r]):
            ids = rows.input_ids[r, a:b].tolist()
            if ids[-1] == tokenizer.eos_id:
                out.append(tokenizer.decode(ids[:-1]))
    return out


TEXTS = [f"Document number {i}. " + "All work and no play. " * (i + 1) for i in range(12)]


@pytest.mark.parametrize("source", ["jsonl", "json", "parquet"])
def test_local_tabular_sources_load_offline(tmp_path, offline, source: str) -> None:
    if source == "parquet":
        path = tmp_path / "train.parquet"
        pq.write_table(pa.table({"body": TEXTS, "id": list(range(len(TEXTS)))}), path)
    else:
        path = tmp_path / f"train.{source}"
        _write_jsonl(path, TEXTS, field="body")
    cfg = DataConfig(source=source, path=str(path), text_field="body", shuffle=False)
    data = build_datasets(cfg, seq_len=128, seed=0)
    assert sorted(_decoded_documents(data.tokenizer, data.train)) == sorted(TEXTS)


def test_text_directory_and_glob_one_document_per_file(tmp_path, offline) -> None:
    for i, t in enumerate(TEXTS[:4]):
        (tmp_path / f"part{i}.txt").write_text(t.replace(". ", ".\n"))
    for path in (str(tmp_path), str(tmp_path / "part*.txt")):
        data = build_datasets(DataConfig(source="text", path=path), seq_len=256, seed=0)
        assert data.train.num_documents == 4


def test_missing_path_and_missing_field_errors(tmp_path, offline) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ConfigError, match=f"data.path: no such file or directory: {missing}"):
        build_data(DataConfig(source="jsonl", path=str(missing)), seq_len=64, seed=0)
    with pytest.raises(ConfigError, match="data.path: no files match"):
        build_data(DataConfig(source="jsonl", path=str(tmp_path / "*.jsonl")), seq_len=64, seed=0)
    _write_jsonl(tmp_path / "a.jsonl", TEXTS, field="content")
    with pytest.raises(ConfigError, match=r"data.text_field='text' is not a column .*content, id"):
        build_data(DataConfig(source="jsonl", path=str(tmp_path / "a.jsonl")), seq_len=64, seed=0)


def test_add_bos_starts_every_document_with_the_bos_token(tmp_path, offline) -> None:
    _write_jsonl(tmp_path / "a.jsonl", TEXTS[:4])
    data = build_datasets(
        DataConfig(source="jsonl", path=str(tmp_path / "a.jsonl"), add_bos=True), seq_len=256, seed=0
    )
    tok, rows = data.tokenizer, data.train
    documents = [
        rows.input_ids[r, a:b].tolist() for r in range(len(rows)) for a, b in _segments(rows.position_ids[r])
    ]
    documents = [ids for ids in documents if ids[0] != tok.pad_id]  # padding tails
    assert tok.bos_id is not None and len(documents) == 4
    assert all(ids[0] == tok.bos_id and ids[-1] == tok.eos_id for ids in documents)
    assert sorted(tok.decode(ids[1:-1]) for ids in documents) == sorted(TEXTS[:4])


def test_add_bos_without_a_bos_token_names_the_key(tmp_path, offline, monkeypatch) -> None:
    _write_jsonl(tmp_path / "a.jsonl", TEXTS[:2])
    real = load_tokenizer

    def no_bos(name):
        tok = real(name)
        tok.bos_id = None
        return tok

    monkeypatch.setattr("longtrain.trainer.data.pipeline.load_tokenizer", no_bos)
    with pytest.raises(ValueError, match=r"data\.add_bos=true"):
        build_datasets(
            DataConfig(source="jsonl", path=str(tmp_path / "a.jsonl"), add_bos=True), seq_len=64, seed=0
        )


def test_max_documents_and_val_split(tmp_path, offline) -> None:
    _write_jsonl(tmp_path / "a.jsonl", TEXTS)
    cfg = DataConfig(source="jsonl", path=str(tmp_path / "a.jsonl"), max_documents=10, val_fraction=0.2)
    data = build_datasets(cfg, seq_len=512, seed=0)
    assert data.val is not None
    assert (data.train.num_documents, data.val.num_documents) == (8, 2)
    train, val = _decoded_documents(data.tokenizer, data.train), _decoded_documents(data.tokenizer, data.val)
    assert sorted(train + val) == sorted(TEXTS[:10])


# --- loader -------------------------------------------------------------------------------------


def _rows(num_rows: int, seq_len: int = 16):
    """num_rows full rows; row r is made of token r + 10 (no padding), so rows are identifiable."""
    return pack_documents([[r + 10] * seq_len for r in range(num_rows)], seq_len, 0)


def _row_ids(mb: MicroBatch) -> list[int]:
    return (mb.input_ids[:, 0] - 10).tolist()


def test_two_ranks_see_disjoint_rows_covering_the_epoch() -> None:
    rows = _rows(24)
    loaders = [PackedLoader(rows, 3, dp_rank=r, dp_world=2, seed=3) for r in range(2)]
    assert loaders[0].steps_per_epoch == 4
    for epoch in range(2):
        seen = [[i for _ in range(4) for i in _row_ids(next(ld))] for ld in loaders]
        assert not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == list(range(24))
        assert loaders[0].epoch == epoch + 1
    # a new epoch is a new permutation
    assert not torch.equal(loaders[0].row_indices(0), loaders[0].row_indices(4))


def test_eval_batches_split_the_rows_once_across_ranks() -> None:
    rows = _rows(7)
    per_rank = [[_row_ids(mb) for mb in eval_batches(rows, 2, dp_rank=r, dp_world=2)] for r in range(2)]
    assert per_rank == [[[0, 1], [4, 5]], [[2, 3], [6]]]  # in order; the last micro-batch is short
    assert [len(list(eval_batches(rows, 2, r, 2, max_batches=1))) for r in range(2)] == [1, 1]
    assert [_row_ids(mb) for mb in eval_batches(rows, 4, dp_rank=1, dp_world=2)] == [[4, 5, 6]]
    assert list(eval_batches(_rows(3), 4, dp_rank=1, dp_world=2)) == []  # a rank may get nothing


def test_resume_gives_identical_next_batches() -> None:
    rows = _rows(10)
    loader = PackedLoader(rows, 2, seed=7)
    for _ in range(7):  # past the first epoch (5 steps)
        next(loader)
    state = loader.state_dict()
    assert state["consumed_microbatches"] == 7
    expected = [next(loader) for _ in range(6)]

    resumed = PackedLoader(rows, 2, seed=7)
    resumed.load_state_dict(state)
    for want in expected:
        got = next(resumed)
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)
        assert torch.equal(got.position_ids, want.position_ids)

    with pytest.raises(ValueError, match="dp_world: saved 1, now 2"):
        PackedLoader(rows, 2, dp_world=2, seed=7).load_state_dict(state)


def test_no_shuffle_is_in_order_and_too_few_rows_is_an_error() -> None:
    loader = PackedLoader(_rows(6), 2, shuffle=False)
    assert [_row_ids(next(loader)) for _ in range(4)] == [[0, 1], [2, 3], [4, 5], [0, 1]]
    with pytest.raises(
        ValueError, match=r"only 3 packed rows of train.seq_len=16.*data.micro_batch_size=2 x 2"
    ):
        PackedLoader(_rows(3), 2, dp_world=2)


def test_microbatch_num_loss_tokens() -> None:
    rows = pack_documents([[11, 12, 13], [21, 22], [31]], 8, 0)  # targets: 12, 13, 22
    mb = PackedLoader(rows, 1, shuffle=False).batch(0)
    assert mb.num_loss_tokens == 3 == int((mb.labels[:, 1:] != IGNORE_INDEX).sum())
    assert mb.input_ids.dtype == mb.labels.dtype == mb.position_ids.dtype == torch.int64
    moved = mb.to("cpu")
    assert moved.num_loss_tokens == 3 and torch.equal(moved.labels, mb.labels)
    explicit = MicroBatch(mb.input_ids, mb.labels, mb.position_ids)
    assert explicit.num_loss_tokens == 3


def test_microbatch_doc_spans_are_computed_once_on_the_host() -> None:
    rows = pack_documents([[11, 12, 13], [21, 22], [31]], 8, 0)  # + a padding run of 2
    mb = PackedLoader(rows, 1, shuffle=False).batch(0)
    assert mb.doc_spans is not None and mb.doc_spans.cu_seqlens == (0, 3, 5, 6, 8)
    assert mb.to("cpu").doc_spans is mb.doc_spans  # carried to the device copy, not recomputed


def test_build_data_bundled_end_to_end() -> None:
    cfg = DataConfig(micro_batch_size=2, max_documents=120)
    tok, loader = build_data(cfg, seq_len=256, seed=0, dp_rank=1, dp_world=2)
    assert tok.vocab_size == 4096
    mb = next(loader)
    assert mb.input_ids.shape == (2, 256)
    assert mb.num_loss_tokens > 0
    assert int(mb.input_ids.max()) < tok.vocab_size
    _, again = build_data(cfg, seq_len=256, seed=0, dp_rank=1, dp_world=2)
    assert torch.equal(next(again).input_ids, mb.input_ids)


def test_eval_batches_equal_counts_pad_with_fillers_that_hold_no_targets() -> None:
    """A sharded forward is a collective: with ``equal_counts`` every rank runs as many forwards,
    the ranks past the end on fillers with every label ignored (zero loss tokens)."""
    rows = _rows(5)  # micro-batches of 1 row over 3 ranks: 2, 2 and 1 of them
    per_rank = [list(eval_batches(rows, 1, dp_rank=r, dp_world=3, equal_counts=True)) for r in range(3)]
    assert [len(b) for b in per_rank] == [2, 2, 2]  # rows 0,3 | 1,4 | 2 + a filler
    assert [_row_ids(mb) for mb in per_rank[0]] == [[0], [3]]
    real, filler = per_rank[2]
    assert _row_ids(real) == [2] and real.num_loss_tokens > 0
    assert filler.num_loss_tokens == 0 and bool((filler.labels == -100).all())
    counts = [len(list(eval_batches(_rows(3), 4, r, 2, equal_counts=True))) for r in range(2)]
    assert counts == [1, 1]  # rank 1 had none
    assert [len(list(eval_batches(rows, 1, r, 3, max_batches=1, equal_counts=True))) for r in range(3)] == [
        1
    ] * 3
    # without it the counts differ (the case that left a sharded rank waiting)
    assert [len(list(eval_batches(rows, 1, r, 3))) for r in range(3)] == [2, 2, 1]
