"""Reading and writing the run config: YAML, then `--section.key=value` overrides, typed and
checked; the resolved config saved as YAML; `config_help`.

Overrides are `--section.key=value` (or `--section.key value`); values are
typed like YAML scalars, lists too (`--lora.target_modules=[q_proj,v_proj]`
or `q_proj,v_proj`). `--resume X` is short for `--checkpoint.resume=X`.
A nested setting (model.tiling, model.video) takes a mapping or null
(`--model.video='{num_frames: 4}'`, `--model.tiling=null`), or one of its keys
(`--model.video.num_frames=4`: the others keep their defaults if it was null).
Without a YAML file the stage-1 config (launch/configs/stage1_align.yaml) is used.

Two pairs of keys exclude each other: `train.max_steps` / `train.epochs` and
`model.connector: mlp` / `model.num_latents`. Set together in one layer (both in
the YAML, or both on the command line) they are an error; a command-line value
replaces a conflicting value from the YAML or the defaults, and a note says so.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from vlm_dist.config.checks import validate_config
from vlm_dist.config.schema import (SECTIONS, Config, ConfigError, RecordSource, field_docs, sub_config, suggest,
                                    type_name, valid_keys)
from vlm_dist.fileio import write_text_atomic

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "launch" / "configs" / "stage1_align.yaml"
ALIASES = {"resume": "checkpoint.resume"}   # short flags a user types, e.g. `--resume auto`


# --------------------------------------------------------------------------- typing of values

def _coerce(value: Any, tp, where: str, raw: Optional[str] = None) -> Any:
    """Check/convert one value to a field's type; raise ConfigError naming `where`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if value is None or (raw is not None and raw.strip() in ("null", "~", "None", "")):
            return None
        assert len(inner) == 1, tp
        return _coerce(value, inner[0], where, raw)
    if origin is Literal:
        text = raw if raw is not None else value
        if text not in args:
            near = difflib.get_close_matches(str(text), [str(a) for a in args], n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, args))}; got {text!r}{hint}")
        return text
    if origin is list:
        (item_tp,) = args
        if isinstance(value, str):  # `a,b,c` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (dict, RecordSource)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expects a list of {type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is RecordSource:
        return _record_source(value, where)
    if dataclasses.is_dataclass(tp):
        return _sub_config(value, tp, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expects true or false, got {raw if raw is not None else value!r}")
    if tp is int:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expects an integer, got {raw if raw is not None else value!r}")
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expects a number, got {raw if raw is not None else value!r}")
    if tp is str:
        if raw is not None:
            return raw
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expects a string, got {value!r}")
    raise AssertionError(f"unhandled field type {tp} at {where}")


def _record_source(value: Any, where: str) -> RecordSource:
    if isinstance(value, RecordSource):
        return value
    if isinstance(value, str):
        return RecordSource(path=value)
    if isinstance(value, dict):
        valid = [f.name for f in dataclasses.fields(RecordSource)]
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} in a records entry; valid keys: {', '.join(valid)}")
        if "path" not in value:
            raise ConfigError(f"{where}: a records entry needs a path: {{path: FILE.jsonl, weight: W}}")
        hints = typing.get_type_hints(RecordSource)
        return RecordSource(**{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in value.items()})
    raise ConfigError(f"{where}: expects a path or {{path, weight}} / {{path, count}}, got {value!r}")



