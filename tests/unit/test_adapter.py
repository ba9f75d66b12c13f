"""The adapter (pre-attention | attention core | post-attention) against the plain HF model.

The oracle is always the unmodified HF model run the ordinary way; its loss is built here from
its logits (HF's own loss upcasts logits to float32, which would hide float64 exactness).
Relative error = max |ours - oracle| / max |oracle| over the whole tensor.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from longtrain.trainer.model.adapter import IGNORE_INDEX, CausalLM, adapt
from longtrain.trainer.model.attention import (
    CpuFlashAttention,
    DocSpans,
    ReferenceAttention,
    SdpaAttention,
    attention,
    build_attention_backend,
)

FAMILIES = ("llama", "qwen2", "mistral")
BACKENDS = ("reference", "cpu_flash", "sdpa")
# Per dtype: tolerance on the loss/logits and on every parameter gradient (relative).
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def rel_err(ours: torch.Tensor, oracle: torch.Tensor) -> float:
    assert ours.shape == oracle.shape, (ours.shape, oracle.shape)
    scale = oracle.abs().max().item()
    return (ours - oracle).abs().max().item() / (scale if scale > 0 else 1.0)


def hf_loss(hf_model, ids_bs: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy from the HF model's own logits, in the model dtype."""
    logits = hf_model(input_ids=ids_bs).logits
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), ids_bs[:, 1:].reshape(-1))


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def random_ids(vocab: int, b: int, s: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


# --- adapter == HF ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_matches_hf_loss_logits_and_every_gradient(make_tiny_model, family, backend, dtype):
    hf = make_tiny_model(family, dtype=dtype)
    model = adapt(hf, backend)
    ids = random_ids(hf.config.vocab_size, b=2, s=37)  # odd length, two rows
    tol = TOL[dtype]

    oracle_loss = hf_loss(hf, ids)
    oracle_loss.backward()
    oracle_grads = grads_of(hf)

    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = grads_of(model)

    assert out.loss.dtype == dtype
    assert out.num_tokens == 2 * 36
    assert rel_err(out.loss.detach(), oracle_loss.detach()) < tol
    assert rel_err(out.loss_sum.detach(), oracle_loss.detach() * 72) < tol
    assert set(grads) == set(oracle_grads) and len(grads) == len(list(hf.parameters()))
    errors = {name: rel_err(grads[name], oracle_grads[name]) for name in oracle_grads}
    worst = max(errors, key=errors.get)
    assert errors[worst] < tol, f"{worst}: relative gradient error {errors[worst]:.2e}"

    with torch.no_grad():
        logits = model(input_ids=ids).logits
        assert rel_err(logits, hf(input_ids=ids).logits) < tol


def test_qwen2_biases_are_used(make_tiny_model):
    """Guard on the oracle: the q/k/v biases the family adds really change the output."""
    hf = make_tiny_model("qwen2")
    ids = random_ids(hf.config.vocab_size, 1, 17)
    model = adapt(hf, "reference")
    with torch.no_grad():
        before = model(input_ids=ids).logits
        hf.model.layers[0].self_attn.k_proj.bias.add_(0.5)
        after = model(input_ids=ids).logits
    assert hf.model.layers[0].self_attn.q_proj.bias is not None
    assert rel_err(after, before) > 1e-3


def test_tied_embeddings_gradient_matches_hf(make_tiny_model):
    hf = make_tiny_model("llama", tie_embeddings=True)
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    ids = random_ids(hf.config.vocab_size, 1, 29)
    hf_loss(hf, ids).backward()
    oracle = grads_of(hf)
    adapt(hf, "cpu_flash")(input_ids=ids, labels=ids).loss.backward()
    grads = grads_of(hf)
    for name in oracle:
        assert rel_err(grads[name], oracle[name]) < 1e-10, name


def test_labels_with_ignore_index_match_hf_masked_loss(make_tiny_model):
    hf = make_tiny_model("llama")
    ids = random_ids(hf.config.vocab_size, 2, 21)
    labels = ids.clone()
    labels[0, 5:9] = IGNORE_INDEX
    labels[1, -3:] = IGNORE_INDEX
    logits = hf(input_ids=ids).logits
    oracle = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    out = adapt(hf, "cpu_flash")(input_ids=ids, labels=labels)
    assert out.num_tokens == int((labels[:, 1:] != IGNORE_INDEX).sum()) == 2 * 20 - 4 - 3
    assert rel_err(out.loss.detach(), oracle.detach()) < 1e-10
    # loss_normalizer: the trainer divides by a global token count instead of this batch's
    out_n = adapt(hf, "cpu_flash")(input_ids=ids, labels=labels, loss_normalizer=100)
    assert abs(out_n.loss.item() - out.loss_sum.item() / 100) < 1e-12


# --- packed documents ---------------------------------------------------------------------------

DOC_LENGTHS = (13, 7, 17)  # one packed row of 37 tokens: A | B | C


def packed_row(vocab: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    docs = [random_ids(vocab, 1, n, seed=10 + i) for i, n in enumerate(DOC_LENGTHS)]
    ids = torch.cat(docs, dim=1)  # [1, 37]
    position_ids = torch.cat([torch.arange(n) for n in DOC_LENGTHS])[None]  # restarts at 0 per doc
    return ids, position_ids, docs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_packed_documents_are_isolated(make_tiny_model, family, backend):
    hf = make_tiny_model(family)
    model = adapt(hf, backend)
    ids, position_ids, docs = packed_row(hf.config.vocab_size)
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=position_ids).logits[0]  # [37, V]
        start = 0
        for doc in docs:
            alone_hf = hf(input_ids=doc).logits[0]
            alone = model(input_ids=doc).logits[0]
            end = start + doc.shape[1]
            assert rel_err(packed[start:end], alone_hf) < 1e-10
            assert rel_err(alone, alone_hf) < 1e-10
            start = end
        # guard: without the position reset the same row attends across documents
        unpacked = model(input_ids=ids).logits[0]
        assert rel_err(unpacked[DOC_LENGTHS[0] :], packed[DOC_LENGTHS[0] :]) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_loss_is_token_weighted_loss_of_separate_documents(make_tiny_model, family):
    hf = make_tiny_model(family)
    model = adapt(hf, "cpu_flash")
    ids, position_ids, docs = packed_row(hf.config.vocab_size)
    labels = ids.clone()
    starts = [0, DOC_LENGTHS[0], DOC_LENGTHS[0] + DOC_LENGTHS[1]]
    labels[0, starts] = IGNORE_INDEX  # no document predicts the next document's first token

    out = model(input_ids=ids, labels=labels, position_ids=position_ids)
    out.loss.backward()
    grads = grads_of(model)

    sums, count = [], 0
    for doc in docs:
        sums.append(hf_loss(hf, doc) * (doc.shape[1] - 1))
        count += doc.shape[1] - 1
    oracle = torch.stack(sums).sum() / count
    oracle.backward()
    oracle_grads = grads_of(hf)

    assert out.num_tokens == count == sum(DOC_LENGTHS) - 3
    assert rel_err(out.loss.detach(), oracle.detach()) < 1e-10
    for name in oracle_grads:
        assert rel_err(grads[name], oracle_grads[name]) < 1e-10, name


def test_forward_uses_the_given_doc_spans_without_reading_position_ids(make_tiny_model, monkeypatch):
    """The trainer hands the forward the spans the data pipeline computed on the host: the forward
    then never derives them from position_ids (a device sync on GPU); the result is the same."""
    hf = make_tiny_model("llama")
    model = adapt(hf, "reference")
    ids, position_ids, _ = packed_row(hf.config.vocab_size)
    spans = DocSpans.from_position_ids(position_ids)
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=position_ids).logits

        def no_sync(cls, position_ids):
            raise AssertionError("the forward read the document spans back from position_ids")

        monkeypatch.setattr(DocSpans, "from_position_ids", classmethod(no_sync))
        assert torch.equal(model(input_ids=ids, position_ids=position_ids, doc_spans=spans).logits, ref)
        model(input_ids=ids)  # no position_ids: one document per row, nothing to read either
        with pytest.raises(ValueError, match="doc_spans cover 5 tokens"):
            model(input_ids=ids, doc_spans=DocSpans.single(5))


