"""Recipe YAML + Hydra-syntax overrides -> a validated ``JobConfig``.

Composition is a pure function of (recipe file, override list): every torchrun rank computes the
same config and nothing is written (no ``@hydra.main`` run directories, no chdir). Overrides are
parsed by Hydra's own override parser, so ``key=value``, ``~key`` and ``+key=value`` (inside
free-form mappings) mean what they mean in Hydra; interpolations such as ``${output_dir}`` are
resolved by OmegaConf.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import ConfigError, JobConfig

RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(recipe: str) -> Path:
    """A recipe name from recipes/ or a path to a YAML file."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") or path.parent != Path("."):
        if not path.is_file():
            raise ConfigError(
                f"recipe file {recipe!r} does not exist; pass a recipe name or an existing YAML path"
            )
        return path
    candidate = RECIPES_DIR / f"{recipe}.yaml"
    if not candidate.is_file():
        names = available_recipes()
        close = difflib.get_close_matches(recipe, names, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown recipe {recipe!r}{hint}; available recipes: {', '.join(names)}")
    return candidate


def _schema(cls: type) -> dict[str, Any]:
    """Nested dict of field name -> sub-schema (dataclass) or None (leaf)."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: _schema(hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else None
        for f in dataclasses.fields(cls)
    }


def _unknown_key_error(key: str, section: dict[str, Any], prefix: str) -> ConfigError:
    full_names = [f"{prefix}{name}" for name in section]
    close = difflib.get_close_matches(key, full_names, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid keys here: {', '.join(full_names)}"
    return ConfigError(f"unknown config key {key!r}; {hint}")


def _check_keys(node: Any, schema: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(node, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'the recipe'} must be a mapping, got {node!r}")
    for key, value in node.items():
        if key == "defaults":
            continue
        full = f"{prefix}{key}"
        if key not in schema:
            raise _unknown_key_error(full, schema, prefix)
        if schema[key] is not None:
            _check_keys(value, schema[key], f"{full}.")


def _check_override_key(key: str, schema: dict[str, Any]) -> None:
    section, prefix = schema, ""
    for part in key.split("."):
        if section is None or part not in section:
            raise _unknown_key_error(key, section or {}, prefix)
        section, prefix = section[part], f"{prefix}{part}."


def _coerce(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    """Build the dataclass tree; every dataclass checks its own fields (``longtrain.config_checks``)."""
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        key, value, hint = f"{prefix}{f.name}", values[f.name], hints[f.name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section (keys {key}.*), got {value!r}")
            kwargs[f.name] = _coerce(cast(type, hint), value, f"{key}.")  # a field's hint: a class
        else:
            kwargs[f.name] = value
    return cls(**kwargs)


def _load_recipe(path: Path) -> Any:
    try:
        return OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:  # a syntax error: where it is, in an editor's 1-based terms
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = e.problem or e.context or "invalid YAML"
        raise ConfigError(f"recipe {str(path)!r}{where}: {what} (YAML syntax)") from None
    except (yaml.YAMLError, OmegaConfBaseException, OSError, ValueError) as e:
        raise ConfigError(f"cannot read recipe {str(path)!r}: {str(e).splitlines()[0]}") from None


def compose(recipe: str, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Compose and validate the job config of ``recipe`` with Hydra-syntax ``overrides``."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    path = resolve_recipe(recipe)
    schema = _schema(JobConfig)
    recipe_cfg = _load_recipe(path)
    recipe_dict = OmegaConf.to_container(recipe_cfg, resolve=False) or {}
    if not isinstance(recipe_dict, dict):
        raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping of config keys")
    if any(d != "_self_" for d in recipe_dict.get("defaults", None) or []):
        raise ConfigError(
            f"recipe {str(path)!r} has a Hydra defaults list, which longtrain does not compose; "
            "put all keys in one file (overrides go on the command line)"
        )
    _check_keys(recipe_dict, schema)
    recipe_dict.pop("defaults", None)

    cfg = OmegaConf.merge(OmegaConf.create(dataclasses.asdict(JobConfig())), OmegaConf.create(recipe_dict))
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as e:
        raise ConfigError(f"bad override: {str(e).splitlines()[0]}") from None
    for ov in parsed:
        key = ov.key_or_group
        if ov.is_sweep_override():
            raise ConfigError(f"override {ov.input_line!r} is a sweep; longtrain runs one job per command")
        _check_override_key(key, schema)
        if ov.is_delete():
            default = OmegaConf.select(OmegaConf.create(dataclasses.asdict(JobConfig())), key)
            OmegaConf.update(cfg, key, default, merge=False)
        else:
            OmegaConf.update(cfg, key, ov.value(), merge=False)
    try:
        values = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot resolve config: {str(e).splitlines()[0]}") from None
    return _coerce(JobConfig, cast(dict[str, Any], values))  # a DictConfig's container: a dict


def to_yaml(cfg: JobConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(cfg)))
