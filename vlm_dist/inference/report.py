"""`vlm-eval report`: one Markdown page and its PNGs comparing evaluations and training runs side by side.

    vlm-eval report runs/s1/eval runs/s2/eval runs/s1 runs/s2 --out runs/report \\
        [--names stage1 stage2 s1-train s2-train] [--baseline baselines/llava15_7b.yaml] [--image-root data/]

Each input is a directory holding eval.json (a `vlm-eval --out`: one metric column) and/or
metrics.jsonl (a training run: one loss curve); anything else is refused, named. The page
(report.md) has every numeric metric of every eval.json, one column per evaluation (and the
change when there are two, e.g. before/after), a baseline column when --baseline is given,
and the pictures: which_image.png (which-image accuracy per answer position), pope.png (POPE
F1 per setting), loss.png (each run's train and held-out loss against step) and captions.png
(held-out images with every evaluation's caption; needs --image-root, the root of the
images the records name). The whole directory is built beside --out and renamed into place.

The baseline file is a small YAML of published scores, each tied to its source:

    name: LLaVA-1.5-7B
    source: Liu et al., Improved Baselines with Visual Instruction Tuning (arXiv:2310.03744)
    scores:                       # eval.json metric paths, as fractions of 1 like ours
      pope.f1: 0.859
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from vlm_dist.errors import UserError
from vlm_dist.inference.evaluation import POPE_SETTINGS


class ReportInputError(UserError):
    """A report input (directory, baseline file, --names) that cannot be used; the message names it."""


# leaves of eval.json that are not metrics, or repeat others at a finer grain than a table wants
SKIP_KEYS = {"model", "world_size", "skipped", "per_num_images_position", "predicted_position", "correct"}
CAPTION_EXAMPLES = 8


@dataclass
class Source:
    """One report input: its column name, its eval.json (or None), its training metrics rows (or None)."""
    name: str
    path: Path
    eval: dict | None = None
    metrics: list[dict] | None = None
    captions: list[dict] = field(default_factory=list)


def load_source(path: str | Path, name: str | None = None) -> Source:
    path = Path(path)
    if not path.is_dir():
        raise ReportInputError(f"{path}: not a directory (give vlm-eval --out directories or training runs)")
    src = Source(name or path.name, path)
    if (path / "eval.json").is_file():
        src.eval = _read_json(path / "eval.json")
        if (path / "captions.jsonl").is_file():
            src.captions = _read_jsonl(path / "captions.jsonl")
    if (path / "metrics.jsonl").is_file():
        src.metrics = _read_jsonl(path / "metrics.jsonl")
    if src.eval is None and src.metrics is None:
        raise ReportInputError(f"{path}: no eval.json (a vlm-eval --out) and no metrics.jsonl (a training run)")
    return src


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportInputError(f"{path}: unreadable JSON ({e})") from e


def _read_jsonl(path: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportInputError(f"{path}: unreadable JSON lines ({e})") from e


def load_baseline(path: str | Path) -> dict:
    """{"name", "source", "scores": {metric path: number}}; a missing key or a non-number is named."""
    import yaml
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ReportInputError(f"--baseline {path}: unreadable ({e})") from e
    if not isinstance(data, dict):
        raise ReportInputError(f"--baseline {path}: expected a mapping with name, source and scores")
    for key in ("name", "source", "scores"):
        if not data.get(key):
            raise ReportInputError(f"--baseline {path}: missing {key!r}")
    if not isinstance(data["scores"], dict):
        raise ReportInputError(f"--baseline {path}: 'scores' must map metric paths to numbers")
    for k, v in data["scores"].items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ReportInputError(f"--baseline {path}: score {k!r} is {v!r}, not a number")
    return data


def flatten(obj: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of an eval.json as {"probes.per_position.2.accuracy": 0.9, ...}, in file order."""
    out: dict[str, float] = {}
    for k, v in obj.items():
        if k in SKIP_KEYS:
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = v
    return out


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, int):
        return str(v)
    return "nan" if math.isnan(v) else f"{v:.3f}"


