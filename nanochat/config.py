"""Stage configuration: dataclass defaults < profile < config file < NANOCHAT_* env < --flags.

Each stage declares a dataclass subclassing StageConfig; `parse_config` builds an argparse parser
from its fields (so `--help` lists every key with its default and help text) and validates
everything before any work starts. Unknown keys and wrong types are one-line errors that name the
key and what is accepted.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import os
import sys
import types
import typing
from dataclasses import dataclass, field

from nanochat import profiles

ENV_PREFIX = "NANOCHAT_"


class ConfigError(ValueError):
    """Bad configuration: the message names the key and the accepted values."""


def opt(default, help: str = "", choices=None, hash: bool = True):
    """A config field with help text; hash=False keeps it out of the config hash (e.g. ports)."""
    return field(default=default, metadata={"help": help, "choices": choices, "hash": hash})


@dataclass
class StageConfig:
    """Keys every stage accepts."""
    store: str = opt("", "artifact store URI: file:///dir or s3://bucket/prefix ('' = ~/.cache/nanochat/runs/default)", hash=False)
    profile: str = opt("auto", "named flag set for all stages: " + ", ".join(profiles.names()) + " (auto: tiny without a GPU)", hash=False)
    config: str = opt("", "YAML/JSON config file: top-level common keys and per-stage sections", hash=False)
    seed: int = opt(42, "random seed")
    device: str = opt("auto", "torch device: auto, cpu, cuda", hash=False)
    dtype: str = opt("auto", "precision: auto (bfloat16 on SM80+ GPUs; bf16-mixed for training on CPUs whose bf16 matmuls measure >=1.3x fp32's; "
                              "else float32), float32, bfloat16, bf16-mixed (fp32 weights and activations, training matmuls in bf16)",
                     choices=["auto", "float32", "bfloat16", "bf16-mixed"])
    metrics_port: int = opt(0, "serve Prometheus /metrics on this port while running (0 = off; local rank is added)", hash=False)
    force: bool = opt(False, "re-run even if done.json says this exact config already finished", hash=False)

    def validate(self):
        """Stages override to check ranges; raise ConfigError naming the flag."""

    def check_world_size(self, world_size: int):
        """Stages that split a batch across processes override: raise ConfigError when it does not split evenly
        (checked before any work by the runner and the operator, and again by the stage itself)."""

    def instance_name(self, stage: str) -> str:
        """Name of this stage run in the store (stages/<name>/...); chat_eval overrides it per source."""
        return stage


def batch_split_error(total_batch: int, device_batch_size: int, seq_len: int, world_size: int) -> str | None:
    """Why a token batch does not split into whole micro-batches over the processes (None when it does)."""
    per_micro = device_batch_size * seq_len * world_size
    if total_batch > 0 and total_batch % per_micro:
        return (f"--total-batch-size {total_batch} must be a multiple of device_batch_size × max_seq_len × processes "
                f"({device_batch_size} × {seq_len} × {world_size} = {per_micro})")
    return None


COMMON_KEYS = {f.name for f in dataclasses.fields(StageConfig)}


def _base_type(tp):
    """Unwrap Optional[X] / X | None to X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def coerce(key: str, value, tp, choices=None):
    """Convert a flag/env/file value to the field's type, or raise ConfigError naming the key."""
    tp = _base_type(tp)
    if value is None:
        return None
    try:
        if tp is bool:
            if isinstance(value, bool):
                out = value
            elif str(value).lower() in ("1", "true", "yes", "on"):
                out = True
            elif str(value).lower() in ("0", "false", "no", "off"):
                out = False
            else:
                raise ValueError
        elif tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            out = int(value) if not isinstance(value, str) else int(float(value)) if "e" in value.lower() else int(value, 0)
        elif tp is float:
            out = float(value)
        elif tp is str:
            out = str(value)
        else:
            out = value
    except (TypeError, ValueError, OverflowError):  # OverflowError: --seed=1e999 (int of an infinite float)
        kind = {bool: "a boolean (true/false)", int: "an integer", float: "a number"}.get(tp, tp.__name__)
        raise ConfigError(f"--{key.replace('_', '-')}: expected {kind}, got {value!r}") from None
    if choices and out not in choices:
        raise ConfigError(f"--{key.replace('_', '-')}: {out!r} is not one of: {', '.join(map(str, choices))}")
    return out


def _fields(cls) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _unknown(key: str, known, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean --{close[0].replace('_', '-')}?)" if close else ""
    return ConfigError(f"unknown key --{key.replace('_', '-')} {where}{hint}; run with --help to list the accepted keys")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The stage's docstring as written (its example commands stay on their own lines), defaults shown."""


