"""The demo's evaluation and report: before/after accuracies, results.json, report.md, two PNGs.

Used by vlm_dist.demo.run; evaluation itself is `vlm-eval` (vlm_dist.inference.eval_cli).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path


REPORT = """# vlm_dist demo

Tiny SigLIP + tiny Qwen3 built locally; stage 1 (connector only, LLM frozen) then LoRA SFT,
each with `deepspeed launch/train.py`; evaluated with `vlm-eval` on held-out images
(new drawings, never trained on). "before" is the same model with a freshly initialised
connector. Which-image probes ask every question once per answer position, so a model
that always picks one position scores 1 there, 0 at the others and 1/k overall.

{table}

Run time: {seconds:.0f} s (results.json has every number).

How the tiny models stand in for pretrained ones: SigLIP is trained with its own sigmoid
loss on the training images and captions. Qwen3 is trained on the training records (the
stage-1 and SFT questions and answers) with each image block holding the scene the
generator drew, as words ("red circle left"). It so learns the tasks from those words,
which real data does not carry, and never sees a pixel. What the VLM stages show is
grounding: the connector learns to turn SigLIP features into what the LLM reads there.

![losses](loss.png)

Held-out images with the generated captions:

![samples](samples.png)
"""


def before_export(out: Path, models: dict, trained_export: Path) -> Path:
    """The "before" model: the stage-1 export's layout with a freshly initialised connector."""
    import torch
    from safetensors.torch import load_file, save_file

    from vlm_dist.model.connector import Connector
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(trained_export, out)
    cfg = json.loads((out / "connector_config.json").read_text())["image"]
    cfg.pop("num_tokens")
    torch.manual_seed(0)
    fresh = {f"image.{k}": v for k, v in Connector(**cfg).state_dict().items()}
    assert fresh.keys() == load_file(str(out / "connector.safetensors")).keys()
    save_file({k: v.contiguous() for k, v in fresh.items()}, str(out / "connector.safetensors"))
    return out


def evaluate(export: Path, data: Path, cache: Path, out: Path, logs: Path, run) -> dict:
    """vlm-eval on the held-out sets; returns the demo's headline numbers."""
    run([sys.executable, "-m", "vlm_dist.inference.eval_cli", "--model", export, "--cache", cache, "--out", out,
         "--loss", data / "heldout_loss.jsonl", "--captions", data / "heldout_captions.jsonl",
         "--describe", data / "heldout_describe.jsonl", "--probes", data / "heldout_which.jsonl",
         "--max-new-tokens", "48"], logs / f"{out.name}.log")
    res = json.loads((out / "eval.json").read_text())
    probes = res["probes"]
    return {
        "caption_accuracy": res["captions"]["accuracy"],
        "caption_bleu_4": res["captions"].get("bleu_4"),
        "caption_cider": res["captions"].get("cider"),
        "describe": res.get("describe"),
        "which_image_accuracy": probes["accuracy"],
        "which_image_accuracy_by_position": {pos: v["accuracy"] for pos, v in probes["per_position"].items()},
        "which_image_last_image_rate": probes["last_image_rate"],
        "heldout_loss": res["loss"].get("loss"),
        "heldout_perplexity": res["loss"].get("perplexity"),
        "eval_dir": str(out),
    }


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def plot_losses(run_dirs: list[Path], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vlm_dist.training.metrics import plot_losses as plot_run
    fig, axes = plt.subplots(1, len(run_dirs), figsize=(5 * len(run_dirs), 3.2))
    for ax, run_dir in zip(axes, run_dirs):
        rows = _metrics(run_dir)
        plot_run([(r["step"], r["loss"]) for r in rows if r["kind"] == "train"],
                 [(r["step"], r["eval_loss"]) for r in rows if r["kind"] == "eval"], ax=ax, title=run_dir.name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_samples(eval_dir: Path, data: Path, path: Path, n: int = 12) -> None:
    """A grid of held-out images with the caption the trained model generated."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    rows = [json.loads(line) for line in (eval_dir / "captions.jsonl").read_text().splitlines()][:n]
    cols = 4
    fig, axes = plt.subplots((len(rows) + cols - 1) // cols, cols, figsize=(3.2 * cols, 3.0 * ((len(rows) + 3) // 4)))
    for ax in axes.flat:
        ax.axis("off")
    for ax, row in zip(axes.flat, rows):
        ax.imshow(Image.open(data / row["images"][0]))
        mark = "ok" if row["exact"] else "x"
        ax.set_title(f"[{mark}] {row['prediction']}", fontsize=8, color="green" if row["exact"] else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, results: dict, run_dirs: list[Path], data: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    plot_losses(run_dirs, out / "loss.png")
    plot_samples(Path(results["after"]["eval_dir"]), data, out / "samples.png")
    b, a = results["before"], results["after"]
    table = ["| metric | before | after |", "|---|---|---|"]
    for key in ("caption_accuracy", "which_image_accuracy", "heldout_loss"):
        table.append(f"| {key} | {b[key]:.3f} | {a[key]:.3f} |")
    for pos, acc in sorted(a["which_image_accuracy_by_position"].items()):
        before = b["which_image_accuracy_by_position"].get(pos, float("nan"))
        table.append(f"| which_image_accuracy, answer in position {pos} | {before:.3f} | {acc:.3f} |")
    for pos, v in sorted(a["describe"]["per_position"].items()):
        before = b["describe"]["per_position"].get(pos, {}).get("accuracy", float("nan"))
        table.append(f"| describe-in-order, image {pos} exact | {before:.3f} | {v['accuracy']:.3f} |")
    text = "\n".join(table)
    print("\n" + text + f"\n\ndemo took {results['seconds']:.0f}s; report: {out / 'report.md'}", flush=True)
    (out / "report.md").write_text(REPORT.format(table=text, seconds=results["seconds"]))

