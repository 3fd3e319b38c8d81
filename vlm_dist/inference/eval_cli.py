"""vlm-eval: held-out loss, captions, grounding probes, NLVR2, multiple choice, POPE, text regression.

    vlm-eval --model runs/sft/export --cache cache/ --out runs/sft/eval \\
        --loss heldout.jsonl --captions captions.jsonl --probes which.jsonl \\
        --nlvr2 pairs.jsonl --mc mmmu.jsonl --pope pope.jsonl --text text.jsonl
    vlm-eval report runs/sft/eval_before runs/sft/eval runs/sft --out runs/sft/report \
        --baseline baselines/llava15_7b.yaml      # the Markdown + PNG report (vlm_dist.inference.report)
    torchrun --nproc_per_node 8 -m vlm_dist.inference.eval_cli ...     # records sharded over ranks
    srun -n 8 python -m vlm_dist.inference.eval_cli ...                 # (or mpirun -n 8): the same

Every set is a JSONL file of contract records (answer keys: see vlm_dist.inference.evaluation).
Image features come from --cache (a `vlm-cache build` of the records; its encoder
fingerprint must match the export's vision tower) or are computed online from
files under --image-root with the export's tower.

Writes to --out: eval.json (every metric), captions.jsonl + captions.md (the
caption report: image, reference, generated, exact match), probes.jsonl,
describe.jsonl, nlvr2.jsonl, mc.jsonl, pope.jsonl (one line per question: the reply and
how it was scored). Prints a summary table.

Each set is one entry of TASKS (its flag, the function that scores it, its summary line);
the tasks share one EvalContext: the export loaded once, its feature source, this rank's share.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from vlm_dist.errors import UserError
from vlm_dist.inference import evaluation as ev

if TYPE_CHECKING:
    from vlm_dist.dist import DistEnv


class EvalInputError(UserError):
    """An evaluation set or cache that cannot be used as given; the message names it."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog="vlm-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="export directory (or a merged export)")
    p.add_argument("--out", required=True, help="directory for eval.json and the reports")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--cache", help="feature cache built from these records (vlm-cache build)")
    src.add_argument("--image-root", help="compute features online from image files under this directory")
    p.add_argument("--loss", action="append", default=[], help="records for held-out loss / perplexity")
    p.add_argument("--captions", help="caption records (reference = last assistant turn)")
    p.add_argument("--describe", help="describe-each-image-in-order records ('Image k: ...' references)")
    p.add_argument("--probes", help="which-image records with \"answer\": 1-based image position")
    p.add_argument("--nlvr2", help="paired-image statements with \"answer\": true/false")
    p.add_argument("--mc", help="multiple-choice records with \"answer\": letter (MMMU / MIRB style)")
    p.add_argument("--pope", help="POPE yes/no object probes with \"answer\": yes/no and \"pope_setting\"")
    p.add_argument("--text", help="text-only records: perplexity of the model vs. its base LLM")
    p.add_argument("--no-permute", action="store_true", help="ask probes as written (no image rotation)")
    p.add_argument("--limit", type=int, default=None, help="at most this many records per set")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward for the loss sets")
    p.add_argument("--max-seq-len", type=int, default=None, help="skip (and list) longer samples")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    p.add_argument("--dtype", default=None, help="bf16 | fp16 | fp32 (default: bf16 on CUDA, fp32 on CPU)")
    args = p.parse_args(argv)
    if not any(getattr(args, s) for s in SETS):
        p.error("nothing to evaluate: give at least one of --" + ", --".join(SETS))
    needs_images = any(getattr(args, s) for s in SETS if s != "text")
    if needs_images and not (args.cache or args.image_root):
        p.error("image sets need --cache or --image-root for their features")
    return args


def _read(path: str, limit: int | None, need_answer: bool = False) -> list[dict]:
    from vlm_dist.contract.records import read_records
    recs = list(read_records(path))[:limit]
    if need_answer:
        missing = [r["id"] for r in recs if "answer" not in r]
        if missing:
            raise EvalInputError(f"{path}: {len(missing)} record(s) without an \"answer\" key, "
                             f"e.g. {missing[:5]}")
    return recs


ONLINE_MEMO = 32    # online-encoded items kept (features + layout), oldest dropped first


