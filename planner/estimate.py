"""Per-device memory and step time of a job, from its config alone (no full-size model is run).

    shape = ModelShape.of(cfg, vocab_size)          # the model built on the meta device: counts only
    est = estimate(shape, Layout(...), layers, hw)  # bytes per category, seconds, MFU

The model's parameter counts come from the HF model built on the meta device; the activation bytes
per token per layer from ``layer_bytes_per_token`` (the split token-wise offload cuts, the formula
the tests check against the executor, tests/saved_bytes.py); a layer's transient peak from the
tensors its backward holds at once (below). Times are FLOPs at a fixed fraction of the device's
peak plus whatever copies and collectives cannot hide behind compute.

Memory per device (bytes), the categories ``mem_bytes`` reports:
  params, grads, optimizer        model states on the device (sharded over the shard group)
  param_casts                     bf16 autocast copies of the weights, saved for backward
  activations                     what the kept and recomputed layers hold between forward and backward
  layer_peak                      one layer's transient at its backward peak (tiles shrink its row part)
  backward_peak                   the worst layer's backward: held activations of it and the layers
                                  below it, its transient, the gradients produced by then
  grads_held                      gradients live through the whole step (accumulation, sharded
                                  states); 0 when one micro-batch's backward creates them
  cp_buffers                      ring attention's K/V send/receive buffers (cp > 1)
  loss                            final hidden states, their gradient, logits chunks, LM-head grad
The device's peak (``device_total``) is not the sum: the loss's transient and a layer's do not overlap.
  host.activations, file.activations, host.optimizer, file.optimizer: this device's share off the device
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from longtrain.offload.cost import offloaded_bytes, split_row
from longtrain.trainer.model.hf import head_dim_of, hf_config_from_sizes

from .hardware import Hardware

if TYPE_CHECKING:
    from longtrain.trainer.config import JobConfig

    from .profile import StepTimes

# Fraction of the bf16 peak that long-sequence GEMMs and FlashAttention reach: FlashAttention-2
# reports up to 73% forward and ~63% backward on A100; MEMO's whole step reaches 52.3% MFU at 7B/1M
# on A800 (reference/memo.md). An assumption of the cost model, the same on every device.
COMPUTE_EFFICIENCY = 0.6
TILE_OVERHEAD_S = 20e-6  # per tile and pass (forward, recompute, backward): ~10 kernel launches
ADAM_BYTES_PER_STATE_BYTE = 3.5  # AdamW reads p, g, m, v and writes p, m, v per 8 bytes of m, v
GRAD_ROWS = 2  # ffn-sized gradients beyond the freed down-projection input at the MLP backward's peak
LOSS_CHUNK_ROWS = 4096  # trainer/model/loss.py: one [chunk, V] fp32 logits block at a time

SHARDS = ("none", "fsdp", "deepspeed")
OPTIM_TIERS = ("device", "dram", "nvme")


def model_config(cfg: JobConfig, vocab_size: int) -> Any:
    """The HF config of the job's model: ``model.path``'s, or built from the ``model.*`` sizes
    (``vocab_size``: the tokenizer's, unless ``model.vocab_size`` is set)."""
    if cfg.model.path:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(cfg.model.path, local_files_only=True)
    return hf_config_from_sizes(cfg.model, vocab_size, cfg.train.seq_len)


def meta_model(cfg: JobConfig, vocab_size: int) -> Any:
    """The job's HF model on the meta device (shapes only, no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config(cfg, vocab_size))


@dataclass(frozen=True)
class LayerBytes:
    """Bytes one decoder layer saves for backward per token, split as token-wise offload splits them."""

    whole: int  # layer input, attention output, logsumexp: offloaded whole
    rows: int  # the rest (norm outputs, q/k/v, MLP intermediates): first alpha*t rows offloaded


def layer_bytes(hidden: int, heads: int, kv_heads: int, head_dim: int, ffn: int, nbytes: int) -> LayerBytes:
    """Plain autograd keeps ~ (10 h + 4 kv + 3 ffn) values per token per layer (norms, q/k/v,
    attention out, residuals, MLP intermediates), in the activation dtype (bf16 halves them). Of
    those, the layer input (h), the attention output (heads x head_dim) and its logsumexp (one
    value per head) are the whole tensors (measured equal to the executor's in the tests)."""
    values = 10 * hidden + 4 * kv_heads * head_dim + 3 * ffn
    whole = hidden + heads * head_dim + heads
    return LayerBytes(whole=whole * nbytes, rows=(values - whole) * nbytes)


def layer_bytes_per_token(c: Any, dtype: str) -> LayerBytes:
    """``layer_bytes`` of an HF config in activation dtype ``dtype``."""
    return layer_bytes(
        c.hidden_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        head_dim_of(c),
        c.intermediate_size,
        getattr(torch, dtype).itemsize,
    )


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes held for backward once a micro-batch's forward has ended."""

    device: int
    offloaded: tuple[int, int]  # host/file tier: (low, high), equal unless alpha is auto (alpha 0, 1)


def config_tokens(cfg: JobConfig) -> int:
    """Token rows of one micro-batch on one rank: its packed rows (dp), their share of a cp group
    (cp; zigzag padding aside), at most the token capacity (hdp)."""
    rows = cfg.data.micro_batch_size * cfg.train.seq_len
    if cfg.parallel.mode == "hdp":
        return cfg.parallel.token_capacity or rows
    return -(-rows // cfg.parallel.context_parallel)


def plain_activation_bytes(cfg: JobConfig, c: Any) -> int:
    """What plain autograd saves for backward in one micro-batch's forward (all layers)."""
    per_token = layer_bytes_per_token(c, cfg.train.dtype)
    return c.num_hidden_layers * (per_token.whole + per_token.rows) * config_tokens(cfg)


def activation_bytes(cfg: JobConfig, c: Any) -> ActivationBytes:
    """What a uniform ``activation.mode`` holds on the device and the host/file tier, per micro-batch."""
    act, t, layers = cfg.activation, config_tokens(cfg), c.num_hidden_layers
    plain = plain_activation_bytes(cfg, c)
    if act.mode == "none":
        return ActivationBytes(device=plain, offloaded=(0, 0))
    if act.mode == "recompute":  # each layer's input; the layer is re-run in backward
        input_bytes = c.hidden_size * getattr(torch, cfg.train.dtype).itemsize * t
        return ActivationBytes(device=layers * input_bytes, offloaded=(0, 0))
    if act.mode == "offload":
        return ActivationBytes(device=0, offloaded=(plain, plain))
    per_token = layer_bytes_per_token(c, cfg.train.dtype)
    layer = plain // layers  # everything one layer saves
    kept = min(act.keep_last, layers)
    alphas = (0.0, 1.0) if act.alpha == "auto" else (float(act.alpha),) * 2
    low, high = (
        offloaded_bytes(per_token.whole * t, per_token.rows * t, alpha, t, layers - kept) for alpha in alphas
    )
    return ActivationBytes(device=kept * layer, offloaded=(low, high))


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


@dataclass(frozen=True)
class ModelShape:
    """What the estimates read from a model: sizes and parameter counts (``layer_params`` of one
    decoder layer, ``other_params`` embeddings, final norm and LM head)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    layer_params: int
    other_params: int
    dtype_bytes: int  # activation dtype

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + self.other_params

    @classmethod
    def of_config(cls, cfg: JobConfig, vocab_size: int = 4096) -> ModelShape:
        """The job's model (built on the meta device); vocab_size when neither model.vocab_size
        nor model.path gives one."""
        return cls.of_model(meta_model(cfg, cfg.model.vocab_size or vocab_size), cfg.train.dtype)

    @classmethod
    def of_model(cls, model: Any, dtype: str) -> ModelShape:
        c = model.config
        layer = model.model.layers[0]
        layer_params = sum(p.numel() for p in layer.parameters())
        total = sum(p.numel() for p in model.parameters())
        return cls(
            layers=c.num_hidden_layers,
            hidden=c.hidden_size,
            heads=c.num_attention_heads,
            kv_heads=c.num_key_value_heads,
            head_dim=head_dim_of(c),
            ffn=c.intermediate_size,
            vocab=c.vocab_size,
            layer_params=layer_params,
            other_params=total - c.num_hidden_layers * layer_params,
            dtype_bytes=getattr(torch, dtype).itemsize,
        )

    @functools.cached_property  # read ~10^5 times by a search; the fields are frozen
    def per_token(self) -> LayerBytes:
        return layer_bytes(self.hidden, self.heads, self.kv_heads, self.head_dim, self.ffn, self.dtype_bytes)

    @property
    def whole_bytes(self) -> int:
        return self.per_token.whole

    @property
    def rows_bytes(self) -> int:
        return self.per_token.rows

    @property
    def plain_bytes(self) -> int:
        return self.per_token.whole + self.per_token.rows

    @property
    def qkv_bytes(self) -> int:
        return self.dtype_bytes * self.head_dim * (self.heads + 2 * self.kv_heads)


@dataclass(frozen=True)
class Layout:
    """How a job is spread: ``gpus`` ranks, cp groups of ``cp`` (one sequence split over them),
    model states held per ``shard`` (none | fsdp | deepspeed) with the AdamW state on ``optim_tier``
    (device | dram | nvme)."""

    gpus: int
    cp: int = 1
    shard: str = "none"
    optim_tier: str = "device"


@dataclass(frozen=True)
class LayerChoice:
    """One decoder layer's activation handling: mode keep | recompute | tokenwise | offload, the
    tokenwise alpha and tier (host | file), rows per tile (0: the whole sequence)."""

    mode: str
    alpha: float = 0.0
    tier: str = "host"
    tile_rows: int = 0


@dataclass(frozen=True)
class Job:
    seq_len: int
    micro_batch: int = 1
    grad_accum: int = 1

    def tokens_per_rank(self, cp: int) -> int:
        return -(-self.seq_len * self.micro_batch // cp)


@dataclass
class Estimate:
    mem_bytes: dict[str, int]  # per device, by category (host./file. prefixed: this device's share)
    device_bytes: int
    host_bytes_per_node: int
    file_bytes_per_node: int
    step_s: float
    mfu: float
    parts_s: dict[str, float]


def _ranks_per_node(layout: Layout, hw: Hardware) -> int:
    return min(layout.gpus, hw.gpus_per_node)


def model_state_bytes(shape: ModelShape, layout: Layout) -> dict[str, int]:
    """Device bytes of params, grads, optimizer state and the bf16 casts; host/file bytes of the
    offloaded state (per device). fp32 master weights, grads and AdamW m, v (16 bytes a parameter)
    as the trainer keeps them; DeepSpeed ZeRO-3 keeps bf16 partitions on the device and, with
    offload, the fp32 master, grads and m, v on the host."""
    p, lp, n = shape.params, shape.layer_params, layout.gpus
    e = shape.dtype_bytes
    casts = e * p if e < 4 else 0  # autocast's bf16 copies, saved by reference for backward
    off = {"dram": "host.optimizer", "nvme": "file.optimizer"}
    if layout.shard == "none":
        out = {"params": 4 * p, "grads": 4 * p, "param_casts": casts, "optimizer": 0}
        state = 8 * p
    elif layout.shard == "fsdp":  # sharded over all ranks; one layer (+ the next, prefetched) gathered
        out = {
            "params": 4 * p // n + 2 * 4 * lp,
            "grads": 4 * p // n + 4 * lp,
            "param_casts": casts // n + 2 * e * lp if casts else 0,
            "optimizer": 0,
        }
        state = 8 * p // n
    else:  # deepspeed ZeRO-3: bf16 partitions, two gathered layers, a reduce bucket of one layer
        out = {"params": 2 * p // n + 2 * 2 * lp, "grads": 2 * lp, "param_casts": 0, "optimizer": 0}
        state = 16 * p // n if layout.optim_tier != "device" else 12 * p // n
        if layout.optim_tier == "device":
            out["grads"] += 4 * p // n
    if layout.optim_tier == "device":
        out["optimizer"] += state
    else:
        out[off[layout.optim_tier]] = state
    return out


def layer_peak_bytes(shape: ModelShape, t: int, choice: LayerChoice, below: LayerChoice | None) -> int:
    """One layer's transient at its backward peak, t token rows on this rank: the bytes above what
    the layer holds from its forward (``activation_device_bytes``).

    A layer's backward peaks in its MLP backward (measured on CPU, tests/planner_calibration.py):
    the layer's saved tensors are all there (its attention part's are freed only later) and the
    incoming gradient (h) and two ffn-sized gradients are live, the down projection's saved input
    having been freed (``mlp_grads``). The attention backward comes after the MLP's saved tensors
    (at least 3 ffn-sized ones) are freed, so with ffn >= hidden it never holds more.

    keep: ``mlp_grads`` over every row. recompute: the rebuilt saved tensors (all but the held
    input) plus ``mlp_grads``; with tiles, the attention part (input, q/k/v, attention output)
    full-length and the row part and ``mlp_grads`` over one tile. tokenwise: the same rebuild
    (nothing held: the whole tensors come back from the tier). Any mode but offload: plus the
    whole tensors and first head rows (all of them untiled, one tile tiled) of ``below``, the next
    token-wise layer under it (None: there is none), prefetched during its backward (the topmost
    token-wise layer's as soon as the forward ends);
    an untiled layer with 0 < alpha < 1 concatenates its rows read back and recomputed
    (offload/tokenwise.py ``_rebuild_rows``): before its MLP backward, one more copy of its row
    tensors is live, beside the incoming gradient instead of ``mlp_grads``."""
    e, h = shape.dtype_bytes, shape.hidden
    mlp_grads = e * (h + GRAD_ROWS * shape.ffn)
    prefetch = 0
    if below is not None:
        head = min(split_row(below.alpha, t), below.tile_rows or t)
        prefetch = t * shape.whole_bytes + head * shape.rows_bytes
    if choice.mode == "keep":
        return t * mlp_grads + prefetch
    if choice.mode == "offload":  # the saved tensors come back from the host first
        return t * (shape.plain_bytes + mlp_grads)
    rows = choice.tile_rows or t
    attn_part = shape.whole_bytes + shape.qkv_bytes  # full-length even with tiles
    row_part = shape.plain_bytes - attn_part
    rebuilt = t * attn_part + rows * (row_part + mlp_grads)
    if choice.tile_rows:
        rebuilt += t * e * h  # the incoming gradient of the whole sequence
    if choice.mode == "recompute":
        return rebuilt - t * e * h + prefetch  # its input is held
    a = split_row(choice.alpha, t)
    peak = rebuilt
    if not choice.tile_rows and 0 < a < t:
        peak = max(peak, t * (shape.plain_bytes + shape.rows_bytes + e * h))
    return peak + prefetch


def activation_device_bytes(shape: ModelShape, t: int, choice: LayerChoice) -> int:
    """Bytes a layer holds on the device from its forward to its backward."""
    if choice.mode == "keep":
        return t * shape.plain_bytes
    if choice.mode == "recompute":
        return t * shape.dtype_bytes * shape.hidden
    return 0


def activation_offloaded_bytes(shape: ModelShape, t: int, choice: LayerChoice) -> int:
    """Bytes a layer keeps on its tier (host or file) from its forward to its backward."""
    if choice.mode == "offload":
        return t * shape.plain_bytes
    if choice.mode != "tokenwise":
        return 0
    a = split_row(choice.alpha, t)
    return t * shape.whole_bytes + a * shape.rows_bytes


def estimate(
    shape: ModelShape,
    layout: Layout,
    job: Job,
    layers: list[LayerChoice],
    hw: Hardware,
    times: StepTimes | None = None,
) -> Estimate:
    """Memory by category and predicted step time / MFU of one plan (``times``: measured pieces
    of the step instead of FLOPs at a fixed rate, ``step_seconds``)."""
    mem = memory_bytes(shape, layout, job, layers)
    device = device_total(mem)
    rpn = _ranks_per_node(layout, hw)
    host_node = rpn * sum(v for k, v in mem.items() if k.startswith("host."))
    file_node = rpn * sum(v for k, v in mem.items() if k.startswith("file."))
    parts = step_seconds(shape, layout, job, layers, hw, times)
    step = sum(parts.values())
    return Estimate(
        mem, device, host_node, file_node, step, model_flops(shape, layout, job) / (step * hw.flops), parts
    )


# mem_bytes categories that are not model states (device_total takes the worst phase of them)
PHASES = frozenset(
    {"activations", "layer_peak", "backward_peak", "cp_buffers", "loss", "grads", "grads_held"}
)


def device_total(mem: dict[str, int]) -> int:
    """Peak device bytes: the model states, plus the larger of the loss phase (every layer's held
    activations, the loss's transient and the gradients held through the step) and the worst
    backward phase (``backward_peak``, which counts the gradients produced by then, with the ring
    buffers); they never overlap."""
    states = sum(v for k, v in mem.items() if "." not in k and k not in PHASES)
    loss_phase = mem["activations"] + mem["loss"] + mem["grads_held"]
    return states + max(loss_phase, mem["backward_peak"] + mem["cp_buffers"])


def backward_peak_bytes(
    shape: ModelShape, t: int, layers: list[LayerChoice], head_grads: int = 0, layer_grads: int = 0
) -> int:
    """The worst layer's backward: what the layers before it (and it) still hold, plus its
    transient and the gradients live by then (``head_grads`` from the start, ``layer_grads`` more
    for it and each layer above it); backward runs from the last layer down, freeing each layer's
    held tensors."""
    held = peak = 0
    below: LayerChoice | None = None  # the next token-wise layer under layer i
    for i, c in enumerate(layers):
        held += activation_device_bytes(shape, t, c)
        grads = head_grads + (len(layers) - i) * layer_grads
        peak = max(peak, held + layer_peak_bytes(shape, t, c, below) + grads)
        if c.mode == "tokenwise":
            below = c
    return peak


def memory_bytes(shape: ModelShape, layout: Layout, job: Job, layers: list[LayerChoice]) -> dict[str, int]:
    """Bytes per device by category (module docstring)."""
    t = job.tokens_per_rank(layout.cp)
    e = shape.dtype_bytes
    mem = model_state_bytes(shape, layout)
    mem["activations"] = sum(activation_device_bytes(shape, t, c) for c in layers)
    mem["layer_peak"] = max(
        layer_peak_bytes(shape, t, c, c if c.mode == "tokenwise" else None) for c in layers
    )
    # Gradients: a step of one micro-batch on replicated states creates them in backward (set to
    # None after the optimizer step): the LM head's and final norm's first (the head's is in
    # "loss"), then each layer's; otherwise they are held through the whole step.
    if layout.shard == "none" and job.grad_accum == 1:
        embedding = shape.vocab * shape.hidden if shape.other_params >= 2 * shape.vocab * shape.hidden else 0
        mem["grads_held"] = 0
        head_grads, layer_grads = 4 * (shape.other_params - embedding), 4 * shape.layer_params
    else:
        mem["grads_held"], head_grads, layer_grads = mem["grads"], mem["grads"], 0
    mem["backward_peak"] = backward_peak_bytes(shape, t, layers, head_grads, layer_grads)
    # the final hidden states and their gradient (computed in the loss's forward, held to backward),
    # two fp32 [chunk, V] blocks (logits, their gradient), the fp32 LM-head weight gradient
    mem["loss"] = 2 * t * shape.hidden * e + 2 * min(LOSS_CHUNK_ROWS, t) * shape.vocab * 4
    mem["loss"] += 4 * shape.vocab * shape.hidden
    mem["cp_buffers"] = 8 * e * shape.kv_heads * shape.head_dim * t if layout.cp > 1 else 0
    host = sum(
        activation_offloaded_bytes(shape, t, c) for c in layers if c.mode == "offload" or c.tier == "host"
    )
    file = sum(
        activation_offloaded_bytes(shape, t, c) for c in layers if c.mode == "tokenwise" and c.tier == "file"
    )
    mem["host.activations"] = host
    mem["file.activations"] = file
    return mem


def attention_flops(shape: ModelShape, job: Job, cp: int) -> float:
    """Forward FLOPs of one layer's causal attention on one rank (one document per row: QK^T and
    PV, 2 FLOPs a multiply-add, half the square)."""
    s = job.seq_len
    return job.micro_batch * 2.0 * s * s * shape.heads * shape.head_dim / cp


def model_flops(shape: ModelShape, layout: Layout, job: Job) -> float:
    """Training FLOPs of one step on one rank (forward + backward = 3 x forward, no recompute)."""
    t = job.tokens_per_rank(layout.cp)
    dense = 2.0 * t * (shape.layers * shape.layer_params + shape.hidden * shape.vocab)
    return 3.0 * job.grad_accum * (dense + shape.layers * attention_flops(shape, job, layout.cp))


def tier_bandwidth(hw: Hardware, layout: Layout, tier: str) -> tuple[float, float]:
    """(write, read) bytes/s one rank gets to the tier: its link, or its share of the node's DRAM/NVMe."""
    rpn = _ranks_per_node(layout, hw)
    if tier == "host":
        share = hw.host_bps / rpn
        return min(hw.device_to_host_bps, share), min(hw.device_to_host_bps, share)
    return min(hw.device_to_host_bps, hw.nvme_write_bps / rpn), min(
        hw.device_to_host_bps, hw.nvme_read_bps / rpn
    )


def layer_pass_seconds(
    shape: ModelShape, layout: Layout, job: Job, hw: Hardware, times: StepTimes | None = None
) -> tuple[float, float, float, float]:
    """(forward, backward, row-wise forward, per-tile-and-pass) seconds of one layer on one rank:
    measured (``times``, at this rank's tokens) or FLOPs at ``COMPUTE_EFFICIENCY`` of the peak."""
    t = job.tokens_per_rank(layout.cp)
    if times is not None:
        if times.tokens != t:
            raise ValueError(f"step times measured at {times.tokens} tokens, the job has {t} per rank")
        return times.layer_forward_s, times.layer_backward_s, times.rowwise_forward_s, times.tile_s
    rate = hw.flops * COMPUTE_EFFICIENCY
    rowwise = 2.0 * t * shape.layer_params / rate  # the layer's row-wise forward
    fwd = rowwise + attention_flops(shape, job, layout.cp) / rate
    return fwd, 2 * fwd, rowwise, TILE_OVERHEAD_S


def layer_seconds(
    shape: ModelShape,
    layout: Layout,
    job: Job,
    c: LayerChoice,
    hw: Hardware,
    times: StepTimes | None = None,
) -> dict[str, float]:
    """One layer's seconds in one step on one rank: compute (forward + backward), recompute,
    the tier copies that do not hide behind the layer's forward (out) and backward (in), tile
    overhead. Forward, backward and the row-wise parts' forward come from ``times`` when given
    (measured at this rank's tokens, planner/profile.py), else from FLOPs at
    ``COMPUTE_EFFICIENCY`` of the device's peak (backward twice the forward)."""
    t = job.tokens_per_rank(layout.cp)
    fwd, bwd, rowwise, tile_s = layer_pass_seconds(shape, layout, job, hw, times)
    recompute = copies = tiles = 0.0
    if c.mode == "recompute":
        recompute = fwd + (rowwise if c.tile_rows else 0.0)  # tiles re-run the row parts once more
    elif c.mode == "tokenwise":
        a = split_row(c.alpha, t)
        recompute = rowwise * (1 - a / t)
        if not c.tile_rows and 0 < a < t:
            # the rebuild concatenates the rows read back and recomputed (layer_peak_bytes): one
            # copy of the row tensors, at the host's memory bandwidth (the CPU device's own; on a
            # GPU an upper bound, its memory is faster)
            recompute += t * shape.rows_bytes / hw.host_bps
    if c.mode in ("tokenwise", "offload"):
        write, read = tier_bandwidth(hw, layout, "host" if c.mode == "offload" else c.tier)
        nbytes = activation_offloaded_bytes(shape, t, c)
        copies = max(0.0, nbytes / write - fwd) + max(0.0, nbytes / read - bwd)
    if c.tile_rows:
        passes = 3 if c.mode == "tokenwise" else 4
        tiles = passes * math.ceil(t / c.tile_rows) * tile_s
    g = job.grad_accum
    return {"compute": g * (fwd + bwd), "recompute": g * recompute, "copies": g * copies, "tiles": g * tiles}


def step_seconds(
    shape: ModelShape,
    layout: Layout,
    job: Job,
    layers: list[LayerChoice],
    hw: Hardware,
    times: StepTimes | None = None,
) -> dict[str, float]:
    """Seconds of one step on one rank, by part: the layers' (``layer_seconds``), the LM head
    and loss, the turn from forward to backward (``turnaround_seconds``), exposed collectives,
    the optimizer step (``times``: measured, see layer_seconds)."""
    parts = {"compute": 0.0, "recompute": 0.0, "copies": 0.0, "tiles": 0.0}
    for c in layers:
        for k, v in layer_seconds(shape, layout, job, c, hw, times).items():
            parts[k] += v
    head = head_seconds(shape, layout, job, hw, times)
    parts["compute"] += job.grad_accum * head
    parts["copies"] += job.grad_accum * turnaround_seconds(shape, layout, job, layers, hw, times)
    parts["collectives"] = collective_seconds(shape, layout, job, hw, parts["compute"])
    parts["optimizer"] = times.optimizer_s if times is not None else optimizer_seconds(shape, layout, hw)
    return parts


def head_seconds(shape: ModelShape, layout: Layout, job: Job, hw: Hardware, times: StepTimes | None) -> float:
    """The LM head and loss, forward and backward, of one micro-batch."""
    if times is not None:
        return times.head_s
    t = job.tokens_per_rank(layout.cp)
    return 3 * 2.0 * t * shape.hidden * shape.vocab / (hw.flops * COMPUTE_EFFICIENCY)


def turnaround_seconds(
    shape: ModelShape,
    layout: Layout,
    job: Job,
    layers: list[LayerChoice],
    hw: Hardware,
    times: StepTimes | None = None,
) -> float:
    """The copies of the topmost token-wise layer that the turn from forward to backward exposes
    (one micro-batch). Its backward comes first among the token-wise layers and needs its tensors
    back: they are written as its forward ends and read at once (offload/tokenwise.py prefetches
    it when the forward ends), so the write and the read only hide behind what runs between,
    the layers above it (kept) and the head and loss. ``layer_seconds`` counts the copies of a
    layer as hidden behind its own forward and backward; for this layer that does not hold, so
    its share there is replaced by this term."""
    top = max((i for i, c in enumerate(layers) if c.mode == "tokenwise"), default=None)
    if top is None:
        return 0.0
    c = layers[top]
    t = job.tokens_per_rank(layout.cp)
    fwd, bwd, _, _ = layer_pass_seconds(shape, layout, job, hw, times)
    write, read = tier_bandwidth(hw, layout, c.tier)
    nbytes = activation_offloaded_bytes(shape, t, c)
    counted = max(0.0, nbytes / write - fwd) + max(0.0, nbytes / read - bwd)
    between = head_seconds(shape, layout, job, hw, times) + (len(layers) - 1 - top) * (fwd + bwd)
    return max(0.0, nbytes / write + nbytes / read - between) - counted


def compute_seconds(shape: ModelShape, layout: Layout, job: Job, hw: Hardware) -> float:
    """The step's forward + backward compute alone (a lower bound of any plan's step time)."""
    return step_seconds(shape, layout, job, [LayerChoice("keep")] * shape.layers, hw)["compute"]


def collective_seconds(shape: ModelShape, layout: Layout, job: Job, hw: Hardware, compute_s: float) -> float:
    """Collectives that do not hide behind compute: parameter all-gathers (forward, backward) and
    the gradient reduce-scatter of sharded states, or the gradient all-reduce of replicated ones,
    overlapped with the step's compute; ring attention's K/V (and dK/dV) hops, overlapped with
    the attention of the same layer."""
    n = layout.gpus
    link = hw.nvlink_bps if n <= hw.gpus_per_node else hw.network_bps
    pb = 2 if layout.shard == "deepspeed" else 4
    moved = 3 * pb * shape.params if layout.shard != "none" else 2 * 4 * shape.params
    seconds = max(0.0, moved * (n - 1) / n / link - compute_s)
    if layout.cp > 1:
        t = job.tokens_per_rank(layout.cp)
        ring = 3 * (layout.cp - 1) * t * 2 * shape.dtype_bytes * shape.kv_heads * shape.head_dim / link
        attn = 3 * attention_flops(shape, job, layout.cp) / (hw.flops * COMPUTE_EFFICIENCY)
        seconds += job.grad_accum * shape.layers * max(0.0, ring - attn)
    return seconds


def optimizer_seconds(shape: ModelShape, layout: Layout, hw: Hardware) -> float:
    """The AdamW step, not overlapped (the container overlaps part of it: an upper bound): on the
    device at ~HBM speed (negligible), on the host at the rank's share of DRAM bandwidth plus the
    gradient copy down and the parameter copy up, on NVMe plus reading and writing m, v."""
    if layout.optim_tier == "device":
        return 0.0
    shard = 1 if layout.shard == "none" else layout.gpus
    p = shape.params / shard
    rpn = _ranks_per_node(layout, hw)
    state = 8 * p
    seconds = ADAM_BYTES_PER_STATE_BYTE * state / (hw.host_bps / rpn) + 8 * p / hw.device_to_host_bps
    if layout.optim_tier == "nvme":
        seconds += state / (hw.nvme_read_bps / rpn) + state / (hw.nvme_write_bps / rpn)
    return seconds


def configured_layers(cfg: JobConfig, shape: ModelShape) -> list[LayerChoice]:
    """The layers a config runs as set: its activation.plan file or its uniform activation.* keys
    (alpha "auto" counted as 0, the least the host tier holds; tile_rows "auto" resolved)."""
    from longtrain.offload.plan import ActivationPlan, load_plan
    from longtrain.offload.tiles import resolve_tile_rows

    act = cfg.activation
    if act.plan is None and act.mode == "offload":
        return [LayerChoice("offload")] * shape.layers
    plan = (
        load_plan(act, shape.layers)
        if act.plan is not None
        else ActivationPlan.from_config(act, shape.layers)
    )
    t = config_tokens(cfg)
    out = []
    for layer in plan.layers:
        rows = resolve_tile_rows(layer.tile_rows, t, shape.hidden, shape.ffn)
        alpha = 0.0 if layer.alpha == "auto" else float(layer.alpha)
        out.append(LayerChoice(layer.mode, alpha, layer.tier, rows))
    return out


def configured_layout(cfg: JobConfig) -> Layout:
    """The layout a config asks for (world size: data_parallel x context_parallel, 1 when
    data_parallel is -1 and cp is 1; optim.offload auto and cxl counted as dram)."""
    par = cfg.parallel
    gpus = par.data_parallel * par.context_parallel if par.data_parallel > 0 else par.context_parallel
    tier = {"none": "device", "nvme": "nvme"}.get(cfg.optim.offload, "dram")
    return Layout(gpus, par.context_parallel, par.shard, tier)


def configured_memory(cfg: JobConfig, shape: ModelShape) -> dict[str, int]:
    """``memory_bytes`` of a config as set (the ``--dry-run`` figures)."""
    job = Job(cfg.train.seq_len, cfg.data.micro_batch_size, cfg.train.grad_accum)
    return memory_bytes(shape, configured_layout(cfg), job, configured_layers(cfg, shape))
