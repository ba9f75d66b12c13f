"""Record one decoder layer's allocation trace: ``record_layer(LayerShape(...)) -> Trace``.

The planner's input (MEMO §4.3.2 profiles one layer, since all layers are alike): every tensor
storage the layer's forward and backward allocate, with its size and the positions of its
allocation and its free in one event sequence, plus the layer's forward and backward times.

How it is recorded on a CPU device: a ``TorchDispatchMode`` sees every aten op's outputs;
an output whose storage it has not seen, that is not one of the op's inputs' storages (in-place and
view ops return those) and not one of the tensors that existed before (input, weights, rotary
tables), is an allocation. A ``weakref.finalize`` on the storage's Python object marks its free:
PyTorch keeps a storage's Python object alive exactly as long as its memory, so the finalizer runs
when the memory goes back to the allocator. Scratch memory an op frees before it returns is not
seen (a CUDA allocator trace would see it; an op-level arena cannot place it anyway). The backward
of a CPU graph runs on the calling thread, so the mode sees it too. (On the meta device the same layer runs other ops,
measured: 123 storages instead of 104 for Llama at 512 x 256, so traces are recorded on CPU.)

Event positions: allocations and frees share one counter; ``backward_start`` is its value when
``backward`` is called. A storage still alive at the end (the weight and input gradients, handed to
the optimizer) gets ``free == end``. Times come from separate runs without the mode (it costs a
Python call per op), the fastest of ``timing_runs``.
"""

from __future__ import annotations

import json
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from longtrain.trainer.model.hf import hf_config_from_sizes


@dataclass(frozen=True)
class Block:
    """One storage: ``size`` bytes, live on the event interval [alloc, free)."""

    size: int
    alloc: int
    free: int
    op: str  # the aten op that allocated it (for reading a trace, not used by the planner)
    dtype: str  # dtype and shape of the tensor that created the storage (the arena's view)
    shape: tuple[int, ...]


@dataclass
class Trace:
    """One layer's forward + backward allocations (``blocks`` in allocation order) and times."""

    blocks: list[Block]
    backward_start: int  # event position where backward begins
    end: int  # number of events
    forward_s: float = 0.0
    backward_s: float = 0.0
    meta: dict = field(default_factory=dict)  # the shape it was recorded at

    def live_bytes(self) -> list[int]:
        """Live bytes after each event."""
        delta = [0] * (self.end + 1)
        for b in self.blocks:
            delta[b.alloc] += b.size
            delta[b.free] -= b.size
        live, out = 0, []
        for d in delta[: self.end]:
            live += d
            out.append(live)
        return out

    def max_live_bytes(self) -> int:
        return max(self.live_bytes(), default=0)

    def phase(self, name: str) -> list[Block]:
        """The blocks a phase allocates, their lifetimes clipped to its window: "forward" (events
        before ``backward_start``) or "backward" (from there to the end). A tensor the forward saves
        for backward lives to the end of the forward window: the phase's arena holds it until the
        phase ends (where MEMO hands it to the rounding buffers)."""
        lo, hi = {"forward": (0, self.backward_start), "backward": (self.backward_start, self.end)}[name]
        return [
            Block(b.size, b.alloc, min(b.free, hi), b.op, b.dtype, b.shape)
            for b in self.blocks
            if lo <= b.alloc < hi
        ]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Trace:
        d = json.loads(text)
        d["blocks"] = [Block(**{**b, "shape": tuple(b["shape"])}) for b in d["blocks"]]
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        return cls.from_json(Path(path).read_text())