class Features:
    """Record -> features: from the cache, or online from image (and video) files.

    An untiled image-only export reads one (P, D) view per image (the cache's view 0). A tiled or
    video export (`media_aware`) reads every view of an item and its layout, as training did: from
    the cache (`views`, `layout`: the build's own tiles and frames), or online from files under
    --image-root (Generator.encode_media: the same tiling and frame sampling)."""

    def __init__(self, generator, cache=None, image_root: str | None = None):
        self.gen, self.cache, self.root = generator, cache, image_root
        self.media_aware = generator.tiling is not None or "video" in generator.media_tokens
        self._online: dict[tuple[str, str], tuple] = {}    # (kind, ref) -> (views, layout)

    def lookup(self, ref: str):
        if self.cache is not None:
            return self.cache.features_for(ref)
        return self.gen.encode_images([self._image(ref)])[0]

    def _image(self, ref: str):
        """An image under --image-root only (contained, a regular file, size-capped), decoded by the
        tower's one online decode path (VisionTower.decode), as the cache decodes it."""
        from vlm_dist.contract.images import read_under
        return self.gen.tower.decode(read_under(self.root, ref), name=os.path.join(self.root, ref))

    def _video(self, ref: str):
        """A video under --image-root only, its frames sampled as the training cache sampled them."""
        from vlm_dist.contract.images import read_under
        from vlm_dist.contract.video import DEFAULT_MAX_VIDEO_BYTES
        return self.gen.decode_video(read_under(self.root, ref, max_bytes=DEFAULT_MAX_VIDEO_BYTES),
                                     name=os.path.join(self.root, ref))

    def item(self, kind: str, ref: str):
        """(views (V, P, D), layout) of one image or video of a record (media_aware exports)."""
        if self.cache is not None:
            key = self.cache.resolve(ref)
            if kind == "image" and self.gen.tiling is None:   # an untiled export reads view 0 only
                return self.cache[key][None], None
            return self.cache.views(key), self.cache.layout(key)
        if (kind, ref) not in self._online:
            media, layouts = (self.gen.encode_media(images=[self._image(ref)]) if kind == "image"
                              else self.gen.encode_media(videos=[self._video(ref)]))
            if len(self._online) >= ONLINE_MEMO:       # a record's items are asked for twice: keep a few
                del self._online[next(iter(self._online))]
            self._online[(kind, ref)] = (media[kind]["features"], layouts[kind][0])
        return self._online[(kind, ref)]

    def views_lookup(self) -> dict:
        """{kind: reference -> (V, P, D)} for data.pack.collate (loss sets)."""
        return {kind: (lambda ref, kind=kind: self.item(kind, ref)[0]) for kind in self.gen.media_tokens}

    def layouts(self, record: dict) -> dict:
        """The record's items' layouts per kind, in order (PromptEncoder.encode's `layouts`)."""
        return {kind: [self.item(kind, ref)[1] for ref in record.get(field) or []]
                for kind, field in (("image", "images"), ("video", "videos")) if record.get(field)}

    def __call__(self, record: dict):
        import torch
        if self.media_aware:
            media = {}
            for kind, field in (("image", "images"), ("video", "videos")):
                if record.get(field):
                    views = [self.item(kind, ref)[0] for ref in record[field]]
                    media[kind] = {"features": torch.cat(views), "counts": torch.tensor([sum(len(v) for v in views)])}
            return media, self.layouts(record)
        if not record["images"]:
            return None
        if self.cache is not None:
            return torch.stack([self.cache.features_for(r) for r in record["images"]])
        return self.gen.encode_images([self._image(r) for r in record["images"]])

    @property
    def shape(self):
        return self.cache.feature_shape if self.cache is not None else \
            self.gen.tower.feature_shape(self.gen.cfg.pool)


def open_cache(path: str, tower, pool: int, cfg=None):
    """The cache, refused if its encoder differs from the export's tower (then features would too),
    or, for a tiled or video export (`cfg`), if its tiling or frame sampling differs from training's."""
    from vlm_dist.cache.reader import FeatureCache, fingerprint_differences
    cache = FeatureCache(path)
    tiling = cfg.tiling_spec if cfg is not None else None
    sampling = cfg.video_sampling if cfg is not None and cache.video_sampling is not None else None
    diffs = fingerprint_differences(cache.fingerprint, tower.fingerprint(pool, tiling=tiling,
                                                                         video_sampling=sampling))
    if diffs:
        raise EvalInputError(f"cache {path} was built with another encoder than the export's "
                         f"vision tower:\n  " + "\n  ".join(diffs))
    return cache


def cfg_has_vision_dtype(export_dir: str) -> bool:
    from vlm_dist.inference.export import read_export_config
    return read_export_config(export_dir).vision_dtype is not None