def test_doc_spans_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1], [3, 4, 0, 1, 2]])  # row 2 starts mid-document
    docs = DocSpans.from_position_ids(pos)
    assert docs.cu_seqlens == (0, 3, 5, 7, 10)
    assert docs.spans == [(0, 3), (3, 5), (5, 7), (7, 10)]
    assert docs.max_len == 3
    assert DocSpans.single(9).spans == [(0, 9)]
    assert DocSpans.rows(2, 5) == DocSpans.from_position_ids(torch.arange(5).expand(2, 5))


# --- bf16 autocast ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_autocast_runs_and_is_close_to_fp32(make_tiny_model, backend):
    """bf16 has an 8-bit mantissa: loss within 2% and gradients with cosine similarity > 0.99."""
    hf = make_tiny_model("llama", dtype=torch.float32)
    model = adapt(hf, backend)
    ids = random_ids(hf.config.vocab_size, 2, 37)
    ref = model(input_ids=ids, labels=ids)
    ref.loss.backward()
    ref_grads = grads_of(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = grads_of(model)
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - ref.loss.item()) / ref.loss.item() < 2e-2
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for name, g in ref_grads.items():
        assert grads[name].dtype == torch.float32
        cos = F.cosine_similarity(grads[name].flatten(), g.flatten(), dim=0).item()
        assert cos > 0.99, f"{name}: cosine {cos:.4f}"


# --- attention backends directly ----------------------------------------------------------------