def _sub_config(value: Any, cls: type, where: str):
    """A mapping -> the nested dataclass (model.tiling, model.video), each key typed and checked."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expects a mapping {type_name(cls)} or null, got {value!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(names))
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), names, n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}{hint}; valid keys: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    base = where.split("=", 1)[0] if where.startswith("--") else where    # a flag: its name, not its value
    return cls(**{k: _coerce(v, hints[k], f"{base}.{k}") for k, v in value.items()})


# --------------------------------------------------------------------------- loading

def _parse_overrides(overrides: list[str]) -> list[tuple[str, str, str]]:
    """['--a.b=1', '--c.d', '2', '--resume', 'auto'] -> [(flag, 'a.b', '1'), ...]."""
    out, i = [], 0
    while i < len(overrides):
        item = overrides[i]
        i += 1
        body = item[2:] if item.startswith("--") else item
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            if i >= len(overrides) or overrides[i].startswith("--"):
                raise ConfigError(f"{item} needs a value: {item}=VALUE")
            key, raw = body, overrides[i]
            i += 1
        key = ALIASES.get(key, key)
        out.append((f"--{key}={raw}", key, raw))
    return out


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (check --config)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of sections "
                          f"({', '.join(SECTIONS)}), got {type(data).__name__}")
    return data


def _check_key(section: str, key: Optional[str], where: str) -> None:
    if section not in SECTIONS:
        near = difflib.get_close_matches(section, list(SECTIONS), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(f"{where}: unknown section {section!r}{hint}; valid sections: {', '.join(SECTIONS)}")
    if key is None:
        return
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    if key not in names:
        raise ConfigError(f"{where}: unknown key {section}.{key}{suggest(section, key)}; "
                          f"valid keys in {section}: {', '.join(names)}")


def _set(cfg: Config, section: str, key: str, value: Any, where: str, raw: Optional[str] = None) -> None:
    hints = typing.get_type_hints(SECTIONS[section])
    setattr(getattr(cfg, section), key, _coerce(value, hints[key], where, raw))


# Keys that exclude each other: (key_a, condition on a, key_b). b must be null when a's condition holds.
_EXCLUSIVE = [
    ("train.max_steps", lambda v: v is not None, "train.epochs"),
    ("model.connector", lambda v: v == "mlp", "model.num_latents"),
]


def _get(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


def _resolve_exclusive(cfg: Config, sources: dict[str, tuple[int, str]]) -> None:
    """A command-line value replaces a conflicting YAML/default one; within one layer it is an error."""
    for a, active, b in _EXCLUSIVE:
        if not active(_get(cfg, a)) or _get(cfg, b) is None:
            continue
        (la, wa), (lb, wb) = sources.get(a, (0, "default")), sources.get(b, (0, "default"))
        if la == lb or (la < lb and a == "model.connector"):
            raise ConfigError(f"{a}={_get(cfg, a)} and {b}={_get(cfg, b)} exclude each other "
                              f"({wa}; {wb}): set only one, e.g. --{b}=null")
        loser, loser_where, winner_where = (b, wb, wa) if la > lb else (a, wa, wb)
        old = _get(cfg, loser)
        section, key = loser.split(".")
        setattr(getattr(cfg, section), key, None)
        if loser_where != "default":
            log.warning("config: %s replaces %s=%r (%s)", winner_where, loser, old, loser_where)


def load_config(path: Optional[str | os.PathLike], overrides: list[str] = ()) -> Config:
    """YAML (default: the stage-1 config) -> Config, then `--section.key=value` overrides; validated."""
    yaml_path = Path(path) if path is not None else DEFAULT_CONFIG
    cfg = Config()
    sources: dict[str, tuple[int, str]] = {}   # key -> (layer, where): 1 = YAML, 2 = command line
    for section, values in _read_yaml(yaml_path).items():
        _check_key(section, None, f"{yaml_path}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{yaml_path}: section {section!r} must be a mapping of keys, got {values!r}")
        for key, value in values.items():
            where = f"{section}.{key} in {yaml_path}"
            _check_key(section, key, f"{yaml_path}")
            _set(cfg, section, key, value, where)
            sources[f"{section}.{key}"] = (1, where)
    seen: dict[str, str] = {}
    for flag, dotted, raw in _parse_overrides(list(overrides)):
        if "." not in dotted:
            raise ConfigError(f"{flag}: flags are --section.key=value (sections: {', '.join(SECTIONS)})"
                              + (f"; did you mean {_suggest_any(dotted)}?" if _suggest_any(dotted) else ""))
        section, key = dotted.split(".", 1)
        key, _, sub = key.partition(".")
        _check_key(section, key, flag.split("=")[0])
        if dotted in seen:
            raise ConfigError(f"{dotted} is given twice on the command line ({seen[dotted]} and {flag})")
        seen[dotted] = flag
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if sub:
            _set_sub(cfg, section, key, sub, value, flag, raw)
            dotted = f"{section}.{key}"
        else:
            _set(cfg, section, key, value, flag, raw if _wants_raw(section, key) else None)
        sources[dotted] = (2, flag)
    _resolve_exclusive(cfg, sources)
    validate_config(cfg)
    return cfg


def _set_sub(cfg: Config, section: str, key: str, sub: str, value: Any, flag: str, raw: str) -> None:
    """`--model.video.num_frames=4`: one key of a nested setting (made with its defaults if null)."""
    cls = sub_config(section, key)
    where = flag.split("=")[0]
    if cls is None:
        raise ConfigError(f"{where}: {section}.{key} has no keys of its own; use --{section}.{key}=VALUE")
    names = [f.name for f in dataclasses.fields(cls)]
    if sub not in names:
        near = difflib.get_close_matches(sub, names, n=1)
        hint = f" (did you mean {section}.{key}.{near[0]}?)" if near else ""
        raise ConfigError(f"{where}: unknown key {section}.{key}.{sub}{hint}; valid keys in {section}.{key}: "
                          f"{', '.join(names)}")
    tp = typing.get_type_hints(cls)[sub]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    wants_raw = tp is str or (len(args) == 1 and args[0] is str) or typing.get_origin(tp) is Literal
    current = getattr(getattr(cfg, section), key) or cls()
    setattr(current, sub, _coerce(value, tp, flag, raw if wants_raw else None))
    setattr(getattr(cfg, section), key, current)


def _suggest_any(key: str) -> str:
    return ", ".join(f"--{k}" for k in valid_keys() if k.split(".")[1] == key)


def _wants_raw(section: str, key: str) -> bool:
    """String-valued fields take the text as typed (`--model.llm=007` stays '007')."""
    tp = typing.get_type_hints(SECTIONS[section])[key]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp is str or (len(args) == 1 and args[0] is str) or typing.get_origin(tp) is Literal



# --------------------------------------------------------------------------- help and saving

def config_help() -> str:
    """Every `--section.key` with its type, default and one-line meaning."""
    lines = []
    defaults = Config()
    for section, cls in SECTIONS.items():
        lines.append(f"{section}:")
        hints, docs = typing.get_type_hints(cls), field_docs(cls)
        for f in dataclasses.fields(cls):
            value = getattr(getattr(defaults, section), f.name)
            shown = yaml.safe_dump(_dump_value(value), default_flow_style=True, width=10**6).strip()
            shown = shown.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"  --{section}.{f.name}={shown}  ({type_name(hints[f.name])})")
            lines.append(f"      {docs.get(f.name, '')}")
            cls_sub = sub_config(section, f.name)
            if cls_sub is not None:        # its keys, as --section.key.sub=VALUE
                sub_hints, sub_docs, sub_default = typing.get_type_hints(cls_sub), field_docs(cls_sub), cls_sub()
                for g in dataclasses.fields(cls_sub):
                    shown = yaml.safe_dump(_dump_value(getattr(sub_default, g.name)), default_flow_style=True,
                                           width=10**6).strip().removesuffix("\n...").removesuffix("...").strip()
                    lines.append(f"    --{section}.{f.name}.{g.name}={shown}  ({type_name(sub_hints[g.name])})")
                    lines.append(f"        {sub_docs.get(g.name, '')}")
    return "\n".join(lines)



def _dump_value(value: Any) -> Any:
    if isinstance(value, RecordSource):
        if value.weight is None and value.count is None:
            return value.path
        return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
    if isinstance(value, list):
        return [_dump_value(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {f.name: _dump_value(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def config_to_dict(cfg: Config) -> dict:
    """Plain dict of the config, in the YAML shape load_config reads."""
    return {s: {f.name: _dump_value(getattr(getattr(cfg, s), f.name)) for f in dataclasses.fields(SECTIONS[s])}
            for s in SECTIONS}


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (vlm_dist.fileio); load_config(path) gives it back."""
    text = "# resolved run config (vlm_dist.config.save_config); rerun with --config THIS_FILE\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    write_text_atomic(path, text)
