"""Typed config of the activation-memory techniques (the ``activation.*`` keys)."""

from __future__ import annotations

from dataclasses import dataclass

from longtrain.config_checks import ConfigError, check_fields, option

MODES = ("none", "recompute", "offload", "tokenwise")
TIERS = ("host", "file")


TILED_MODES = ("recompute", "tokenwise")  # the modes whose layers run on row tiles


def check_tile_rows(key: str, tile_rows: int | str, mode: str, mode_key: str) -> None:
    """Tiles need a mode that drops a tile's saved tensors (tokenwise, recompute): a plan file that
    gives a keep layer tiles contradicts itself."""
    if tile_rows != 0 and mode not in TILED_MODES:
        raise ConfigError(
            f"{key}={tile_rows} needs {mode_key} tokenwise or recompute (tiles of a layer whose saved "
            f"tensors all stay on the device save nothing), got {mode_key}={mode}; set {key}=0"
        )


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
    plan: a JSON file with one entry per decoder layer (mode keep / recompute / tokenwise, alpha,
        tier, tile_rows; schema in docs/activation_memory.md), as the memory planner writes it.
        When set, it decides every layer: mode, alpha, tier, keep_last and tile_rows are not read.
    tile_rows: rows per tile of the row-wise parts (norms, projections, RoPE, MLP), so one layer's
        transient memory grows with tile_rows x intermediate_size instead of seq x intermediate_size;
        0 = the whole sequence; "auto" = the largest tile whose MLP intermediates are no larger than
        the layer input (at least 256 rows). Rounded down to a multiple of 8 rows (offload/tiles.py).
        Read by modes tokenwise and recompute (as keep_last, it is not read by none and offload,
        so a recipe with tiles can be switched to mode=none without touching it).
    file_dir: directory of the file tier (default: <output_dir>/activation_swap).
    host_budget_bytes: cap on each tier's activation bytes for alpha="auto" (default: half of the
        available memory for the host tier, 90% of the free disk for the file tier).
    trim_heap: hand freed heap pages back to the OS at layer boundaries (glibc malloc_trim), so a
        CPU process's RSS follows the bytes it holds: every offloaded layer's in tokenwise mode,
        every layer's in the other modes. auto: on for the tokenwise file tier on a CPU device;
        true: on in every mode (see offload/heap.py).
    link_gbps: an emulated device<->host link of this many GB/s (1e9 bytes/s) for the tokenwise
        tiers on a CPU device, where device and host are the same memory: every copy takes at least
        bytes / bandwidth (offload/link.py). null: no emulation (the real copy speed).
    """

    mode: str = option("none", choices=MODES)
    alpha: float | str = option("auto", min=0.0, max=1.0, choices=("auto",))
    tier: str = option("host", choices=TIERS)
    keep_last: int = option(2, min=0)
    plan: str | None = option(None, nonempty=True)
    tile_rows: int | str = option(0, min=0, choices=("auto",))
    file_dir: str | None = None
    host_budget_bytes: int | None = option(None, min=1)
    trim_heap: bool | str = option("auto", choices=("auto",))
    link_gbps: float | None = option(None, min=0.0, min_open=True)

    def __post_init__(self) -> None:
        check_fields(self, "activation")
        if self.link_gbps is not None and self.mode != "tokenwise" and self.plan is None:
            raise ConfigError(
                f"activation.link_gbps emulates the link of the tokenwise tiers, but activation.mode={self.mode}; "
                "set activation.mode=tokenwise (or activation.plan) or activation.link_gbps=null"
            )