def dense_oracle(q, k, v, docs: DocSpans, scale: float):
    """Independent oracle: one [t, t] causal same-document mask, GQA by repeat_interleave."""
    t, n, _ = q.shape
    group = n // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    doc_id = torch.zeros(t, dtype=torch.long)
    for i, (s0, s1) in enumerate(docs.spans):
        doc_id[s0:s1] = i
    mask = (doc_id[:, None] == doc_id[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    scores = torch.einsum("ind,jnd->nij", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [n, t]
    out = torch.einsum("nij,jnd->ind", torch.softmax(scores, dim=-1), v)
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_backend_matches_dense_oracle(backend, kv_heads, dtype):
    g = torch.Generator().manual_seed(0)
    t, n, d = 37, 4, 16
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=dtype) for h in (n, kv_heads, kv_heads))
    dout = torch.randn(t, n, d, generator=g, dtype=dtype)
    docs = DocSpans((0, 1, 14, 20, 37))  # includes a 1-token document
    scale = 1.0 / math.sqrt(d)
    tol = TOL[dtype]

    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    out_o, lse_o = dense_oracle(*qkv, docs, scale)
    grads_o = torch.autograd.grad(out_o, qkv, dout)

    qkv = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = attention(*qkv, docs, build_attention_backend(backend, "cpu"), scale)
    grads = torch.autograd.grad(out, qkv, dout)

    assert out.shape == (t, n, d) and lse.shape == (n, t)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_err(out.detach(), out_o) < tol
    assert rel_err(lse.to(dtype), lse_o.detach()) < tol
    for name, a, b in zip("qkv", grads, grads_o, strict=True):
        assert a.shape == b.shape
        assert rel_err(a, b) < tol, f"d{name}"


def test_attention_backends_agree_with_each_other():
    """Backends pairwise on the same inputs (fp64), including their explicit backward methods."""
    g = torch.Generator().manual_seed(3)
    t, n, kv, d = 45, 6, 2, 8
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64) for h in (n, kv, kv))
    dout = torch.randn(t, n, d, generator=g, dtype=torch.float64)
    docs = DocSpans.from_position_ids(torch.cat([torch.arange(20), torch.arange(5), torch.arange(20)])[None])
    results = {}
    for backend in (ReferenceAttention(), CpuFlashAttention(), SdpaAttention()):
        out, lse = backend.forward(q, k, v, docs, 0.3)
        results[backend.name] = (out, lse, *backend.backward(dout, q, k, v, out, lse, docs, 0.3))
    base = results.pop("reference")
    for name, tensors in results.items():
        for label, a, b in zip(("out", "lse", "dq", "dk", "dv"), tensors, base, strict=True):
            assert rel_err(a, b) < 1e-10, f"{name} {label}"


def test_sdpa_lse_blocks_cover_long_documents(monkeypatch):
    """SdpaAttention computes the lse in blocks of query rows sized by its score budget; a budget
    of 8 rows makes a 29-token document run 4 blocks (8, 8, 8, 5), and the lse still matches."""
    n, L = 2, 29
    backend = SdpaAttention(score_budget_bytes=8 * n * L * 8 * 2)  # 8 rows of float64 scores + exp
    assert backend.block_rows(n, L, torch.float64) == 8
    blocks = []
    logsumexp = torch.logsumexp

    def counting_logsumexp(scores, dim):
        blocks.append(scores.shape[1])  # scores of one block: [n, rows, L]
        return logsumexp(scores, dim=dim)

    monkeypatch.setattr(torch, "logsumexp", counting_logsumexp)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(L, n, 4, generator=g, dtype=torch.float64) for _ in range(3))
    docs = DocSpans((0, L))
    out, lse = backend.forward(q, k, v, docs, 0.5)
    monkeypatch.undo()
    assert blocks == [8, 8, 8, 5]
    out_o, lse_o = dense_oracle(q, k, v, docs, 0.5)
    assert rel_err(out, out_o) < 1e-10 and rel_err(lse, lse_o) < 1e-10


# --- family checks, HF views --------------------------------------------------------------------


def test_adapt_rejects_unsupported_family():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(ValueError, match="model.family") as err:
        adapt(gpt2)
    assert "'gpt2'" in str(err.value) and "\n" not in str(err.value)


def test_sliding_window_longer_documents_are_rejected(make_tiny_model):
    hf = make_tiny_model("mistral", sliding_window=8)
    model = adapt(hf, "reference")
    ids = random_ids(hf.config.vocab_size, 1, 12)
    with pytest.raises(ValueError, match="model.sliding_window"):
        model(input_ids=ids, labels=ids)
    # documents no longer than the window are fine (packed: 8 + 4)
    model(input_ids=ids, position_ids=torch.cat([torch.arange(8), torch.arange(4)])[None])


def test_mistral_without_window_has_none(make_tiny_model):
    assert adapt(make_tiny_model("mistral")).sliding_window is None


def test_to_hf_and_state_dict_keys(make_tiny_model):
    hf = make_tiny_model("qwen2")
    model = adapt(hf)
    assert isinstance(model, CausalLM)
    assert model.to_hf() is hf
    assert adapt(model) is model
    assert list(model.state_dict()) == list(hf.state_dict())
    # parameters are shared, not copied
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        assert p is hf_params[name]
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in hf.parameters())


def test_auto_backend_on_cpu_is_cpu_flash():
    auto = build_attention_backend("auto", "cpu")
    q = torch.zeros(4, 2, 8)
    assert auto.name == "auto" and auto.pick(q).name == "cpu_flash"
    with pytest.raises(ValueError, match="model.attention"):
        build_attention_backend("nope", "cpu")
