"""Typed config of the activation-memory techniques (the ``activation.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass

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

    mode: str = "none"
    alpha: float | str = "auto"
    tier: str = "host"
    keep_last: int = 2
    file_dir: str | None = None
    host_budget_bytes: int | None = None
    trim_heap: bool | str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"activation.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.tier not in TIERS:
            raise ValueError(f"activation.tier must be one of {', '.join(TIERS)}, got {self.tier!r}")
        if isinstance(self.alpha, str):
            if self.alpha != "auto":
                raise ValueError(f"activation.alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}")
        elif (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, int | float)
            or not 0.0 <= self.alpha <= 1.0
        ):
            raise ValueError(f"activation.alpha must be in [0, 1], got {self.alpha}")
        else:
            self.alpha = float(self.alpha)
        if isinstance(self.keep_last, bool) or not isinstance(self.keep_last, int) or self.keep_last < 0:
            raise ValueError(f"activation.keep_last must be an int >= 0, got {self.keep_last!r}")
        if not (isinstance(self.trim_heap, bool) or self.trim_heap == "auto"):
            raise ValueError(f"activation.trim_heap must be true, false or 'auto', got {self.trim_heap!r}")
        if self.host_budget_bytes is not None and (
            isinstance(self.host_budget_bytes, bool)
            or not isinstance(self.host_budget_bytes, int)
            or self.host_budget_bytes <= 0
        ):
            raise ValueError(
                f"activation.host_budget_bytes must be a positive int or null, got {self.host_budget_bytes!r}"
            )