def build_parser(cls, stage: str, defaults: dict | None = None) -> argparse.ArgumentParser:
    hints = typing.get_type_hints(cls)
    doc = (sys.modules[cls.__module__].__doc__ or "").strip()
    p = _Parser(prog=f"nanochat stage {stage}", description=doc, allow_abbrev=False, formatter_class=_HelpFormatter,
                epilog="Every key can also come from a config file (--config), the profile (--profile) or an env var "
                       f"{ENV_PREFIX}<KEY>; flags win.\nPrecedence: defaults < profile < config file < env < flags.")
    defaults = defaults or {}
    for name, f in _fields(cls).items():
        dash = name.replace("_", "-")
        flags = [f"--{dash}"] + ([f"--{name}"] if dash != name else [])
        tp = _base_type(hints[name])
        default = defaults.get(name, f.default)
        kw = dict(dest=name, default=argparse.SUPPRESS, help=f.metadata.get("help", "") + f" (default: {default!r})")
        if tp is bool:
            p.add_argument(*flags, nargs="?", const=True, metavar="BOOL", **kw)
            p.add_argument(f"--no-{dash}", dest=name, action="store_const", const=False, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            p.add_argument(*flags, metavar=tp.__name__.upper() if hasattr(tp, "__name__") else "VALUE", **kw)
    return p


def _prescan(argv: list[str], key: str) -> str | None:
    """Find --key=value / --key value in argv before full parsing (profile and config pick the layers)."""
    for i, a in enumerate(argv):
        if a == f"--{key}" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(f"--{key}="):
            return a.split("=", 1)[1]
    return None


def load_config_file(path: str) -> dict:
    import yaml
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) if not path.endswith(".json") else json.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"--config: file not found: {path}") from None
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"--config: cannot parse {path}: {e}".splitlines()[0]) from None
    except UnicodeDecodeError:
        raise ConfigError(f"--config: {path} is not a UTF-8 text file") from None
    except OSError as e:  # a directory, no permission, a device that refuses reads
        raise ConfigError(f"--config: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # open() refuses a path with a NUL byte
        raise ConfigError(f"--config: cannot read {path!r}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must be a mapping of keys (and per-stage sections)")
    return data


def _file_layer(data: dict, stage: str, fields: dict, path: str) -> dict:
    """Top-level common keys + this stage's section; sections of other stages are ignored."""
    from nanochat.pipeline import stage_names
    stages = set(stage_names())
    out = {}
    for k, v in data.items():
        k = k.replace("-", "_")
        if k in stages or k == stage:
            if k == stage:
                if not isinstance(v, dict):
                    raise ConfigError(f"--config: section {k!r} in {path} must be a mapping")
                for sk, sv in v.items():
                    sk = sk.replace("-", "_")
                    if sk not in fields:
                        raise _unknown(sk, fields, f"in section {stage!r} of {path}")
                    out[sk] = sv
        elif k in COMMON_KEYS or k in fields:
            out[k] = v
        else:
            raise _unknown(k, COMMON_KEYS | set(fields), f"at the top level of {path} (top level takes common keys or a stage section: {', '.join(sorted(stages))})")
    return out


def resolve_profile(name: str | None) -> str:
    if not name or name == "auto":
        import torch
        return "d20" if torch.cuda.is_available() else "tiny"
    if name not in profiles.PROFILES:
        raise ConfigError(f"--profile: unknown profile {name!r}; accepted: {', '.join(profiles.names())}")
    return name


def parse_config(cls, argv: list[str] | None, stage: str, env: dict | None = None):
    """Resolve a stage config through every layer; raises ConfigError before any work."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = os.environ if env is None else env
    fields = _fields(cls)
    hints = typing.get_type_hints(cls)
    profile = resolve_profile(_prescan(argv, "profile") or env.get(ENV_PREFIX + "PROFILE"))
    config_path = _prescan(argv, "config") or env.get(ENV_PREFIX + "CONFIG")

    values: dict = {}
    for k, v in profiles.stage_overrides(profile, stage).items():
        if k in fields:  # profile 'common' keys may target other stages
            values[k] = v
    file_data = load_config_file(config_path) if config_path else {}
    values.update(_file_layer(file_data, stage, fields, config_path) if file_data else {})
    if "profile" in file_data and not _prescan(argv, "profile") and not env.get(ENV_PREFIX + "PROFILE"):
        raise ConfigError("--config: set the profile with --profile, not inside the config file (it selects the layer below the file)")
    for name in fields:
        if ENV_PREFIX + name.upper() in env:
            values[name] = env[ENV_PREFIX + name.upper()]

    parser = build_parser(cls, stage, defaults=values)
    known, unknown = parser.parse_known_args(argv)
    if unknown:
        bad = unknown[0].split("=", 1)[0]
        if bad.startswith("--"):
            raise _unknown(bad[2:].replace("-", "_"), fields, f"for stage {stage}")
        raise ConfigError(f"unexpected argument {unknown[0]!r} for stage {stage} (flags look like --key=value)")
    values.update(vars(known))
    values["profile"] = profile

    kwargs = {name: coerce(name, values[name], hints[name], fields[name].metadata.get("choices")) for name in fields if name in values}
    cfg = cls(**kwargs)
    cfg.validate()
    return cfg


def config_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg) -> str:
    """Hash of the keys that change results (ports, store location, force... excluded)."""
    keep = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("hash", True)}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]