def caption_markdown(rows: list[dict]) -> str:
    lines = ["| id | image(s) | reference | generated | exact |", "|---|---|---|---|---|"]
    for r in rows:
        imgs = " ".join(f"`{i}`" for i in r["images"])
        cells = [r["id"], imgs, r["reference"], r["prediction"], "yes" if r["exact"] else "no"]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def start_ranks() -> DistEnv:
    """Where this process sits (vlm_dist.dist.discover: torchrun, deepspeed, srun, mpirun, plain
    python); with more than one rank the process group starts, so records are sharded once."""
    from vlm_dist.dist import discover, init_distributed
    env = discover()
    return init_distributed() if env.world_size > 1 else env


# -- the tasks: one per set flag, each returning its metrics and its report rows -------------------
class EvalContext:
    """What every task uses: the loaded export, its feature source, this rank's place and the flags."""

    def __init__(self, args, env: DistEnv):
        import torch

        from vlm_dist.inference.export import load_export
        from vlm_dist.inference.generate import GenerationSettings, Generator

        self.args, self.rank, self.world = args, env.rank, env.world_size
        self.device = args.device or (f"cuda:{env.local_rank}" if torch.cuda.is_available() else "cpu")
        cache_dtype = None
        if args.cache:   # the tower runs in the cache's dtype unless the export recorded its own
            from vlm_dist.cache.reader import read_manifest
            cache_dtype = read_manifest(args.cache)["fingerprint"]["dtype"]
        self.vlm, self.tokenizer, tower, self.cfg = load_export(
            args.model, device=self.device, dtype=args.dtype,
            vision_dtype=None if cfg_has_vision_dtype(args.model) else cache_dtype)
        if args.cache:   # features come from the cache: online decodes do as it did (no field: full decode)
            from vlm_dist.cache.reader import fingerprint_field, read_manifest
            tower.draft_to = fingerprint_field(read_manifest(args.cache)["fingerprint"], "jpeg_draft_to")
        self.gen = Generator(self.vlm, self.tokenizer, self.cfg, tower)
        cache = open_cache(args.cache, tower, self.cfg.pool, self.cfg) if args.cache else None
        self.feats = Features(self.gen, cache, args.image_root)
        self.settings = GenerationSettings(max_new_tokens=args.max_new_tokens)

    def read(self, path: str, need_answer: bool = False) -> list[dict]:
        return _read(path, self.args.limit, need_answer)

    def replies(self, records: list[dict]) -> list[str]:
        """The model's reply to every record, generated for this rank's share and gathered."""
        mine = ev.shard(list(range(len(records))), self.rank, self.world)     # indices: ids may repeat
        got = ev.generate_replies(self.gen, [records[i] for i in mine], self.feats, self.settings)
        by_index = dict(ev.gather_lists(list(zip(mine, got))))
        return [by_index[i] for i in range(len(records))]

    def loss(self, records: list[dict], feature_lookup, vlm=None) -> dict:
        """Loss and perplexity over `records`, computed for this rank's share and merged."""
        aware = self.feats.media_aware and feature_lookup is not None
        part = ev.loss_sums(self.vlm if vlm is None else vlm, self.tokenizer, self.cfg.template,
                            self.gen.media_tokens, ev.shard(records, self.rank, self.world),
                            self.feats.views_lookup() if aware else feature_lookup, self.feats.shape,
                            self.args.batch_size, self.args.max_seq_len,
                            layouts=self.feats.layouts if aware else None)
        return ev.merge_loss(ev.gather(part))


def loss_task(ctx: EvalContext, paths: list[str]):
    return ctx.loss([r for path in paths for r in ctx.read(path)], ctx.feats.lookup), {}


def captions_task(ctx: EvalContext, path: str):
    recs = ctx.read(path)
    preds = ctx.replies(recs)
    refs = [r["conversations"][-1]["content"] for r in recs]
    metrics = ev.caption_metrics({r["id"]: p for r, p in zip(recs, preds)},
                                 {r["id"]: [ref] for r, ref in zip(recs, refs)})
    rows = [{"id": r["id"], "images": r.get("images", []), "videos": r.get("videos", []), "reference": ref, "prediction": p,
             "exact": ev.normalize_text(p) == ev.normalize_text(ref)} for r, p, ref in zip(recs, preds, refs)]
    report = (f"# Caption report\n\nmodel `{ctx.args.model}`, {len(rows)} images; exact match "
              f"{metrics['accuracy']:.3f}, BLEU-4 {metrics['bleu_4']:.3f}, CIDEr {metrics['cider']:.3f}\n\n"
              + caption_markdown(rows))
    return metrics, {"captions.jsonl": rows, "captions.md": report}


