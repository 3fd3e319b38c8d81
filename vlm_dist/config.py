"""The run configuration: one tree of typed dataclasses, loaded from YAML and
overridden on the command line, validated at load.

    cfg = load_config("launch/configs/stage2_sft.yaml", ["--train.max_steps=100", "--data.records=a.jsonl"])
    save_config(cfg, "runs/x/config.yaml")      # the resolved config, reloads identically
    check_run_inputs(cfg)                       # names the flag to add for whatever the run lacks
    print(config_help())                        # every key with its type, default and meaning

Overrides are `--section.key=value` (or `--section.key value`); values are
typed like YAML scalars, lists too (`--lora.target_modules=[q_proj,v_proj]`
or `q_proj,v_proj`). `--resume X` is short for `--checkpoint.resume=X`; a resume that changes the
run's mathematics is refused unless `--checkpoint.allow_changed=key,...` names each changed key
(vlm_dist.training.run_record).
Without a YAML file the stage-1 config (launch/configs/stage1_align.yaml) is used.

Two pairs of keys exclude each other: `train.max_steps` / `train.epochs` and
`model.connector: mlp` / `model.num_latents`. Set together in one layer (both in
the YAML, or both on the command line) they are an error; a command-line value
replaces a conflicting value from the YAML or the defaults, and a note says so.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import logging
import os
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from vlm_dist.errors import UserError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "launch" / "configs" / "stage1_align.yaml"
ALIASES = {"resume": "checkpoint.resume"}   # short flags a user types, e.g. `--resume auto`

LLM_MODES = ("frozen", "lora", "qlora", "full")
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class ConfigError(UserError, ValueError):
    """A config problem. The message names the key or flag, and what to do."""


# --------------------------------------------------------------------------- the tree

@dataclass
class ModelConfig:
    llm: str = "Qwen/Qwen3-8B-Base"
    """The language model: a local Hugging Face directory or a hub id already in the HF cache."""
    vision: str = "google/siglip-so400m-patch14-384"
    """The vision tower (SigLIP) whose features the cache holds: local directory or cached hub id."""
    feature_layer: int = -2
    """Vision hidden layer the cached features come from (-2: the penultimate, LLaVA's choice)."""
    connector: Literal["resampler", "mlp"] = "resampler"
    """resampler: LN -> Perceiver resampler -> MLP, num_latents tokens per image; mlp: LN -> MLP, one token per patch."""
    num_latents: Optional[int] = 64
    """Resampler latent queries = visual tokens per image (resampler only; null with connector: mlp)."""
    resampler_depth: int = 3
    """Perceiver resampler layers (cross-attention + MLP each)."""
    resampler_heads: int = 16
    """Attention heads in the resampler; must divide its width."""
    use_layernorm: bool = True
    """LayerNorm on the vision features before the resampler (seed 002: recommended)."""
    llm_mode: Literal["frozen", "lora", "qlora", "full"] = "frozen"
    """How the LLM trains: frozen, lora (PEFT adapters), qlora (4-bit NF4 base + adapters) or full."""
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"] = "sdpa"
    """Attention backend passed to transformers (packing needs one that honours per-sample position ids)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Weights and compute dtype; also sets DeepSpeed's bf16/fp16 section."""
    gradient_checkpointing: bool = False
    """Recompute LLM activations in backward (less memory, ~30% more compute)."""
    init_from: Optional[str] = None
    """A previous stage's export directory (connector.safetensors, adapter/) to start from; null: fresh connector."""


@dataclass
class LoraConfig:
    r: Optional[int] = 128
    """LoRA rank (seed 003: 128)."""
    alpha: Optional[int] = 256
    """LoRA alpha; the update is scaled by alpha / r (seed 003: 256)."""
    dropout: float = 0.05
    """Dropout on the LoRA input (seed 003: 0.05)."""
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    """LLM linear layers that get adapters (default: every attention and MLP projection)."""


@dataclass
class RecordSource:
    path: str
    """A JSONL file of records (vlm_dist.contract.records)."""
    weight: Optional[float] = None
    """Relative sampling weight in a mixture (use weights or counts, not both)."""
    count: Optional[int] = None
    """Samples drawn from this file per epoch (fewer: subsample, more: repeat)."""


@dataclass
class DataConfig:
    records: list[RecordSource] = field(default_factory=list)
    """Training records: a path, a list of paths, or a mixture list [{path, weight} | {path, count}]."""
    cache: Optional[str] = None
    """Feature cache directory built by `vlm-cache build`."""
    template: Literal["plain", "chatml"] = "plain"
    """Prompt template: plain (stage 1 captions) or chatml (SFT turns with <|im_start|>/<|im_end|>)."""
    max_seq_len: int = 2048
    """Longest sample and, with packing, the length of one packed row (tokens)."""
    truncate: bool = False
    """Over-long samples: false drops them (counted and listed); true cuts their text (never inside an image block)."""
    pack: bool = True
    """Pack several samples into each row (position ids restart, no attention across samples)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    eval_records: list[RecordSource] = field(default_factory=list)
    """Held-out records for the periodic eval loss; empty: hold out data.eval_fraction of data.records."""
    eval_fraction: float = 0.0
    """Fraction of data.records held out for eval when data.eval_records is empty (seed 002: 1-2%)."""
    seed: int = 0
    """Seed of the sampler's shuffles and of the eval split."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/vlm"
    """Run directory: config.yaml, metrics.jsonl, checkpoints/, export/."""
    max_steps: Optional[int] = None
    """Optimizer steps to run (exclusive with train.epochs)."""
    epochs: Optional[int] = None
    """Passes over the records (exclusive with train.max_steps)."""
    micro_batch_size: int = 1
    """Rows per micro-batch per GPU (a row is one sample, or one packed row of up to max_seq_len tokens)."""
    micro_batch_tokens: Optional[int] = None
    """With packing: token budget of one micro-batch per GPU (null: micro_batch_size x data.max_seq_len)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (global batch = micro_batch_size x grad_accum x world size)."""
    lr_connector: float = 1e-4
    """Peak learning rate of the connector (LN, resampler, projector)."""
    lr_adapters: float = 2e-4
    """Peak learning rate of the LoRA adapters (lora and qlora modes)."""
    lr_llm: float = 2e-5
    """Peak learning rate of the LLM weights (full mode)."""
    weight_decay: float = 0.01
    """AdamW weight decay of matrices; norms, biases and other 1-D parameters get none."""
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW betas."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    warmup_ratio: float = 0.03
    """Fraction of the steps spent warming up linearly to the peak learning rate."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak learning rate."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0: off)."""
    seed: int = 42
    """Seed of the weight init and dropout."""
    log_every: int = 10
    """Steps between log lines and metrics.jsonl rows."""
    eval_every: int = 500
    """Steps between held-out eval losses (0: only at the end)."""
    nan_patience: int = 5
    """Non-finite losses in a row before the run saves and exits non-zero (each such step is skipped)."""


@dataclass
class CheckpointConfig:
    every: int = 1000
    """Steps between DeepSpeed checkpoints (0: only at the end)."""
    keep_last: int = 3
    """Complete checkpoints kept under <output_dir>/checkpoints/; older ones are deleted."""
    resume: Optional[str] = None
    """null: fresh run; auto: the newest complete checkpoint if any; a path: that checkpoint (must exist)."""
    export: bool = True
    """Export the trainable weights (connector.safetensors, adapter/) with each checkpoint and at the end."""
    allow_changed: list[str] = field(default_factory=list)
    """Keys a resume may change although they change the run's mathematics, e.g. train.lr_connector,data.records."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    """The LLM, the vision tower, the connector and how each trains."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA / QLoRA adapter settings (used by llm_mode lora and qlora)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Records, the feature cache, templates and packing."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Run length, batch, optimizer and schedule, logging."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints, resume and export."""


SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]


