"""Hugging Face Llama-family causal LMs seen as three parts per decoder layer.

    pre-attention   (row-wise)  x_th -> input norm -> q, k, v projections -> RoPE -> q_tnd, k_tkd, v_tkd
    attention core  (global)    (q, k, v, documents) -> out_tnd, lse_nt        [attention.py]
    post-attention  (row-wise)  (x_th, out_tnd) -> o_proj -> +x -> norm -> MLP -> + -> y_th

"Row-wise" means every output row depends only on the same input row, so any subset of token
rows can be rebuilt on its own: that is what token-wise recompute (offload/) and context
parallelism (parallel/) rely on. The batch is flattened into one token stream of t = b * s rows.

``CausalLM`` keeps the HF modules under their HF names (``model.layers.N.self_attn.q_proj``...),
so its ``state_dict`` is the HF one. How the layers run is a pluggable ``LayerExecutor``: the model
code never branches on a memory feature; ``offload.apply_activation_memory`` swaps the executor.
The attention core is called through ``LayerContext.attention``, which hands its output and
logsumexp to the caller: an executor learns them from that call, never from what the core saves.

Module hooks: the executors call a layer's parts, never the HF layer's ``forward``, so every
executor runs one layer's forward as ``parts.call(fn, x_th)``. That goes through the method
``LAYER_METHOD`` of the HF decoder layer module, which sharding registers as a forward method
(parallel/fsdp.py; parallel/zero3.py runs it through the module's ``__call__`` for DeepSpeed's
hooks): its pre-forward hook unshards the layer's parameters, its post-forward hook reshards them
and hooks the output so that backward unshards them again before the layer's backward (and its
token-wise rebuild, which runs inside it) and reduce-scatters the gradients once the layer's input
gradient is done.
This module imports nothing else of longtrain except the attention and loss modules beside it.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import torch
from torch import Tensor, nn

from .attention import AttentionBackend, DocSpans, attention, build_attention_backend
from .loss import IGNORE_INDEX, LOSS_CHUNK_ROWS
from .loss_triton import fused_linear_cross_entropy

if TYPE_CHECKING:
    from transformers import PreTrainedConfig

SUPPORTED_FAMILIES = ("llama", "qwen2", "mistral")
T = TypeVar("T")


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x_tnd: Tensor, cos_td: Tensor, sin_td: Tensor) -> Tensor:
    # Under bf16 autocast the tables are float32 (made from the float32 residual stream) while the
    # projections are bf16: rotate in the projections' dtype so q, k and v keep one dtype.
    cos, sin = cos_td[:, None, :].to(x_tnd.dtype), sin_td[:, None, :].to(x_tnd.dtype)
    return x_tnd * cos + _rotate_half(x_tnd) * sin


# The HF module structure this adapter relies on (common to the supported families). nn.Module's
# __getattr__ types every submodule as ``Tensor | Module``; these protocols name what is really there.
class _HFAttention(Protocol):
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    head_dim: int
    scaling: float


class _HFMLP(Protocol):
    gate_proj: nn.Linear
    up_proj: nn.Linear
    down_proj: nn.Linear
    act_fn: nn.Module


class _HFDecoderLayer(Protocol):
    input_layernorm: nn.Module
    self_attn: _HFAttention
    post_attention_layernorm: nn.Module
    mlp: _HFMLP


class _HFBackbone(Protocol):
    """``hf_model.model`` (``LlamaModel`` and its siblings)."""

    embed_tokens: nn.Embedding
    layers: nn.ModuleList
    norm: nn.Module
    rotary_emb: nn.Module


class _HFCausalLM(Protocol):
    config: PreTrainedConfig
    model: _HFBackbone
    lm_head: nn.Linear


LAYER_METHOD = "longtrain_layer"  # the decoder layer's forward as module hooks see it (``LayerParts.call``)


def _layer_call(module: nn.Module, fn: Callable[..., Any], x_th: Tensor, *args: Any) -> Any:
    """Bound to every decoder layer as ``LAYER_METHOD``: runs ``fn(x_th, *args)``, one layer's forward."""
    return fn(x_th, *args)