def describe_task(ctx: EvalContext, path: str):
    recs = ctx.read(path)
    preds = ctx.replies(recs)
    refs = [r["conversations"][-1]["content"] for r in recs]
    return ev.score_ordered_descriptions(preds, refs), {
        "describe.jsonl": [{"id": r["id"], "reference": ref, "prediction": p}
                           for r, p, ref in zip(recs, preds, refs)]}


def probes_task(ctx: EvalContext, path: str):
    recs = ctx.read(path, need_answer=True)
    asked = recs if ctx.args.no_permute else ev.rotated_probes(recs)
    preds = ctx.replies(asked)
    picked = [ev.parse_image_choice(p, len(r["images"])) for r, p in zip(asked, preds)]
    metrics = dict(ev.score_choices(picked, [int(r["answer"]) for r in asked], [len(r["images"]) for r in asked]),
                   permuted=not ctx.args.no_permute, records=len(recs))
    return metrics, {"probes.jsonl": [{"id": r["id"], "images": r.get("images", []), "answer": int(r["answer"]),
                                       "prediction": p, "picked": c} for r, p, c in zip(asked, preds, picked)]}


def nlvr2_task(ctx: EvalContext, path: str):
    recs = ctx.read(path, need_answer=True)
    preds = ctx.replies(recs)
    answers = [ev.answer_bool(r["answer"]) for r in recs]
    parsed = [ev.parse_bool(p) for p in preds]
    return ev.score_binary(parsed, answers), {
        "nlvr2.jsonl": [{"id": r["id"], "answer": a, "prediction": p, "parsed": b}
                        for r, a, p, b in zip(recs, answers, preds, parsed)]}


def mc_task(ctx: EvalContext, path: str):
    recs = ctx.read(path, need_answer=True)
    preds = ctx.replies(recs)
    parsed = [ev.parse_option(p, len(r.get("choices") or "ABCDEFGHIJ"), r.get("choices"))
              for r, p in zip(recs, preds)]
    return ev.score_mc(parsed, [str(r["answer"]) for r in recs]), {
        "mc.jsonl": [{"id": r["id"], "answer": r["answer"], "prediction": p, "parsed": c}
                     for r, p, c in zip(recs, preds, parsed)]}


def pope_task(ctx: EvalContext, path: str):
    recs = ctx.read(path, need_answer=True)
    for r in recs:
        if str(r["answer"]).lower() not in ("yes", "no") or r.get("pope_setting") not in ev.POPE_SETTINGS:
            raise EvalInputError(f"--pope {path}: record {r['id']!r} needs \"answer\": yes|no and "
                                 f"\"pope_setting\": one of {list(ev.POPE_SETTINGS)} (got {r['answer']!r}, "
                                 f"{r.get('pope_setting')!r})")
    preds = ctx.replies(recs)
    parsed = [ev.parse_yes_no(p) for p in preds]
    answers = [str(r["answer"]).lower() for r in recs]
    return ev.score_pope(parsed, answers, [r["pope_setting"] for r in recs]), {
        "pope.jsonl": [{"id": r["id"], "images": r.get("images", []), "setting": r["pope_setting"], "answer": a,
                        "prediction": p, "parsed": y} for r, a, p, y in zip(recs, answers, preds, parsed)]}


def _pope_summary(m: dict) -> str:
    per = ", ".join(f"{s} {m[s]['f1']:.3f}/{m[s]['accuracy']:.3f}/{m[s]['yes_ratio']:.2f}"
                    for s in ev.POPE_SETTINGS if s in m)
    return f"{m['f1']:.3f} (F1/accuracy/yes-ratio: {per})"


def text_task(ctx: EvalContext, path: str):
    recs = ctx.read(path)
    if any(r["images"] for r in recs):
        raise EvalInputError(f"--text {path} must hold text-only records (no images)")
    model = ctx.loss(recs, None)
    with base_model(ctx.vlm, ctx.cfg, ctx.args.model, ctx.device) as base_vlm:
        base = ctx.loss(recs, None, vlm=base_vlm)
    return {"perplexity": model["perplexity"], "base_perplexity": base["perplexity"],
            "ratio": model["perplexity"] / base["perplexity"], "tokens": model["tokens"],
            "samples": model["samples"]}, {}


def _per_position(metrics: dict) -> str:
    return ", ".join(f"{k}: {v['accuracy']:.2f}" for k, v in metrics["per_position"].items())


