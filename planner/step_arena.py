"""Level 2 of the arena plan: the whole step's device tensors around one block per layer pass,
``plan_step(shape, layout, job, layers) -> StepArena``.

Level 1 (layout.py) places the transient tensors of one layer's forward and of its backward; here
each layer's forward and each layer's backward is one block of that peak (DESIGN.md "Arena
planning", MEMO §4.3), and the step's other device tensors are placed around the blocks:

    slot        0      1 .. L        L+1    L+2 .. 2L+1         2L+2        2L+3
    runs     embedding  F_0 .. F_L-1  loss   B_L-1 .. B_0   embedding bwd  optimizer

    embedding    the embedding's output, the first layer's input: slots 0-1
    forward      F_i, layer i's forward (``forward_block_bytes``)
    held         what layer i holds from its forward to its backward (keep: everything autograd
                 saves; recompute: its input; ``estimate.activation_device_bytes``): end of F_i to
                 end of B_i
    swap         a token-wise (or offload) layer's offloaded bytes stay on the device until their
                 copy is waited for (``swap_bytes``). offload/tokenwise.py waits for token-wise
                 layer i's copies when the next token-wise layer at i+2 or above starts its
                 forward, or when i's own prefetch starts (it waits first): so the topmost
                 token-wise layer's copies complete before the loss, and the token-wise layer
                 right under it, when it is the layer directly below, stays in flight through the
                 loss until the topmost one's backward prefetches it. An offload layer's: until
                 F_i+2 starts (the last layer's: through the loss slot)
    loss         the final hidden states and their gradient, two fp32 [chunk, V] logits blocks
                 (estimate's ``loss`` less the LM-head gradient, placed with the gradients)
    prefetch     the whole tensors and first head rows of a token-wise layer, read back from its
                 tier while the layers above it run their backward (the topmost one from the end
                 of the forward, so through the loss slot): to the start of its B_j
    backward     B_i, layer i's backward transient (``estimate.layer_peak_bytes`` without the
                 prefetch, which is its own tensor here), ring buffers included
    grads        gradients as backward produces them (head's from the loss, layer i's from B_i,
                 the embedding's last) to the optimizer step; held through the step instead when
                 the estimate holds them (sharded states, accumulation)

The optimizer's staging slots are host memory (optim/container.py), so the optimizer slot holds
only the gradients on the device. The model states (parameters, optimizer state, autocast casts)
live for the whole step and are allocated once outside the arena.

The block sizes come from the cost model (estimate.py), since the full-size model is never run;
``plan_step(..., blocks=(forward, backward))`` takes level-1 peaks of a recorded trace instead
(every layer then the same). The layout is solved as level 1's is (layout.plan_layout: bound,
greedy, order search, MIP within ``time_limit_s``); ``layout.method`` says which one won. The
planner's verdict solves it ``quick`` (greedy and a bounded order search, no MIP: decide.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.offload.cost import split_row

from .estimate import (
    Job,
    LayerChoice,
    Layout,
    ModelShape,
    activation_device_bytes,
    activation_offloaded_bytes,
    layer_peak_bytes,
    memory_bytes,
)
from .layout import Item, lower_bound, plan_layout, rounded
from .layout import Layout as ArenaLayout

# steps of the order search in a quick solve: where greedy misses the bound, a few steps usually
# reach it (a 32-layer token-wise plan at 640K tokens: greedy 18% above, the search at the bound
# in 8 ms); each step is one compaction, about a millisecond for 32 layers
QUICK_SEARCH_STEPS = 200


@dataclass(frozen=True)
class Placed:
    """One level-2 tensor: its kind (the module docstring's names), the layer it belongs to (None:
    none) and its item."""

    kind: str
    layer: int | None
    item: Item


@dataclass(frozen=True)
class StepArena:
    tensors: tuple[Placed, ...]
    layout: ArenaLayout  # offsets in the order of ``tensors``
    slots: int  # event positions 0 .. slots-1 (the module docstring's table)

    @property
    def peak(self) -> int:
        return self.layout.peak

    @property
    def fragmentation(self) -> int:
        """Arena bytes above the most bytes live at once (0: the layout reaches the bound)."""
        return self.layout.peak - self.layout.lower_bound

    def summary(self) -> dict[str, object]:
        lay = self.layout
        return {
            "peak": lay.peak,
            "lower_bound": lay.lower_bound,
            "fragmentation": self.fragmentation,
            "greedy_peak": lay.greedy_peak,
            "method": lay.method,
            "mip_status": lay.mip_status,
            "solve_s": round(lay.solve_s, 3),
            "tensors": len(self.tensors),
        }


def forward_block_bytes(shape: ModelShape, t: int, c: LayerChoice) -> int:
    """One layer's forward at its peak: the tensors autograd saves are all live at its end (the
    executor offloads or drops them after), the attention part full-length and the row part over
    one tile (tiled: plus the whole output the tiles are written into). Against the level-1 bound
    of recorded CPU traces (``tests/unit/test_planner_step_arena.py``): within 1% for an fp32
    Llama layer; in bf16 the norms' fp32 intermediates, which autograd does not save, add ~24%
    (Qwen2, hidden 128) that this figure does not count."""
    rows = c.tile_rows or t
    attn_part = shape.whole_bytes + shape.qkv_bytes
    out = t * attn_part + rows * (shape.plain_bytes - attn_part)
    if c.tile_rows:
        out += t * shape.dtype_bytes * shape.hidden
    return out


def swap_bytes(shape: ModelShape, t: int, c: LayerChoice) -> int:
    """A token-wise layer's bytes still on the device when its forward ends: its whole tensors and
    its head rows, at most two tiles of them when tiled (offload/tokenwise.py lets two tiles'
    copies be in flight)."""
    if c.mode == "offload":
        return activation_offloaded_bytes(shape, t, c)
    a = split_row(c.alpha, t)
    if c.tile_rows:
        a = min(a, 2 * c.tile_rows)
    return t * shape.whole_bytes + a * shape.rows_bytes


def step_tensors(
    shape: ModelShape,
    layout: Layout,
    job: Job,
    layers: list[LayerChoice],
    blocks: tuple[int, int] | None = None,
) -> tuple[list[Placed], int]:
    """The module docstring's tensors and the number of slots; ``blocks``: (forward, backward)
    bytes of every layer's blocks (level-1 peaks) instead of the cost model's."""
    n = len(layers)
    t = job.tokens_per_rank(layout.cp)
    e, h = shape.dtype_bytes, shape.hidden
    mem = memory_bytes(shape, layout, job, layers)
    ring = mem["cp_buffers"]
    loss_slot, emb_bwd, end = n + 1, 2 * n + 2, 2 * n + 4  # 2n + 3: the optimizer

    def fwd(i: int) -> int:  # slot of F_i (F_n: the loss)
        return 1 + i

    def bwd(i: int) -> int:  # slot of B_i
        return n + 2 + (n - 1 - i)

    out: list[Placed] = []

    def add(kind: str, layer: int | None, size: int, start: int, stop: int) -> None:
        if size > 0 and stop > start:
            out.append(Placed(kind, layer, Item(size, start, stop)))

    # prefetch of each token-wise layer j: from the backward of the next token-wise layer above
    # it (from the end of the forward, before the loss, for the topmost) to its own backward
    tokenwise = [i for i, c in enumerate(layers) if c.mode == "tokenwise"]
    fetch_from: dict[int, int] = {}
    above = loss_slot
    for j in reversed(tokenwise):
        fetch_from[j] = above
        above = bwd(j)

    add("embedding", None, t * e * h, 0, fwd(0) + 1)
    for i, c in enumerate(layers):
        f_bytes = blocks[0] if blocks else forward_block_bytes(shape, t, c)
        b_bytes = blocks[1] if blocks else layer_peak_bytes(shape, t, c, None)
        add("forward", i, f_bytes + ring, fwd(i), fwd(i) + 1)
        add("held", i, activation_device_bytes(shape, t, c), fwd(i) + 1, bwd(i) + 1)
        if c.mode == "tokenwise":
            # offload/tokenwise.py waits for layer i's copies when the next token-wise layer at
            # i + 2 or above starts its forward, or when its own prefetch starts (which waits
            # first), whichever comes first: the topmost token-wise layer's before the loss
            waited = next((fwd(j) for j in tokenwise if j >= i + 2), fetch_from[i])
            add("swap", i, swap_bytes(shape, t, c), fwd(i) + 1, min(waited, fetch_from[i]))
        elif c.mode == "offload":
            add("swap", i, swap_bytes(shape, t, c), fwd(i) + 1, min(fwd(i + 2), loss_slot + 1))
        add("backward", i, b_bytes + ring, bwd(i), bwd(i) + 1)
    for j in tokenwise:
        c = layers[j]
        head = min(split_row(c.alpha, t), c.tile_rows or t)
        add("prefetch", j, t * shape.whole_bytes + head * shape.rows_bytes, fetch_from[j], bwd(j))
    head_v = 4 * shape.vocab * h
    add("loss", None, mem["loss"] - head_v, loss_slot, loss_slot + 1)
    if mem["grads_held"]:
        add("grads", None, mem["grads_held"], 0, end)
    else:
        untied = shape.other_params >= 2 * shape.vocab * shape.hidden
        embedding = shape.vocab * shape.hidden if untied else 0
        add("grads", None, 4 * (shape.other_params - embedding), loss_slot, end)
        for i in range(n):
            add("grads", i, 4 * shape.layer_params, bwd(i), end)
        add("grads", None, 4 * embedding, emb_bwd, end)
    assert all(it.item.end <= end for it in out)
    return out, end


def plan_step(
    shape: ModelShape,
    layout: Layout,
    job: Job,
    layers: list[LayerChoice],
    blocks: tuple[int, int] | None = None,
    time_limit_s: float = 10.0,
    quick: bool = False,
) -> StepArena:
    """The level-2 layout of one micro-batch's step (module docstring); ``quick``: greedy and one
    pass of ``QUICK_SEARCH_STEPS`` of the order search, no MIP (``layout.plan_layout``), as the
    planner's search solves it: bounded work, the same layout on any machine load."""
    tensors, slots = step_tensors(shape, layout, job, layers, blocks)
    items = [x.item for x in tensors]
    if quick:
        arena = plan_layout(items, time_limit_s=time_limit_s, search_steps=QUICK_SEARCH_STEPS, quick=True)
    else:
        arena = plan_layout(items, time_limit_s=time_limit_s)
    return StepArena(tuple(tensors), arena, slots)


def step_lower_bound(
    shape: ModelShape,
    layout: Layout,
    job: Job,
    layers: list[LayerChoice],
    blocks: tuple[int, int] | None = None,
) -> int:
    """The most bytes of ``plan_step``'s tensors live at one slot, sizes rounded as the layout
    rounds them: no level-2 peak is below it (``plan_step(...).layout.lower_bound``, without
    solving the layout; about a millisecond for 32 layers)."""
    tensors, _ = step_tensors(shape, layout, job, layers, blocks)
    return lower_bound([Item(rounded(x.item.size), x.item.start, x.item.end) for x in tensors])