class LayerParts:
    """One HF decoder layer exposed as pre-attention / post-attention row-wise functions.

    Holds references to the layer's submodules (not registered again as modules) and the layer
    module itself (``module``: what sharding wraps; ``call`` runs a forward through its hooks).
    """

    def __init__(self, layer: nn.Module, index: int):
        hf_layer = cast(_HFDecoderLayer, layer)
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.module = layer
        if not hasattr(layer, LAYER_METHOD):
            setattr(layer, LAYER_METHOD, types.MethodType(_layer_call, layer))
        self.index = index
        self.input_norm = hf_layer.input_layernorm
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
        )
        self.post_norm = hf_layer.post_attention_layernorm
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = (
            mlp.gate_proj,
            mlp.up_proj,
            mlp.down_proj,
            mlp.act_fn,
        )
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        self.n_heads = self.q_proj.out_features // self.head_dim
        self.n_kv_heads = self.k_proj.out_features // self.head_dim

    def call(self, fn: Callable[..., T], x_th: Tensor, *args: Any) -> T:
        """``fn(x_th, *args)``, one forward of this layer (by any executor), through the layer
        module's hooks (``x_th``: the layer input, whose gradient marks the layer's backward done)."""
        return getattr(self.module, LAYER_METHOD)(fn, x_th, *args)

    def parameters(self) -> list[nn.Parameter]:
        """The layer's parameters as they are now (unsharded while inside ``call`` under sharding)."""
        return list(self.module.parameters())

    def pre_attention(self, x_th: Tensor, cos_td: Tensor, sin_td: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        t, d = x_th.shape[0], self.head_dim
        h_th = self.input_norm(x_th)
        q_tnd = self.q_proj(h_th).view(t, self.n_heads, d)
        k_tkd = self.k_proj(h_th).view(t, self.n_kv_heads, d)
        v_tkd = self.v_proj(h_th).view(t, self.n_kv_heads, d)
        return apply_rope(q_tnd, cos_td, sin_td), apply_rope(k_tkd, cos_td, sin_td), v_tkd

    def post_attention(self, x_th: Tensor, attn_tnd: Tensor) -> Tensor:
        r_th = x_th + self.o_proj(attn_tnd.reshape(attn_tnd.shape[0], -1))
        h_th = self.post_norm(r_th)
        return r_th + self.down_proj(self.act_fn(self.gate_proj(h_th)) * self.up_proj(h_th))


@dataclass
class LayerContext:
    """What every layer of one forward shares: RoPE rows, document spans, the attention core."""

    cos_td: Tensor
    sin_td: Tensor
    docs: DocSpans
    backend: AttentionBackend

    def attention(self, parts: LayerParts, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The attention core on (q, k, v) from ``parts.pre_attention``: returns (out_tnd, lse_nt).

        Differentiable in q, k, v. Whatever the core saves for its backward is its own business:
        a caller that keeps activations elsewhere (offload/) takes out and lse from this return
        value and q, k, v from its own arguments."""
        return attention(q, k, v, self.docs, self.backend, parts.scale)


def run_layer(parts: LayerParts, x_th: Tensor, ctx: LayerContext) -> Tensor:
    """The plain layer: pre-attention, attention core, post-attention (callers run it inside
    ``parts.call``)."""
    q, k, v = parts.pre_attention(x_th, ctx.cos_td, ctx.sin_td)
    out_tnd, _lse = ctx.attention(parts, q, k, v)
    return parts.post_attention(x_th, out_tnd)


class LayerExecutor(Protocol):
    """Runs all decoder layers of one forward and decides what autograd keeps for backward
    (plain here; recompute, offload and token-wise in offload/)."""

    def __call__(self, layers: list[LayerParts], x_th: Tensor, ctx: LayerContext) -> Tensor:
        """x_th [t, h] -> the last layer's output [t, h]."""
        ...

    def stats(self) -> dict[str, float]:
        """Statistics of the last step (bytes offloaded, recomputed rows...); {} if it keeps none."""
        ...

    def close(self) -> None:
        """Release what the executor holds (copy threads, buffers, files); it is not called after."""
        ...


class PlainExecutor:
    """Autograd keeps every saved activation on the device (no memory saving)."""

    def __call__(self, layers: list[LayerParts], x_th: Tensor, ctx: LayerContext) -> Tensor:
        for parts in layers:
            x_th = parts.call(functools.partial(run_layer, parts), x_th, ctx)
        return x_th

    def stats(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        """Nothing to release."""


@dataclass
class CausalLMOutput:
    loss: Tensor | None = None  # loss_sum / normaliser
    loss_sum: Tensor | None = None  # sum of token losses
    num_tokens: int = 0  # tokens that contributed to loss_sum
    logits: Tensor | None = None  # [b, s, V], only when no labels are given


def shift_labels(labels_bs: Tensor) -> Tensor:
    """HF convention: row i predicts labels[i + 1]; the last position of each row predicts nothing."""
    targets = torch.full_like(labels_bs, IGNORE_INDEX)
    targets[:, :-1] = labels_bs[:, 1:]
    return targets


class CausalLM(nn.Module):
    """A supported HF causal LM run through the three-part layer split.

    Call it like the HF model: ``model(input_ids=..., labels=...)`` -> output with ``.loss``.
    Packed documents are isolated: a new document starts where ``position_ids == 0``.
    """

    _hf_model: nn.Module  # set with object.__setattr__ in __init__

    def __init__(self, hf_model: nn.Module, attention_backend: str | AttentionBackend = "auto"):
        super().__init__()
        family = getattr(hf_model.config, "model_type", None)
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"model family {family!r} is not supported; model.family must be one of {', '.join(SUPPORTED_FAMILIES)}"
            )
        hf = cast(_HFCausalLM, hf_model)
        self.config = hf.config
        self.model = hf.model  # embed_tokens, layers, norm, rotary_emb (HF names kept)
        self.lm_head = hf.lm_head
        object.__setattr__(self, "_hf_model", hf_model)  # not a submodule: parameters are registered once
        window = getattr(self.config, "sliding_window", None)
        uses_window = family == "mistral" or getattr(self.config, "use_sliding_window", False)
        self.sliding_window: int | None = window if uses_window else None
        if isinstance(attention_backend, str):
            attention_backend = build_attention_backend(attention_backend, self.lm_head.weight.device)
        self.attention_backend = attention_backend
        self.layer_parts = [LayerParts(layer, i) for i, layer in enumerate(self.model.layers)]
        self.layer_executor: LayerExecutor = PlainExecutor()
        self.loss_chunk_rows = LOSS_CHUNK_ROWS

    @property
    def num_layers(self) -> int:
        return len(self.layer_parts)

    def layer_executor_stats(self) -> dict[str, float]:
        """Statistics of the activation executor's last step (bytes offloaded, recomputed rows...)."""
        return self.layer_executor.stats()

    def check_doc_len(self, doc_len: int, error: type[Exception] = ValueError) -> None:
        """Sliding-window attention is not supported: no document may be longer than the window.
        The trainer checks train.seq_len with ``error=ConfigError`` before the first step."""
        if self.sliding_window is not None and doc_len > self.sliding_window:
            raise error(
                f"a document of {doc_len} tokens exceeds the model's sliding_window={self.sliding_window}; "
                "sliding-window attention is not supported: set model.sliding_window=null or lower "
                f"train.seq_len to {self.sliding_window}"
            )

    def rope(self, x_th: Tensor, position_ids_t: Tensor) -> tuple[Tensor, Tensor]:
        cos, sin = self.model.rotary_emb(x_th, position_ids_t[None, :])  # [1, t, d]
        return cos[0], sin[0]

    def layer_inputs(
        self,
        input_ids: Tensor,
        position_ids: Tensor | None = None,
        doc_spans: DocSpans | None = None,
        attention: AttentionBackend | None = None,
    ) -> tuple[Tensor, LayerContext]:
        """The first layer's input x_th [b * s, h] and the context all layers share.

        ``doc_spans``: the documents of the flattened rows, computed on the host by the data
        pipeline; without it they are read from ``position_ids`` (a device sync on GPU), and
        without those every row is one document. ``attention``: the core for this forward (a
        context-parallel core on a shard of the documents); None = the model's own."""
        b, s = input_ids.shape
        if doc_spans is None:
            doc_spans = (
                DocSpans.rows(b, s) if position_ids is None else DocSpans.from_position_ids(position_ids)
            )
        elif doc_spans.cu_seqlens[-1] != b * s:
            raise ValueError(f"doc_spans cover {doc_spans.cu_seqlens[-1]} tokens, the batch has {b * s}")
        if position_ids is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        self.check_doc_len(doc_spans.max_len)
        x_th = self.model.embed_tokens(input_ids).view(b * s, -1)
        cos_td, sin_td = self.rope(x_th, position_ids.reshape(-1))
        return x_th, LayerContext(cos_td, sin_td, doc_spans, attention or self.attention_backend)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        loss_normalizer: float | Tensor | None = None,
        doc_spans: DocSpans | None = None,
        targets: Tensor | None = None,
        attention: AttentionBackend | None = None,
        **unused,
    ) -> CausalLMOutput:
        """input_ids, labels, position_ids: [b, s]; doc_spans, attention: see ``layer_inputs``.
        ``targets`` [b, s]: labels already shifted (row i predicts targets[i]), for rows cut from a
        longer stream (a context-parallel shard), where shifting inside the rows would be wrong;
        give labels or targets, not both.
        Loss = sum of token losses / loss_normalizer (default: this batch's token count; the
        trainer passes the global count so that data/context-parallel ranks and accumulation
        micro-batches weigh every token equally)."""
        if labels is not None and targets is not None:
            raise ValueError("give labels (unshifted) or targets (shifted), not both")
        b, s = input_ids.shape
        x_th, ctx = self.layer_inputs(input_ids, position_ids, doc_spans, attention)
        x_th = self.layer_executor(self.layer_parts, x_th, ctx)
        x_th = self.model.norm(x_th)
        if targets is None:
            if labels is None:
                return CausalLMOutput(logits=self.lm_head(x_th).view(b, s, -1))
            targets = shift_labels(labels)
        targets_t = targets.reshape(-1)
        loss_sum = fused_linear_cross_entropy(
            x_th, self.lm_head.weight, targets_t, bias_v=self.lm_head.bias, chunk_rows=self.loss_chunk_rows
        )
        num_tokens = int((targets_t != IGNORE_INDEX).sum())
        norm = loss_normalizer if loss_normalizer is not None else max(num_tokens, 1)
        return CausalLMOutput(loss=loss_sum / norm, loss_sum=loss_sum, num_tokens=num_tokens)

    def to_hf(self) -> nn.Module:
        """The wrapped HF model (shares these parameters): for saving in HF format or generation."""
        return self._hf_model


def adapt(hf_model: nn.Module, attention_backend: str | AttentionBackend = "auto") -> CausalLM:
    """Wrap a supported HF causal LM (shares its parameters); an already adapted model is returned as is."""
    if isinstance(hf_model, CausalLM):
        return hf_model
    return CausalLM(hf_model, attention_backend)