class AllocationRecorder(TorchDispatchMode):
    """The mode described in the module docstring; ``external`` storages are never recorded."""

    def __init__(self, external: list[Tensor]):
        super().__init__()
        self.events = 0
        self.backward_start = 0
        self._external = {t.untyped_storage()._cdata for t in external}
        self._live: dict[int, int] = {}  # storage _cdata -> index in self._rows
        self._rows: list[list] = []  # [size, alloc, free or None, op, dtype, shape]
        self._closed = False

    def _freed(self, key: int) -> None:
        if self._closed:
            return
        self._rows[self._live.pop(key)][2] = self.events
        self.events += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage()._cdata
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor) and not t.is_sparse
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, Tensor) or t.is_sparse:
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._live or key in self._external or key in inputs or storage.nbytes() == 0:
                continue
            self._live[key] = len(self._rows)
            self._rows.append([storage.nbytes(), self.events, None, str(func), str(t.dtype), tuple(t.shape)])
            self.events += 1
            weakref.finalize(storage, self._freed, key)
        return out

    def mark_backward(self) -> None:
        self.backward_start = self.events

    def close(self) -> tuple[list[Block], int]:
        """The blocks (alive ones freed at the end) and the end position; later frees are ignored."""
        self._closed = True
        end = self.events
        blocks = [Block(s, a, end if f is None else f, op, dt, sh) for s, a, f, op, dt, sh in self._rows]
        return blocks, end


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer of an HF model family at ``tokens`` rows (batch 1, one causal document)."""

    family: str = "llama"
    tokens: int = 1024
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    ffn: int | None = None  # None: the family default rounding of 8/3 hidden
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.hidden < 1:
            raise ValueError(f"tokens and hidden must be >= 1, got {self.tokens}, {self.hidden}")


def build_layer(shape: LayerShape, seed: int = 0):
    """(decoder layer, rotary embedding) of ``shape.family``, randomly initialised (no download)."""
    from longtrain.trainer.config import ModelConfig

    mcfg = ModelConfig(
        family=shape.family,
        hidden_size=shape.hidden,
        num_layers=1,
        num_heads=shape.heads,
        num_kv_heads=shape.kv_heads,
        intermediate_size=shape.ffn,
        vocab_size=128,
    )
    config = hf_config_from_sizes(mcfg, 128, shape.tokens)
    config._attn_implementation = "sdpa"
    module = {
        "llama": "transformers.models.llama.modeling_llama",
        "qwen2": "transformers.models.qwen2.modeling_qwen2",
        "mistral": "transformers.models.mistral.modeling_mistral",
    }[shape.family]
    import importlib

    mod = importlib.import_module(module)
    prefix = {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[shape.family]
    torch.manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    layer = getattr(mod, f"{prefix}DecoderLayer")(config, layer_idx=0).to(dtype)
    rotary = getattr(mod, f"{prefix}RotaryEmbedding")(config)
    return layer, rotary


def _inputs(shape: LayerShape, rotary) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor]:
    dtype = getattr(torch, shape.dtype)
    g = torch.Generator().manual_seed(1)
    x_bth = torch.randn(1, shape.tokens, shape.hidden, generator=g).to(dtype)
    dy_bth = torch.randn(1, shape.tokens, shape.hidden, generator=g).to(dtype)
    pos = torch.arange(shape.tokens)[None]
    with torch.no_grad():
        cos, sin = rotary(x_bth, pos)
    return x_bth.requires_grad_(), (cos, sin), dy_bth


def _step(layer, x_bth, rope, dy_bth, recorder: AllocationRecorder | None = None) -> tuple[float, float]:
    t0 = time.perf_counter()
    y_bth = layer(x_bth, position_embeddings=rope)
    t1 = time.perf_counter()
    if recorder is not None:
        recorder.mark_backward()
    y_bth.backward(dy_bth)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def record_layer(shape: LayerShape, timing_runs: int = 2, seed: int = 0) -> Trace:
    """The allocation trace of one forward + backward of a ``shape`` layer, and its times."""
    layer, rotary = build_layer(shape, seed)
    x_bth, rope, dy_bth = _inputs(shape, rotary)
    params = list(layer.parameters())
    # One warm step first: lazily built state (sdpa's choice, thread pools) is not the layer's.
    _step(layer, x_bth, rope, dy_bth)
    fwd, bwd = [], []
    for _ in range(timing_runs):
        layer.zero_grad(set_to_none=True)
        x_bth.grad = None
        f, b = _step(layer, x_bth, rope, dy_bth)
        fwd.append(f)
        bwd.append(b)
    layer.zero_grad(set_to_none=True)
    x_bth.grad = None
    recorder = AllocationRecorder([x_bth, dy_bth, *rope, *params])
    with recorder:
        _step(layer, x_bth, rope, dy_bth, recorder)
    blocks, end = recorder.close()
    return Trace(
        blocks=blocks,
        backward_start=recorder.backward_start,
        end=end,
        forward_s=min(fwd, default=0.0),
        backward_s=min(bwd, default=0.0),
        meta=asdict(shape),
    )
