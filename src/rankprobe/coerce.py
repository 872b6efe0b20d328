"""Typed values from TOML files and command-line text: the coercion behind config.from_dict and the
dotted overrides, and the "unknown key; did you mean ..." message. No torch, no config tree: pure
functions of a value, a type annotation and the dotted key to name in errors."""

from __future__ import annotations

import difflib
import tomllib
import typing

from .errors import ConfigError


def coerce(value, tp, key: str):
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list; got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} entries; got {len(value)}")
            return tuple(coerce(v, a, key) for v, a in zip(value, args))
        return [coerce(v, args[0], key) for v in value]
    if origin is dict:  # dict[str, object]: keyword arguments; dict[str, dict]: tables keyed by arm
        return table(value, key, names=typing.get_args(tp)[1] is object)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key} must be true or false; got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
            try:
                f = float(value.replace("_", ""))
            except ValueError:
                raise ConfigError(f"{key} must be an integer; got {value!r}") from None
            if f.is_integer():
                return int(f)
        raise ConfigError(f"{key} must be an integer; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number; got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, bool):  # `compile = true` in TOML reads as the choice "true"
            return str(value).lower()
        raise ConfigError(f"{key} must be a string; got {value!r}")
    raise TypeError(f"unsupported config type {tp} for {key}")


def table(value, key: str, names: bool = True) -> dict:
    """A TOML table (from a file) or its inline text (from a dotted override, '{betas = [0.9, 0.99]}');
    `names`: its keys must be argument names, else each value must itself be a table."""
    if isinstance(value, str):
        try:
            value = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            raise ConfigError(f"{key} must be a TOML table such as '{{betas = [0.9, 0.99]}}'; got {value!r}") \
                from None
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be a table of keyword arguments; got {value!r}")
    if names and not all(isinstance(k, str) and k.isidentifier() for k in value):
        raise ConfigError(f"{key}: every key must be an argument name; got {list(value)}")
    if not names and not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"{key}: every value must be a table of dotted keys; got {value!r}")
    return dict(value)


def unknown_key(key: str, valid: list[str]) -> ConfigError:
    """'unknown config key X; did you mean Y?' with Y the nearest key or section by spelling."""
    sections = sorted({v.split(".")[0] for v in valid if "." in v})
    pool = valid if "." in key else valid + sections
    near = difflib.get_close_matches(key, pool, n=1, cutoff=0.6)
    if not near:  # right leaf in the wrong section, e.g. train.seeds -> sweep.seeds
        leaf = key.rsplit(".", 1)[-1]
        near = [v for v in valid if v.rsplit(".", 1)[-1] in difflib.get_close_matches(
            leaf, [w.rsplit(".", 1)[-1] for w in valid], n=1)][:1]
    return ConfigError(f"unknown config key {key}" + (f"; did you mean {near[0]}?" if near else ""))
