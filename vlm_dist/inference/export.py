"""Load a trained export in one call, and merge its LoRA adapter into a standalone directory.

    vlm, tokenizer, tower, cfg = load_export("runs/sft/export", device="cpu")
    merge_export("runs/sft/export", "merged/sft")      # then vlm-generate --model merged/sft
    python -m vlm_dist.inference.export merge runs/sft/export merged/sft [--dtype bf16]

The merge output lies outside the export and its training run, and is new, empty or an
earlier merge output: it is built beside, checked and swapped in, so a mistyped path
never deletes a run (check_merge_target).
Every export, the trainer's and the merge's, is published the same way: built in a
temporary directory, checked (check_export), then renamed over the old one (publishing).

An export directory (written by the trainer, vlm_dist.training.checkpoint.write_export):

    connector.safetensors, connector_config.json   the connector (save_connectors)
    adapter/                                       PEFT LoRA adapter (llm_mode lora / qlora)
    llm/                                           a full LLM + tokenizer (llm_mode full, or merged)
    vlm_config.json                                ExportConfig below

A tiled model records its TilingSpec ("tiling": the spec's fingerprint) and a video model its
frame sampling and tokens per frame ("video"; its connector_config.json has a "video" entry):
load_export rebuilds the video connector and every online path (vlm-generate, vlm-serve, the
lmms-eval model) tiles images and samples frames exactly as the training cache did
(`cfg.tiling_spec`, `cfg.video_sampling`). Exports without these keys load as before.

A merged export has `llm/` (LoRA merged into the weights with PEFT's
merge_and_unload, saved with save_pretrained, plus the tokenizer), no adapter,
"merged": true, "llm": "llm" (relative paths resolve against the export
directory, so it can be moved), and "base_llm" naming the LLM it came from.
The vision tower is a reference (path or hub id), not a copy.

QLoRA exports load and merge onto the unquantised base weights (as QLoRA's
authors deploy them): outputs differ slightly from the 4-bit training-time model.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

import torch

from vlm_dist.config.schema import ADAPTER_MODES
from vlm_dist.contract.tiling import TilingError, TilingSpec
from vlm_dist.contract.video import FrameSampling, VideoError
from vlm_dist.errors import UserError
from vlm_dist.fileio import fsync_dir
from vlm_dist.model.build import (CONNECTOR_CONFIG, CONNECTOR_FILE, build_vlm, load_connectors, load_llm,
                                  read_connector_config)
from vlm_dist.model.vision import VisionTower, dtype_name, resolve_dtype
from vlm_dist.model.vlm import VisionLanguageModel, unwrap_llm

EXPORT_CONFIG = "vlm_config.json"
ADAPTER_DIR, LLM_DIR = "adapter", "llm"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


class ExportError(UserError, ValueError):
    """An export directory that cannot be loaded; names the directory and the missing piece."""


@dataclass
class ExportConfig:
    llm: str
    """The LLM: base model (path or hub id), or the export's own llm/ (full mode, merged)."""
    vision: str
    """The vision tower (path or hub id) whose features trained the connector."""
    feature_layer: int
    """Vision hidden layer of the features (as the cache was built)."""
    template: str
    """Prompt template the model was trained with: plain or chatml."""
    llm_mode: str
    """How the LLM trained: frozen, lora, qlora or full."""
    num_media_tokens: int
    """Visual tokens per image (the connector's output length)."""
    pool: int = 1
    """Patch-grid average pooling of the features (true/2: 2x2; false/1: none), as the cache was built."""
    vision_dtype: str | None = None
    """dtype the vision tower ran in when the cache was built; None (not recorded): bf16, vlm-cache's default."""
    jpeg_draft_to: int | None = None
    """JPEG draft size the training cache decoded with (its fingerprint's jpeg_draft_to); the tower's
    online decode uses it, so online features equal the cache's. None: full decode (also an export
    from before this field, whose caches always decoded in full)."""
    merged: bool = False
    """True for a merge_export output: llm/ holds the merged LLM, there is no adapter."""
    base_llm: str | None = None
    """The LLM the merged or full-mode weights started from (for the text regression baseline)."""
    tiling: dict | None = None
    """The AnyRes tiling the model trained with (TilingSpec.fingerprint(), as the training cache's
    fingerprint records it); None: one untiled view per image."""
    video: dict | None = None
    """The video settings the model trained with: {"num_frames", "max_fps", "tokens_per_frame"}
    (the cache's FrameSampling and the video connector's tokens per frame; media_fields writes it);
    None: no video connector."""

    @classmethod
    def from_dict(cls, d: dict, where: str) -> "ExportConfig":
        names = {f.name for f in fields(cls)}
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [k for k in required if k not in d]
        if missing:
            raise ExportError(f"{where}: missing key(s) {missing} (an export's vlm_config.json needs "
                              f"{required})")
        kwargs = {k: v for k, v in d.items() if k in names}
        pool = kwargs.get("pool", 1)
        try:
            kwargs["pool"] = 2 if pool is True else 1 if pool is False or pool is None else int(pool)
            if kwargs.get("vision_dtype") is not None:
                kwargs["vision_dtype"] = dtype_name(resolve_dtype(kwargs["vision_dtype"]))
            draft = kwargs.get("jpeg_draft_to")
            if draft is not None and (isinstance(draft, bool) or not isinstance(draft, int) or draft < 1):
                raise ValueError(f"jpeg_draft_to must be a positive integer or null, got {draft!r}")
        except (TypeError, ValueError) as e:
            raise ExportError(f"{where}: {e}") from e
        cfg = cls(**kwargs)
        cfg._check_media(where)
        cfg.extra = {k: v for k, v in d.items() if k not in names}  # kept and rewritten on merge
        return cfg

    def to_dict(self) -> dict:
        return dict(getattr(self, "extra", {}), **asdict(self))

    # -- tiles and video -----------------------------------------------------------------------
    @property
    def tiling_spec(self) -> TilingSpec | None:
        """The TilingSpec images are tiled with (None: untiled)."""
        return None if self.tiling is None else TilingSpec.from_dict(self.tiling)

    @property
    def video_sampling(self) -> FrameSampling | None:
        """The FrameSampling videos are decoded with (None: a model without video)."""
        if self.video is None:
            return None
        return FrameSampling(**{k: self.video[k] for k in ("num_frames", "max_fps", "version") if k in self.video})

    @property
    def video_tokens_per_frame(self) -> int | None:
        return None if self.video is None else self.video["tokens_per_frame"]

    @property
    def media_tokens(self) -> dict[str, int]:
        """Pad slots per view of each kind, as PromptEncoder takes them."""
        out = {"image": self.num_media_tokens}
        if self.video is not None:
            out["video"] = self.video["tokens_per_frame"]
        return out

    def _check_media(self, where: str) -> None:
        """The tiling and video entries parse, and agree with the token count."""
        try:
            if self.tiling is not None:
                spec = self.tiling_spec
                if spec.tokens_per_tile != self.num_media_tokens:
                    raise TilingError(f"tiling.tokens_per_tile={spec.tokens_per_tile} but "
                                      f"num_media_tokens={self.num_media_tokens}")
            if self.video is not None:
                if not isinstance(self.video, dict):
                    raise VideoError("video", f"must be an object, got {self.video!r}")
                unknown = set(self.video) - VIDEO_KEYS
                if unknown:
                    raise VideoError("video", f"unknown key(s) {sorted(unknown)} (known: {sorted(VIDEO_KEYS)})")
                tpf = self.video.get("tokens_per_frame")
                if isinstance(tpf, bool) or not isinstance(tpf, int) or tpf < 1:
                    raise VideoError("video", f"tokens_per_frame must be a positive integer, got {tpf!r}")
                if "num_frames" not in self.video:
                    raise VideoError("video", "num_frames is missing")
                self.video_sampling            # FrameSampling checks num_frames, max_fps, version
        except (TilingError, VideoError) as e:
            raise ExportError(f"{where}: {e}") from e