def metrics_table(evals: list[Source], baseline: dict | None) -> str:
    flat = [flatten(s.eval) for s in evals]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    if baseline:
        keys += [k for k in baseline["scores"] if k not in keys]
    header = ["metric"] + [s.name for s in evals]
    delta = len(evals) == 2
    if delta:
        header.append(f"{evals[1].name} − {evals[0].name}")
    if baseline:
        header.append(f"{baseline['name']} (published)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for k in keys:
        vals = [f.get(k) for f in flat]
        row = [f"`{k}`"] + [_fmt(v) for v in vals]
        if delta:
            a, b = vals
            row.append(_fmt(b - a) if a is not None and b is not None and isinstance(a + b, float)
                       else "–")
        if baseline:
            row.append(_fmt(baseline["scores"].get(k)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def grouped_bars(groups: list[str], series: dict[str, list[float]], path: Path, title: str,
                 ylabel: str, chance: float | None = None) -> None:
    """One group of bars per x label, one bar per series (input)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(groups) * max(1, len(series)) / 2 + 2), 3.4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, values, width, label=name)
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", lw=1, label="chance")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_which_image(evals: list[Source], path: Path) -> bool:
    have = [s for s in evals if "probes" in s.eval]
    if not have:
        return False
    positions = sorted({p for s in have for p in s.eval["probes"]["per_position"]}, key=int)
    series = {s.name: [s.eval["probes"]["per_position"].get(p, {}).get("accuracy", 0.0) for p in positions]
              for s in have}
    grouped_bars([f"answer in image {p}" for p in positions], series, path,
                 "which-image accuracy per answer position", "accuracy")
    return True


def plot_pope(evals: list[Source], path: Path) -> bool:
    have = [s for s in evals if "pope" in s.eval]
    if not have:
        return False
    settings = [x for x in POPE_SETTINGS if any(x in s.eval["pope"] for s in have)]
    series = {s.name: [s.eval["pope"].get(x, {}).get("f1", 0.0) for x in settings] for s in have}
    grouped_bars(settings, series, path, "POPE F1 per setting", "F1")
    return True


def plot_losses(runs: list[Source], path: Path) -> bool:
    from vlm_dist.training.metrics import plot_losses as plot_run
    runs = [r for r in runs if any(m.get("kind") == "train" for m in r.metrics)]
    if not runs:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.2), squeeze=False)
    for ax, r in zip(axes[0], runs):
        plot_run([(m["step"], m["loss"]) for m in r.metrics if m.get("kind") == "train"],
                 [(m["step"], m["eval_loss"]) for m in r.metrics if m.get("kind") == "eval"], ax=ax, title=r.name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _wrap(text: str, width: int = 34) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width)) or "(empty)"


def plot_captions(evals: list[Source], image_root: Path, path: Path, n: int = CAPTION_EXAMPLES) -> bool:
    """Held-out images, each titled with every evaluation's caption (green: exact, red: not)."""
    from PIL import Image
    have = [s for s in evals if s.captions]
    if not have:
        return False
    by_id = [{row["id"]: row for row in s.captions} for s in have]
    ids = [row["id"] for row in have[0].captions if all(row["id"] in b for b in by_id)][:n]
    if not ids:
        return False
    plt = _plt()
    cols = min(4, len(ids))
    nrows = (len(ids) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, (2.6 + 0.45 * len(have)) * nrows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, rid in zip(axes.flat, ids):
        first = by_id[0][rid]
        img_path = image_root / first["images"][0]
        try:
            with Image.open(img_path) as im:
                ax.imshow(im.convert("RGB"))
            ax.axis("on")                          # a frame, so a white canvas shows where it ends
            ax.set_xticks([])
            ax.set_yticks([])
        except OSError as e:
            raise ReportInputError(f"caption image {img_path} (record {rid!r}): cannot open ({e}); "
                                   "is --image-root the root the records' image keys are under?") from e
        lines = [f"ref: {first['reference']}"] + [f"{s.name}: {b[rid]['prediction']}" for s, b in zip(have, by_id)]
        ax.set_title(_wrap(" | ".join(lines[:1])) + "\n" + "\n".join(_wrap(x) for x in lines[1:]), fontsize=7,
                     color="green" if by_id[-1][rid]["exact"] else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def caption_table(evals: list[Source], n: int = CAPTION_EXAMPLES) -> str:
    have = [s for s in evals if s.captions]
    if not have:
        return ""
    by_id = [{row["id"]: row for row in s.captions} for s in have]
    ids = [row["id"] for row in have[0].captions if all(row["id"] in b for b in by_id)][:n]
    head = ["id", "reference"] + [s.name for s in have]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rid in ids:
        cells = [rid, by_id[0][rid]["reference"]] + [b[rid]["prediction"] for b in by_id]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def render(sources: list[Source], out: Path, baseline: dict | None = None, image_root: Path | None = None,
           title: str = "Evaluation report", intro: str = "") -> str:
    """Write report.md and its PNGs into the (new, empty) directory `out`; returns the Markdown."""
    evals = [s for s in sources if s.eval is not None]
    runs = [s for s in sources if s.metrics is not None]
    parts = [f"# {title}\n"]
    if intro:
        parts.append(intro.strip() + "\n")
    parts.append("Inputs: " + ", ".join(f"**{s.name}** (`{s.path}`)" for s in sources) + "\n")
    if evals:
        parts.append("## Metrics\n\n" + metrics_table(evals, baseline) + "\n")
        if baseline:
            parts.append(f"Baseline: {baseline['name']}, from {baseline['source']}. Published scores are for "
                         "their benchmark, not for these sets: read them as a reference point.\n")
    if evals and plot_which_image(evals, out / "which_image.png"):
        parts.append("## Which image: accuracy per answer position\n\n![which image](which_image.png)\n")
    if evals and plot_pope(evals, out / "pope.png"):
        parts.append("## POPE (object hallucination)\n\n![POPE](pope.png)\n")
    if runs and plot_losses(runs, out / "loss.png"):
        parts.append("## Training loss\n\n![losses](loss.png)\n")
    table = caption_table(evals)
    if table:
        parts.append("## Caption examples\n")
        if image_root is not None and plot_captions(evals, image_root, out / "captions.png"):
            parts.append("![captions](captions.png)\n")
        parts.append(table + "\n")
    text = "\n".join(parts)
    (out / "report.md").write_text(text)
    return text


REPORT_MARKER = ".vlm_dist_report"   # written into every report directory: only such a directory is replaced


def check_report_target(out: Path, inputs: list[Path]) -> None:
    """Refuse an --out whose replacement could delete what the user did not ask to replace: a path that
    is, contains or lies inside an input, or an existing non-empty directory that is not an earlier report."""
    if str(out) in ("", ".", "/") or out.name in ("", ".", ".."):
        raise ReportInputError(f"--out {str(out)!r}: name a directory for the report (e.g. runs/report)")
    real = out.resolve()
    for src in inputs:
        src = src.resolve()
        if real == src or real.is_relative_to(src) or src.is_relative_to(real):
            raise ReportInputError(f"--out {out} is, contains or lies inside the input {src}; "
                                   "write the report elsewhere (replacing it would delete the input)")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ReportInputError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not (out / REPORT_MARKER).is_file():
        raise ReportInputError(f"--out {out} is a non-empty directory that vlm-eval report did not write "
                               f"(no {REPORT_MARKER}); refusing to replace it. Choose another path or empty it")


def publish_dir(tmp: Path, out: Path) -> None:
    """Rename a finished directory into place; an existing report there (checked by check_report_target)
    is set aside first and removed only afterwards."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old.{os.getpid()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def build_report(inputs: list[str | Path], out: str | Path, names: list[str] | None = None,
                 baseline: str | Path | None = None, image_root: str | Path | None = None,
                 title: str = "Evaluation report", intro: str = "") -> Path:
    """Load every input (errors name it), render into a temporary directory beside `out`, publish."""
    if not inputs:
        raise ReportInputError("no inputs: give eval directories (vlm-eval --out) and/or training runs")
    if names is not None and len(names) != len(inputs):
        raise ReportInputError(f"--names gives {len(names)} name(s) for {len(inputs)} input(s)")
    sources = [load_source(p, n) for p, n in zip(inputs, names or [None] * len(inputs))]
    dupes = sorted({s.name for s in sources if [t.name for t in sources].count(s.name) > 1})
    if dupes:
        raise ReportInputError(f"inputs share the column name(s) {dupes}; give --names")
    base = load_baseline(baseline) if baseline else None
    root = Path(image_root) if image_root else None
    if root is not None and not root.is_dir():
        raise ReportInputError(f"--image-root {root}: not a directory")
    out = Path(out)
    check_report_target(out, [Path(p) for p in inputs])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.{os.urandom(4).hex()}")   # a fresh name: nothing is cleared for it
    tmp.mkdir()
    try:
        render(sources, tmp, base, root, title, intro)
        (tmp / REPORT_MARKER).write_text("written by vlm-eval report; its next run may replace this directory\n")
        publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vlm-eval report", description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="eval directories (eval.json) and/or training runs (metrics.jsonl)")
    p.add_argument("--out", required=True, help="report directory (replaced as a whole when done)")
    p.add_argument("--names", nargs="+", default=None, help="one column name per input (default: dir names)")
    p.add_argument("--baseline", default=None, help="YAML of published scores: name, source, scores")
    p.add_argument("--image-root", default=None, help="root of the caption images (for captions.png)")
    p.add_argument("--title", default="Evaluation report")
    args = p.parse_args(argv)
    out = build_report(args.inputs, args.out, args.names, args.baseline, args.image_root, args.title)
    print(f"wrote {out / 'report.md'}", flush=True)
    return 0
