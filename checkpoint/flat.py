"""A state (nested dicts, lists, tuples of tensors, numbers, strings, None) as named tensors plus a
JSON tree, and back: what a snapshot slot stores (never pickle: a slot's bytes are data only).

In the tree a tensor is ``{"T": name}``, a tuple ``{"tuple": [...]}``, a dict whose keys are not
all strings (an optimizer state is keyed by parameter index) ``{"items": [[key, value], ...]}``,
a plain dict ``{"dict": {...}}``. Python floats round-trip JSON exactly (repr), inf and nan
included.
"""

from __future__ import annotations

from typing import Any

import torch

_SCALARS = (bool, int, float, str, type(None))


def flatten(state: Any, prefix: str) -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors named ``prefix/...``, the JSON tree that refers to them)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(obj: Any, path: str) -> Any:
        if isinstance(obj, torch.Tensor):
            tensors[path] = obj.detach()
            return {"T": path}
        if isinstance(obj, _SCALARS):
            return obj
        if isinstance(obj, tuple):
            return {"tuple": [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, dict):
            if all(isinstance(k, str) for k in obj):
                return {"dict": {k: walk(v, f"{path}/{k}") for k, v in obj.items()}}
            if all(isinstance(k, _SCALARS) for k in obj):
                return {"items": [[k, walk(v, f"{path}/{k}")] for k, v in obj.items()]}
        raise TypeError(f"snapshot: {path} is a {type(obj).__name__}, which a snapshot cannot hold")

    return tensors, walk(state, prefix)


def unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The state ``flatten`` was given, its tensors taken from ``tensors``."""
    if isinstance(tree, list):
        return [unflatten(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "T" in tree:
        return tensors[tree["T"]]
    if "tuple" in tree:
        return tuple(unflatten(v, tensors) for v in tree["tuple"])
    if "items" in tree:
        return {k: unflatten(v, tensors) for k, v in tree["items"]}
    return {k: unflatten(v, tensors) for k, v in tree["dict"].items()}