VIDEO_KEYS = {"num_frames", "max_fps", "version", "rule", "tokens_per_frame", "token_budget"}


def media_fields(tiling: TilingSpec | None, video_sampling: FrameSampling | None,
                 video_tokens_per_frame: int | None, video_token_budget: int | None = None) -> dict:
    """The "tiling" and "video" entries of vlm_config.json (the trainer adds them to its export):
    the TilingSpec the model trained with, and the FrameSampling + tokens per frame of its videos."""
    video = None
    if video_tokens_per_frame is not None:
        sampling = video_sampling or FrameSampling()
        video = {**sampling.fingerprint(), "tokens_per_frame": video_tokens_per_frame,
                 "token_budget": video_token_budget}
    return {"tiling": None if tiling is None else tiling.fingerprint(), "video": video}


def read_export_config(export_dir: str | os.PathLike) -> ExportConfig:
    path = Path(export_dir) / EXPORT_CONFIG
    if not path.exists():
        raise ExportError(f"{export_dir}: no {EXPORT_CONFIG} (not a vlm_dist export, or the export "
                          "was interrupted before it was published)")
    return ExportConfig.from_dict(_read_json(path), str(path))


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        d = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(d, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _check_safetensors(path: Path) -> None:
    """Open the file's header: safetensors refuses one whose size disagrees with it (truncated)."""
    from safetensors import SafetensorError, safe_open
    if not path.is_file():
        raise ExportError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except SafetensorError as e:
        raise ExportError(f"{path}: truncated or not a safetensors file ({e})") from e


def _check_weights(model_dir: Path, stem: str) -> None:
    """`stem`.safetensors, or the shards its index lists (as save_pretrained writes them)."""
    index = model_dir / f"{stem}.safetensors.index.json"
    if not index.exists():
        return _check_safetensors(model_dir / f"{stem}.safetensors")
    shards = _read_json(index).get("weight_map", {}).values()
    if not shards:
        raise ExportError(f"{index}: no weight_map")
    for shard in sorted(set(shards)):
        _check_safetensors(model_dir / shard)


def check_export(export_dir: str | os.PathLike) -> ExportConfig:
    """Open every file the loaders will read; the first broken one is named in an ExportError.

    Run on what is about to be published (publishing) and before loading, so a
    truncated or garbled file is named here, not deep inside safetensors, PEFT or transformers.
    Reads JSON files and safetensors headers only (cheap even for a merged 8B LLM).
    """
    d = Path(export_dir)
    cfg = read_export_config(d)
    if cfg.merged or cfg.llm_mode == "full":
        llm = Path(resolve_path(cfg.llm, d))
        if not llm.is_dir():
            raise ExportError(f"{d}: llm_mode={cfg.llm_mode}, merged={cfg.merged} but its LLM directory "
                              f"{str(llm)!r} does not exist")
        _read_json(llm / "config.json")
        _check_weights(llm, "model")
    elif cfg.llm_mode in ADAPTER_MODES:
        if not (d / ADAPTER_DIR / "adapter_config.json").exists():
            raise ExportError(f"{d}: llm_mode={cfg.llm_mode} but no {ADAPTER_DIR}/adapter_config.json")
        _read_json(d / ADAPTER_DIR / "adapter_config.json")
        _check_weights(d / ADAPTER_DIR, "adapter_model")
    elif cfg.llm_mode != "frozen":
        raise ExportError(f"{d / EXPORT_CONFIG}: unknown llm_mode {cfg.llm_mode!r} (frozen, lora, qlora or full)")
    _read_json(d / CONNECTOR_CONFIG)
    _check_safetensors(d / CONNECTOR_FILE)
    return cfg


def resolve_path(ref: str, export_dir: str | os.PathLike) -> str:
    """A path from vlm_config.json: relative to the export if it exists there, else as given."""
    p = Path(ref)
    if not p.is_absolute() and (Path(export_dir) / p).exists():
        return str(Path(export_dir) / p)
    return ref


def _has_tokenizer(path: str) -> bool:
    return any((Path(path) / f).exists() for f in TOKENIZER_FILES)


def load_tokenizer(cfg: ExportConfig, export_dir: str | os.PathLike):
    """The tokenizer saved with the LLM, else the base LLM's."""
    from transformers import AutoTokenizer
    candidates = [resolve_path(cfg.llm, export_dir)] + ([cfg.base_llm] if cfg.base_llm else [])
    for c in candidates:
        if _has_tokenizer(c) or not Path(c).exists():  # a local dir with one, or a hub id
            return AutoTokenizer.from_pretrained(c)
    raise ExportError(f"{export_dir}: no tokenizer in {candidates}; save the tokenizer with the LLM")


def _default_dtype(device) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_llm_from_export(export_dir: str | os.PathLike, cfg: ExportConfig, dtype: torch.dtype):
    """The LLM as trained: base + adapter, or the export's own (full or merged) weights.

    Its files are checked by check_export (load_export and merge_export call it first).
    """
    export_dir = Path(export_dir)
    if cfg.merged or cfg.llm_mode == "full":
        return load_llm(resolve_path(cfg.llm, export_dir), "frozen", dtype)
    if cfg.llm_mode in ADAPTER_MODES:
        return load_llm(resolve_path(cfg.llm, export_dir), "lora", dtype, adapter=str(export_dir / ADAPTER_DIR))
    if cfg.llm_mode == "frozen":
        return load_llm(resolve_path(cfg.llm, export_dir), "frozen", dtype)
    raise ExportError(f"{export_dir}: unknown llm_mode {cfg.llm_mode!r} in {EXPORT_CONFIG}")


def load_vision_tower(cfg: ExportConfig, export_dir: str | os.PathLike, device="cpu",
                      dtype: str | None = None) -> VisionTower:
    """The export's vision tower in `dtype`, else cfg.vision_dtype, else bf16 (vlm-cache's default),
    decoding JPEGs as the training cache did (`tower.draft_to` = cfg.jpeg_draft_to)."""
    tower = VisionTower.from_pretrained(resolve_path(cfg.vision, export_dir), feature_layer=cfg.feature_layer,
                                        dtype=dtype or cfg.vision_dtype or "bfloat16", device=device)
    tower.draft_to = cfg.jpeg_draft_to
    return tower


def build_from_export(llm, tokenizer, export_dir: str | os.PathLike, cfg: ExportConfig,
                      num_patches: int, dtype: torch.dtype) -> VisionLanguageModel:
    """Attach the exported connectors (image, and video when it has one) to a loaded LLM; checks
    the visual token counts."""
    connectors = read_connector_config(export_dir)
    conn_cfg = dict(connectors["image"])
    vision_dim, num_tokens = conn_cfg.pop("vision_dim"), conn_cfg.pop("num_tokens")
    conn_cfg.pop("llm_dim")
    video_tokens = connectors["video"]["num_tokens"] if "video" in connectors else None
    if video_tokens != cfg.video_tokens_per_frame:
        raise ExportError(f"{export_dir}: {CONNECTOR_CONFIG} has "
                          + (f"a video connector of {video_tokens} tokens per frame" if video_tokens
                             else "no video connector")
                          + f" but {EXPORT_CONFIG} says video={cfg.video!r}")
    vlm = build_vlm(llm, tokenizer, vision_dim, num_patches, connector=conn_cfg, dtype=dtype,
                    video_tokens_per_frame=video_tokens)
    try:
        load_connectors(vlm, export_dir)
    except ValueError as e:   # names the file: weights that do not fit connector_config.json
        raise ExportError(str(e)) from e
    if not vlm.num_tokens["image"] == num_tokens == cfg.num_media_tokens:
        raise ExportError(f"{export_dir}: visual tokens per image disagree: connector gives "
                          f"{vlm.num_tokens['image']}, connector_config says {num_tokens}, "
                          f"{EXPORT_CONFIG} says num_media_tokens={cfg.num_media_tokens}")
    return vlm


def load_export(export_dir: str | os.PathLike, device: str | torch.device = "cpu",
                dtype: str | torch.dtype | None = None, with_vision: bool = True,
                vision_dtype: str | None = None):
    """(vlm, tokenizer, vision_tower, cfg) ready for inference; tower is None without with_vision.

    dtype: the LLM and connector dtype (default bf16 on CUDA, fp32 on CPU). The
    vision tower runs in `vision_dtype` if given (vlm-eval passes its cache's),
    else cfg.vision_dtype (the dtype the training cache was built in), else bf16.
    """
    export_dir = Path(export_dir)
    cfg = check_export(export_dir)
    dtype = resolve_dtype(dtype) if dtype is not None else _default_dtype(device)
    tokenizer = load_tokenizer(cfg, export_dir)
    tower = load_vision_tower(cfg, export_dir, device, vision_dtype) if with_vision else None
    if tower is not None and cfg.tiling is not None:
        try:
            tower.check_tiling(cfg.tiling_spec)
        except TilingError as e:
            raise ExportError(f"{export_dir / EXPORT_CONFIG}: {e}") from e
    num_patches = tower.feature_shape(cfg.pool)[0] if tower is not None else _patches_from_config(cfg, export_dir)
    llm = load_llm_from_export(export_dir, cfg, dtype)
    vlm = build_from_export(llm, tokenizer, export_dir, cfg, num_patches, dtype)
    unwrap_llm(vlm.llm).config.use_cache = True   # load_llm turns the KV cache off for training
    vlm.requires_grad_(False)
    vlm.eval()
    return vlm.to(device), tokenizer, tower, cfg


def _patches_from_config(cfg: ExportConfig, export_dir) -> int:
    """Patches per image without loading the tower's weights (only matters for connector kind mlp)."""
    from transformers import AutoConfig
    c = AutoConfig.from_pretrained(resolve_path(cfg.vision, export_dir))
    c = getattr(c, "vision_config", c)
    side = c.image_size // c.patch_size
    side = -(-side // cfg.pool)
    return side * side


@contextmanager
def publishing(out: Path, check=None, replaceable=None, kind: str = f"an export (no {EXPORT_CONFIG})"):
    """`with publishing(out) as tmp:` build an export in `tmp`; it then replaces `out` by two renames
    (the old export aside, the new one in; a crash between them leaves the old one beside `out`
    as `.NAME.tmp.*.old`, nothing deleted).

    `tmp` is a new directory beside `out` (same filesystem). On leaving the block the export
    in it is checked (every file opened: check_export); a failed build or check
    removes `tmp` and leaves `out` as it was. Only an export (has vlm_config.json) or an empty
    directory is ever replaced, and deleted only after the new one is in place; anything else at `out`
    is refused before any work, and left untouched.
    Other output kinds (export_hf's transformers directories) pass their own `check(tmp)` and
    `replaceable(out)` (defaults: check_export and "an export or empty") and name their `kind`.
    """
    check = check or check_export
    replaceable = replaceable or _is_export_or_empty
    if out.is_symlink() or (out.exists() and not (out.is_dir() and replaceable(out))):
        raise ExportError(f"{out} exists and is not {kind}; refusing to replace "
                          f"it. Move it away or choose another output path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.urandom(4).hex()}")   # a fresh name: nothing is cleared for it
    tmp.mkdir()
    try:
        yield tmp
        check(tmp)
        for f in tmp.rglob("*"):    # on disk before the rename makes them visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)   # ours and unpublished
        raise
    old = tmp.with_name(tmp.name + ".old")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_dir(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def _is_export_or_empty(path: Path) -> bool:
    return (path / EXPORT_CONFIG).is_file() or not any(path.iterdir())


def merge_export(export_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 save_dtype: str | torch.dtype | None = None) -> Path:
    """Write a standalone export: the LLM with LoRA merged in (+ tokenizer), connector, config.

    The merge runs in float32 and the result is saved in `save_dtype` (default: the
    base LLM's own dtype). A frozen-mode export gets a copy of its base LLM, so the
    output never depends on the base path. Built beside `out_dir`, checked, then swapped
    in (publishing); `out_dir` must be new, empty or an earlier merge output,
    and lie outside the export and its training run (check_merge_target).
    """
    from transformers import AutoConfig

    export_dir, out = Path(export_dir), Path(out_dir)
    cfg = check_export(export_dir)
    if cfg.merged:
        raise ExportError(f"{export_dir} is already merged; load it directly")
    check_merge_target(export_dir, out)
    llm_path = resolve_path(cfg.llm, export_dir)
    if save_dtype is None:
        base_cfg = AutoConfig.from_pretrained(llm_path)
        save_dtype = getattr(base_cfg, "dtype", None) or torch.float32
    save_dtype = resolve_dtype(save_dtype) if isinstance(save_dtype, str) else save_dtype
    tokenizer = load_tokenizer(cfg, export_dir)
    llm = load_llm_from_export(export_dir, cfg, torch.float32)
    if hasattr(llm, "merge_and_unload"):
        llm = llm.merge_and_unload()
    llm = llm.to(save_dtype)
    llm.config.use_cache = True    # load_llm turns the cache off for training; inference wants it

    with publishing(out) as tmp:
        llm.save_pretrained(str(tmp / LLM_DIR))
        tokenizer.save_pretrained(str(tmp / LLM_DIR))
        for name in (CONNECTOR_FILE, CONNECTOR_CONFIG):
            shutil.copy2(export_dir / name, tmp / name)
        merged = cfg.to_dict()
        merged.update(llm=LLM_DIR, merged=True, base_llm=cfg.base_llm or _portable(llm_path),
                      vision=_portable(resolve_path(cfg.vision, export_dir)),
                      merged_from=str(export_dir.resolve()))
        (tmp / EXPORT_CONFIG).write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return out


def run_dir(export_dir: str | os.PathLike) -> Path | None:
    """The training run an export belongs to: the nearest of its parent, grandparent and
    great-grandparent with checkpoints/ or config.yaml (<run>/export, <run>/checkpoints/step_N/export)."""
    for d in list(Path(export_dir).resolve().parents)[:3]:
        if (d / "checkpoints").is_dir() or (d / "config.yaml").is_file():
            return d
    return None


def check_output_location(export_dir: str | os.PathLike, out_dir: str | os.PathLike,
                          what_out: str = "merge output") -> None:
    """Refuse an output that is the export itself, its run directory, or inside or containing either
    (replacing it could delete what the export reads or what training made)."""
    src, out = Path(export_dir).resolve(), Path(out_dir).resolve()
    for protected, what in ((src, "the export it reads"), (run_dir(src), "that export's training run")):
        if protected is None:
            continue
        if out == protected or protected in out.parents or out in protected.parents:
            relation = "is" if out == protected else "lies inside" if protected in out.parents else "contains"
            raise ExportError(f"{what_out} {out_dir} {relation} {protected} ({what}); choose a path "
                              f"outside {protected}")


def check_merge_target(export_dir: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Refuse an output whose replacement could delete what the merge reads or what training made.

    Refused: the export itself, its run directory, anything inside either or containing
    either (check_output_location), and an existing non-empty directory that is not an earlier merge output.
    """
    check_output_location(export_dir, out_dir)
    out = Path(out_dir).resolve()
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"merge output {out_dir} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not _is_merge_output(out):
        raise ExportError(f"merge output {out_dir} is a non-empty directory that is not an earlier merge "
                          f"of an export (no {EXPORT_CONFIG} with \"merged\": true); refusing to replace "
                          f"it. Choose a new path (the merge of {export_dir} is never written over other files)")


def _is_merge_output(path: Path) -> bool:
    try:
        return read_export_config(path).merged
    except ExportError:
        return False


def _portable(ref: str) -> str:
    """An existing local path made absolute (the merged dir may be moved); a hub id unchanged."""
    return str(Path(ref).resolve()) if Path(ref).exists() else ref


def main(argv: list[str] | None = None) -> int:
    from vlm_dist.errors import run_cli
    return run_cli("vlm-export", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    """python -m vlm_dist.inference.export merge EXPORT_DIR OUT_DIR [--dtype bf16]: merge LoRA into one directory."""
    import argparse
    p = argparse.ArgumentParser(prog="vlm-export")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge an export's LoRA adapter into its LLM and write one directory "
                       "that vlm-generate / vlm-eval load in one call")
    m.add_argument("export_dir")
    m.add_argument("out_dir", help="a new path outside the export's run (or an earlier merge output)")
    m.add_argument("--dtype", default=None, help="dtype of the saved LLM (default: the base LLM's)")
    args = p.parse_args(argv)
    out = merge_export(args.export_dir, args.out_dir, args.dtype)
    print(f"merged export written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