@dataclass(frozen=True)
class Task:
    """One evaluation set. `run(ctx, flag value)` -> (its eval.json entry, {file in --out: JSONL rows
    or text}); `summary(entry)` is its line in the printed table, after `label`."""
    run: Callable[[EvalContext, Any], tuple[dict, dict]]
    label: str
    summary: Callable[[dict], str]


TASKS = {   # run, and summarised, in this order
    "loss": Task(loss_task, "held-out loss / ppl", lambda m: f"{m['loss']:.4f} / {m['perplexity']:.3f}"),
    "captions": Task(captions_task, "caption exact match",
                     lambda m: f"{m['accuracy']:.3f} (BLEU-4 {m['bleu_4']:.3f}, CIDEr {m['cider']:.3f})"),
    "describe": Task(describe_task, "describe-in-order exact",
                     lambda m: f"{m['accuracy']:.3f} (per image {_per_position(m)})"),
    "probes": Task(probes_task, "which-image accuracy",
                   lambda m: f"{m['accuracy']:.3f} (per position {_per_position(m)}; last-image rate "
                             f"{m['last_image_rate']:.2f} vs chance {m['last_image_chance']:.2f})"),
    "nlvr2": Task(nlvr2_task, "NLVR2 true/false", lambda m: f"{m['accuracy']:.3f}"),
    "mc": Task(mc_task, "multiple choice", lambda m: f"{m['accuracy']:.3f}"),
    "pope": Task(pope_task, "POPE F1", _pope_summary),
    "text": Task(text_task, "text ppl (base)",
                 lambda m: f"{m['perplexity']:.3f} ({m['base_perplexity']:.3f}, x{m['ratio']:.3f})"),
}
SETS = tuple(TASKS)


def write_report(path: Path, content: list[dict] | str) -> None:
    """A task's file: JSONL rows (one object a line) or text."""
    if isinstance(content, str):
        path.write_text(content)
        return
    with open(path, "w") as f:
        for row in content:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def run(args, env: DistEnv) -> dict:
    """Every task whose flag is given, in TASKS order; rank 0 writes the reports and eval.json."""
    ctx = EvalContext(args, env)
    results: dict = {"model": str(args.model), "world_size": env.world_size}
    out = Path(args.out)
    main = env.rank == 0
    if main:
        out.mkdir(parents=True, exist_ok=True)
    for name, task in TASKS.items():
        value = getattr(args, name)
        if not value:
            continue
        results[name], reports = task.run(ctx, value)
        if main:
            for file_name, content in reports.items():
                write_report(out / file_name, content)
    if main:
        (out / "eval.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return results


class base_model:
    """Context manager: the VLM with its LLM's fine-tuning undone (adapter disabled, or the base loaded)."""

    def __init__(self, vlm, cfg, export_dir, device):
        self.vlm, self.cfg, self.export_dir, self.device = vlm, cfg, export_dir, device
        self._ctx = None

    def __enter__(self):
        from vlm_dist.model.build import load_llm
        from vlm_dist.model.vlm import VisionLanguageModel
        if hasattr(self.vlm.llm, "disable_adapter"):
            self._ctx = self.vlm.llm.disable_adapter()
            self._ctx.__enter__()
            return self.vlm
        if self.cfg.base_llm is None:
            if self.cfg.llm_mode == "frozen":
                return self.vlm          # the LLM is the base LLM
            raise EvalInputError(f"--text: {self.export_dir} has no base_llm in vlm_config.json to "
                             "compare against")
        dtype = next(self.vlm.parameters()).dtype
        llm = load_llm(self.cfg.base_llm, "frozen", dtype).to(self.device).eval()
        return VisionLanguageModel(llm, dict(self.vlm.connectors), self.vlm.pad_ids, self.vlm.num_tokens)

    def __exit__(self, *exc):
        if self._ctx is not None:
            self._ctx.__exit__(*exc)
        return False


def summary_table(results: dict) -> str:
    rows = [(task.label, task.summary(results[name])) for name, task in TASKS.items() if name in results]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    from vlm_dist.errors import run_cli
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["report"]:
        from vlm_dist.inference import report
        return run_cli("vlm-eval report", lambda: report.main(argv[1:]))
    return run_cli("vlm-eval", lambda: _main(argv))


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    env = start_ranks()
    results = run(args, env)
    from vlm_dist.dist import barrier, shutdown
    if env.rank == 0:
        print(summary_table(results), flush=True)
        print(f"wrote {Path(args.out) / 'eval.json'}", flush=True)
    barrier()    # no rank tears its gloo pairs down while another still uses them (that aborts it)
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