# --------------------------------------------------------------------------- docs and help

def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (litgpt style), read from the source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)):
            docs[node.target.id] = nxt.value.value.strip()
    return docs


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " | ".join(_type_name(a) for a in inner) + " | null"
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    if tp is RecordSource:
        return "path | {path, weight} | {path, count}"
    return getattr(tp, "__name__", str(tp))


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
            lines.append(f"  --{section}.{f.name}={shown}  ({_type_name(hints[f.name])})")
            lines.append(f"      {docs.get(f.name, '')}")
    return "\n".join(lines)


def _valid_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]


def _suggest(section: str, key: str) -> str:
    """' (did you mean ...?)' for a mistyped key: close matches in the section, the same key elsewhere."""
    names = [f.name for f in dataclasses.fields(SECTIONS[section])]
    close = [n for n in names if n.startswith(key + "_") or key.startswith(n + "_")]
    close += [n for n in difflib.get_close_matches(key, names, n=3, cutoff=0.6) if n not in close]
    hits = [f"{section}.{n}" for n in close]
    hits += [k for k in _valid_keys() if k.split(".")[1] == key and k not in hits]
    return f" (did you mean {', '.join(hits)}?)" if hits else ""


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
            raise ConfigError(f"{where}: expects a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is RecordSource:
        return _record_source(value, where)
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
        raise ConfigError(f"{where}: unknown key {section}.{key}{_suggest(section, key)}; "
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
        _check_key(section, key, flag.split("=")[0])
        if dotted in seen:
            raise ConfigError(f"{dotted} is given twice on the command line ({seen[dotted]} and {flag})")
        seen[dotted] = flag
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        _set(cfg, section, key, value, flag, raw if _wants_raw(section, key) else None)
        sources[dotted] = (2, flag)
    _resolve_exclusive(cfg, sources)
    validate_config(cfg)
    return cfg


def _suggest_any(key: str) -> str:
    return ", ".join(f"--{k}" for k in _valid_keys() if k.split(".")[1] == key)


def _wants_raw(section: str, key: str) -> bool:
    """String-valued fields take the text as typed (`--model.llm=007` stays '007')."""
    tp = typing.get_type_hints(SECTIONS[section])[key]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return tp is str or (len(args) == 1 and args[0] is str) or typing.get_origin(tp) is Literal


# --------------------------------------------------------------------------- validation

def validate_config(cfg: Config) -> None:
    """Check ranges and combinations; raise ConfigError naming the flag."""
    m, lo, d, t, c = cfg.model, cfg.lora, cfg.data, cfg.train, cfg.checkpoint

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    # model
    need(m.llm.strip() != "", "--model.llm is empty: give a local model directory or a hub id")
    need(m.vision.strip() != "", "--model.vision is empty: give a local model directory or a hub id")
    if m.connector == "resampler":
        need(m.num_latents is not None and m.num_latents >= 1,
             f"--model.num_latents={m.num_latents}: the resampler needs at least 1 latent (seed 002: 64)")
        need(m.resampler_depth >= 1, f"--model.resampler_depth={m.resampler_depth}: must be >= 1")
        need(m.resampler_heads >= 1, f"--model.resampler_heads={m.resampler_heads}: must be >= 1")
    else:
        need(m.num_latents is None, f"--model.num_latents={m.num_latents} is meaningless with "
             "--model.connector=mlp (one token per patch): set --model.num_latents=null")
    # lora
    if m.llm_mode in ("lora", "qlora"):
        need(lo.r is not None and lo.r >= 1,
             f"--model.llm_mode={m.llm_mode} needs a LoRA rank: --lora.r={lo.r} must be >= 1 (seed 003: 128)")
        need(lo.alpha is not None and lo.alpha > 0,
             f"--model.llm_mode={m.llm_mode} needs --lora.alpha > 0, got {lo.alpha} (seed 003: 256)")
        need(len(lo.target_modules) > 0,
             f"--model.llm_mode={m.llm_mode} needs --lora.target_modules, e.g. {','.join(ALL_PROJECTIONS)}")
        need(t.lr_adapters > 0, f"--train.lr_adapters={t.lr_adapters}: adapters train in "
             f"--model.llm_mode={m.llm_mode}, so their learning rate must be > 0")
    need(0.0 <= lo.dropout < 1.0, f"--lora.dropout={lo.dropout}: must be in [0, 1)")
    if m.llm_mode == "qlora":
        need(m.dtype != "float32", "--model.llm_mode=qlora computes in 16 bits: use --model.dtype=bfloat16")
    if m.llm_mode == "full":
        need(t.lr_llm > 0, f"--train.lr_llm={t.lr_llm}: the LLM trains in --model.llm_mode=full, so it must be > 0")
    # data
    need(d.max_seq_len >= 16, f"--data.max_seq_len={d.max_seq_len}: must be >= 16")
    need(d.num_workers >= 0, f"--data.num_workers={d.num_workers}: must be >= 0")
    need(0.0 <= d.eval_fraction < 1.0, f"--data.eval_fraction={d.eval_fraction}: must be in [0, 1)")
    for name, sources in (("records", d.records), ("eval_records", d.eval_records)):
        for s in sources:
            need(s.path.strip() != "", f"--data.{name}: an entry has an empty path")
            need(s.weight is None or s.count is None,
                 f"--data.{name}: {s.path} sets both weight and count; give one")
            need(s.weight is None or s.weight > 0, f"--data.{name}: {s.path} weight {s.weight} must be > 0")
            need(s.count is None or s.count >= 1, f"--data.{name}: {s.path} count {s.count} must be >= 1")
        kinds = {("weight" if s.weight is not None else "count" if s.count is not None else "plain")
                 for s in sources}
        need(len(kinds - {"plain"}) <= 1,
             f"--data.{name}: mixes weights and counts; a mixture uses one or the other")
        need(not (kinds & {"weight", "count"}) or "plain" not in kinds,
             f"--data.{name}: some entries have a weight/count and some do not; give every entry one")
    # train
    need(t.output_dir.strip() != "", "--train.output_dir is empty: give the run directory")
    need(t.max_steps is not None or t.epochs is not None,
         "the run has no length: add --train.max_steps=N or --train.epochs=N")
    need(t.max_steps is None or t.epochs is None,
         f"--train.max_steps={t.max_steps} and --train.epochs={t.epochs} are both set: keep one")
    need(t.max_steps is None or t.max_steps >= 1, f"--train.max_steps={t.max_steps}: must be >= 1")
    need(t.epochs is None or t.epochs >= 1, f"--train.epochs={t.epochs}: must be >= 1")
    need(t.micro_batch_size >= 1, f"--train.micro_batch_size={t.micro_batch_size}: must be >= 1")
    need(t.grad_accum >= 1, f"--train.grad_accum={t.grad_accum}: must be >= 1")
    if t.micro_batch_tokens is not None:
        need(d.pack, f"--train.micro_batch_tokens={t.micro_batch_tokens} needs --data.pack=true")
        need(t.micro_batch_tokens >= d.max_seq_len, f"--train.micro_batch_tokens={t.micro_batch_tokens} "
             f"must be >= --data.max_seq_len={d.max_seq_len} (one row)")
    need(t.lr_connector > 0, f"--train.lr_connector={t.lr_connector}: the connector always trains; must be > 0")
    for name in ("lr_adapters", "lr_llm", "weight_decay", "max_grad_norm"):
        need(getattr(t, name) >= 0, f"--train.{name}={getattr(t, name)}: must be >= 0")
    need(len(t.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in t.adam_betas),
         f"--train.adam_betas={t.adam_betas}: two values in [0, 1), e.g. [0.9,0.999]")
    need(t.adam_eps > 0, f"--train.adam_eps={t.adam_eps}: must be > 0")
    need(0.0 <= t.warmup_ratio < 1.0, f"--train.warmup_ratio={t.warmup_ratio}: must be in [0, 1)")
    need(0.0 <= t.min_lr_ratio <= 1.0, f"--train.min_lr_ratio={t.min_lr_ratio}: must be in [0, 1]")
    need(t.log_every >= 1, f"--train.log_every={t.log_every}: must be >= 1")
    need(t.eval_every >= 0, f"--train.eval_every={t.eval_every}: must be >= 0 (0: only at the end)")
    need(t.nan_patience >= 1, f"--train.nan_patience={t.nan_patience}: must be >= 1")
    # checkpoint
    need(c.every >= 0, f"--checkpoint.every={c.every}: must be >= 0 (0: only at the end)")
    need(c.keep_last >= 1, f"--checkpoint.keep_last={c.keep_last}: must be >= 1")
    need(c.resume is None or c.resume.strip() != "",
         "--checkpoint.resume is empty: use null, auto or a checkpoint path")
    for key in c.allow_changed:
        section, _, name = key.partition(".")
        near = [k for k in _valid_keys() if k.split(".")[1] == key]
        hint = (_suggest(section, name) if section in SECTIONS and name
                else f" (did you mean {', '.join(near)}?)" if near else "")
        need(key in _valid_keys(), f"--checkpoint.allow_changed: {key!r} is not a config key{hint}; "
             "name keys as section.key, e.g. train.lr_connector")


# --------------------------------------------------------------------------- what the run needs

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _model_problem(flag: str, value: str) -> Optional[str]:
    p = Path(value).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            return f"{flag}={value} has no config.json: point {flag} at a Hugging Face model directory"
        return None
    if _HUB_ID.match(value) and not value.startswith((".", "/", "~")):
        from huggingface_hub import try_to_load_from_cache
        if isinstance(try_to_load_from_cache(value, "config.json"), str):
            return None
        return (f"{flag}={value} is not a local directory and not in the Hugging Face cache: download it "
                f"once before launching (`hf download {value}`) or add {flag}=PATH to a local copy")
    return f"{flag}={value} does not exist: add {flag}=PATH to a Hugging Face model directory"


def check_run_inputs(cfg: Config, *, need_vision: bool = True) -> None:
    """Check the run has what it needs (models, records, cache, init_from); one error lists every gap
    with the flag to add. The checkpoint given by --checkpoint.resume is the trainer's to check."""
    problems = []
    for flag, value, wanted in (("--model.llm", cfg.model.llm, True), ("--model.vision", cfg.model.vision, need_vision)):
        problem = _model_problem(flag, value) if wanted else None
        if problem:
            problems.append(problem)
    if not cfg.data.records:
        problems.append("no records: add --data.records=PATH.jsonl (make one with vlm-convert)")
    for name, sources in (("records", cfg.data.records), ("eval_records", cfg.data.eval_records)):
        for s in sources:
            if not Path(s.path).expanduser().is_file():
                problems.append(f"--data.{name}: {s.path} does not exist: add --data.{name}=PATH.jsonl "
                                "(make one with vlm-convert)")
    if cfg.data.cache is None:
        problems.append("no feature cache: add --data.cache=DIR (build one with vlm-cache build)")
    elif not Path(cfg.data.cache).expanduser().is_dir():
        problems.append(f"--data.cache={cfg.data.cache} does not exist: build it with vlm-cache build "
                        "or add --data.cache=DIR")
    if cfg.model.init_from is not None and not Path(cfg.model.init_from).expanduser().is_dir():
        problems.append(f"--model.init_from={cfg.model.init_from} does not exist: give the previous stage's "
                        "export directory (<output_dir>/export) or --model.init_from=null to start fresh")
    if problems:
        raise ConfigError("this run cannot start:\n  - " + "\n  - ".join(problems))


# --------------------------------------------------------------------------- saving

def _dump_value(value: Any) -> Any:
    if isinstance(value, RecordSource):
        if value.weight is None and value.count is None:
            return value.path
        return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
    if isinstance(value, list):
        return [_dump_value(v) for v in value]
    return value


def config_to_dict(cfg: Config) -> dict:
    """Plain dict of the config, in the YAML shape load_config reads."""
    return {s: {f.name: _dump_value(getattr(getattr(cfg, s), f.name)) for f in dataclasses.fields(SECTIONS[s])}
            for s in SECTIONS}


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (temp file, then rename); load_config(path) gives it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# resolved run config (vlm_dist.config.save_config); rerun with --config THIS_FILE\n"
    text += yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
