"""The per-layer activation plan: what each decoder layer keeps for backward, and where.

    ActivationPlan.from_config(cfg, num_layers)   # a uniform activation.* config
    load_plan(cfg, num_layers)                    # activation.plan=FILE.json (the planner writes these)

One executor (``tokenwise.TokenwiseExecutor``) runs any plan, layer modes in any order:

    keep        autograd keeps the layer's saved tensors on the device (plain autograd)
    recompute   torch.utils.checkpoint: the layer input is kept, the layer re-run in backward
    tokenwise   MEMO token-wise swap/recompute with the layer's own alpha and tier

A uniform config is the plan whose last ``keep_last`` layers are ``keep`` and the others
``tokenwise`` at ``alpha`` and ``tier``. The file format (one object per decoder layer, in order):

    {"layers": [
      {"mode": "tokenwise", "alpha": 0.3, "tier": "host"},
      {"mode": "recompute"},
      {"mode": "tokenwise", "alpha": "auto", "tier": "file", "tile_rows": 0},
      {"mode": "keep"}
    ]}

``mode`` is required; ``alpha`` (default "auto") and ``tier`` (default "host") are read for
tokenwise layers only, ``tile_rows`` (default 0; rows per tile or "auto") for tokenwise and
recompute layers (a keep layer with tiles is an error). Every error is one ConfigError line naming the
file, the layer and the field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from longtrain.config_checks import ConfigError, check_fields, option

from .config import TIERS, ActivationConfig, check_tile_rows

LAYER_MODES = ("keep", "recompute", "tokenwise")


@dataclass
class LayerPlan:
    """One decoder layer: mode (keep / recompute / tokenwise); for tokenwise its alpha (in [0, 1]
    or "auto") and tier (host / file); for tokenwise and recompute its tile_rows (0 = the whole
    sequence, "auto", or rows per tile). Checked when it becomes part of an ``ActivationPlan``
    (whose errors name the layer)."""

    mode: str = option("tokenwise", choices=LAYER_MODES)
    alpha: float | str = option("auto", min=0.0, max=1.0, choices=("auto",))
    tier: str = option("host", choices=TIERS)
    tile_rows: int | str = option(0, min=0, choices=("auto",))


LAYER_FIELDS = tuple(f.name for f in fields(LayerPlan))


@dataclass
class ActivationPlan:
    """Per-layer modes plus what all tokenwise layers share (as in ``ActivationConfig``): the file
    tier's directory, each tier's byte budget for alpha="auto", heap trimming, the emulated link."""

    layers: tuple[LayerPlan, ...]
    file_dir: str | None = None
    host_budget_bytes: int | None = option(None, min=1)
    trim_heap: bool | str = option("auto", choices=("auto",))
    link_gbps: float | None = option(None, min=0.0, min_open=True)

    def __post_init__(self) -> None:
        self.layers = tuple(self.layers)
        check_fields(self, "activation")
        for i, layer in enumerate(self.layers):
            key = f"activation.plan.layers[{i}]"
            if not isinstance(layer, LayerPlan):
                raise ConfigError(f"{key} must be a LayerPlan, got {layer!r}")
            check_fields(layer, key)
            check_tile_rows(f"{key}.tile_rows", layer.tile_rows, layer.mode, f"{key}.mode")

    @classmethod
    def from_config(cls, cfg: ActivationConfig, num_layers: int) -> ActivationPlan:
        """The plan of a uniform config: mode tokenwise -> the last keep_last layers kept, the others
        tokenwise at cfg.alpha / cfg.tier; recompute -> every layer recomputed; none -> every layer kept."""
        if cfg.mode not in ("none", "recompute", "tokenwise"):
            raise ConfigError(
                f"activation.mode={cfg.mode} has no per-layer plan; use none, recompute or tokenwise"
            )
        n_tokenwise = max(0, num_layers - cfg.keep_last) if cfg.mode == "tokenwise" else 0

        def layer(i: int) -> LayerPlan:
            if i < n_tokenwise:
                return LayerPlan("tokenwise", cfg.alpha, cfg.tier, cfg.tile_rows)
            if cfg.mode == "recompute":
                return LayerPlan("recompute", tile_rows=cfg.tile_rows)
            return LayerPlan("keep")

        layers = tuple(layer(i) for i in range(num_layers))
        return cls(layers, **_shared(cfg))

    def tiers(self) -> list[str]:
        """The tiers of the tokenwise layers, in the order they first appear."""
        return list(dict.fromkeys(layer.tier for layer in self.layers if layer.mode == "tokenwise"))

    def check_layer_count(self, num_layers: int, where: str = "activation.plan") -> None:
        if len(self.layers) != num_layers:
            raise ConfigError(
                f"{where} has {len(self.layers)} layers but the model has {num_layers}; "
                "the plan needs one entry per decoder layer"
            )


def _shared(cfg: ActivationConfig) -> dict[str, Any]:
    return {
        "file_dir": cfg.file_dir,
        "host_budget_bytes": cfg.host_budget_bytes,
        "trim_heap": cfg.trim_heap,
        "link_gbps": cfg.link_gbps,
    }


def plan_from_json(data: Any, num_layers: int, cfg: ActivationConfig, where: str) -> ActivationPlan:
    """The plan a parsed plan file describes (``where`` names the file in errors)."""
    if not isinstance(data, dict) or "layers" not in data:
        raise ConfigError(
            f'{where} must be a JSON object {{"layers": [...]}} with one entry per decoder layer'
        )
    unknown = sorted(set(data) - {"layers"})
    if unknown:
        raise ConfigError(f'{where}: unknown key(s) {unknown}; a plan has only "layers"')
    entries = data["layers"]
    if not isinstance(entries, list):
        raise ConfigError(f'{where}: "layers" must be a list with one object per decoder layer')
    if len(entries) != num_layers:
        raise ConfigError(
            f"{where} has {len(entries)} layers but the model has {num_layers}; "
            "the plan needs one entry per decoder layer"
        )
    layers = []
    for i, entry in enumerate(entries):
        key = f"activation.plan.layers[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: {key} must be an object with a mode, got {entry!r}")
        unknown = sorted(set(entry) - set(LAYER_FIELDS))
        if unknown:
            raise ConfigError(
                f"{where}: {key} has unknown field(s) {unknown}; valid fields: {', '.join(LAYER_FIELDS)}"
            )
        if "mode" not in entry:
            raise ConfigError(f"{where}: {key}.mode is missing (one of {', '.join(LAYER_MODES)})")
        layers.append(LayerPlan(**entry))
    try:
        return ActivationPlan(tuple(layers), **_shared(cfg))
    except ConfigError as e:  # a layer's field: name the file too
        raise ConfigError(f"{where}: {e}") from None


def load_plan(cfg: ActivationConfig, num_layers: int) -> ActivationPlan:
    """Read ``cfg.plan`` (a JSON file, schema in the module docstring) for a model of ``num_layers``
    decoder layers; file_dir, host_budget_bytes, trim_heap and link_gbps come from ``cfg``."""
    assert cfg.plan is not None
    where = f"activation.plan {cfg.plan}"
    try:
        text = Path(cfg.plan).read_text()
    except OSError as e:
        raise ConfigError(
            f"{where} cannot be read ({e.strerror}); point activation.plan at a plan file"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    return plan_from_json(data, num_layers, cfg, where)
