"""Typed config of the activation-memory techniques (the ``activation.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.config_checks import check_fields, option

MODES = ("none", "recompute", "offload", "tokenwise")
TIERS = ("host", "file")


@dataclass
class ActivationConfig:
    """How saved activations are kept for backward.

    mode: none (autograd keeps everything on the device) | recompute (full layer recompute,
        torch.utils.checkpoint) | offload (every saved tensor to the host tier) | tokenwise (MEMO:
        layer input and attention output offloaded whole, the first alpha*s token rows of the other
        saved tensors offloaded, the rest recomputed before the layer's backward).
    alpha: fraction of token rows offloaded in tokenwise mode, in [0, 1], or "auto" (largest value
        whose copy time hides behind the layer's forward and whose host bytes fit host_budget_bytes).
    tier: host (DRAM; pinned on CUDA) | file (a file-backed store under file_dir, so resident
        memory really falls on a CPU machine).
    keep_last: the last layers are never offloaded (their backward follows at once).
    file_dir: directory of the file tier (default: <output_dir>/activation_swap).
    host_budget_bytes: cap on host/file-tier activation bytes for alpha="auto" (default: half of
        the available memory).
    trim_heap: hand freed heap pages back to the OS at layer boundaries (glibc malloc_trim), so a
        CPU process's RSS follows the bytes it holds: every offloaded layer's in tokenwise mode,
        every layer's in the other modes. auto: on for the tokenwise file tier on a CPU device;
        true: on in every mode (see offload/heap.py).
    """

    mode: str = option("none", choices=MODES)
    alpha: float | str = option("auto", min=0.0, max=1.0, choices=("auto",))
    tier: str = option("host", choices=TIERS)
    keep_last: int = option(2, min=0)
    file_dir: str | None = None
    host_budget_bytes: int | None = option(None, min=1)
    trim_heap: bool | str = option("auto", choices=("auto",))

    def __post_init__(self) -> None:
        check_fields(self, "activation")
