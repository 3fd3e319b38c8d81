"""The demo's evaluation and report: before/after accuracies in results.json, and report/ (report.md + PNGs).

Used by vlm_dist.demo.run; evaluation itself is `vlm-eval` (vlm_dist.inference.eval_cli), the
report is `vlm-eval report` (vlm_dist.inference.report) over the two eval directories and the
two training runs.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from vlm_dist.inference.evaluation import POPE_SETTINGS


INTRO = """Tiny SigLIP + tiny Qwen3 built locally; stage 1 (connector only, LLM frozen) then LoRA SFT,
each with `deepspeed launch/train.py`; evaluated with `vlm-eval` on held-out images
(new drawings, never trained on). "before" is the same model with a freshly initialised
connector. Which-image probes ask every question once per answer position, so a model
that always picks one position scores 1 there, 0 at the others and 1/k overall. POPE asks
"Is there a <colour> <shape> in the image?" about the shape shown (yes) and an absent one
(no): random, popular and adversarial (same colour or shape) negatives, see vlm_dist.demo.data.

Run time: {seconds:.0f} s (results.json has the headline numbers; eval_before/ and eval_after/ every one).

How the tiny models stand in for pretrained ones: SigLIP is trained with its own sigmoid
loss on the training images and captions. Qwen3 is trained on the training records (the
stage-1 and SFT questions and answers) with each image block holding the scene the
generator drew, as words ("red circle left"). It so learns the tasks from those words,
which real data does not carry, and never sees a pixel. What the VLM stages show is
grounding: the connector learns to turn SigLIP features into what the LLM reads there.
"""

MEDIA_INTRO = """What only the new media kinds can show (vlm_dist.demo.media_tasks, media_stage): "What shape
is the small object?" about one circle, square or triangle 8-14 px across on a 128 px image, which
the tower's one 32 px view shrinks to a blob 2-5 px across, and "When does the red square appear?"
about 8-frame clips (2 fps) where one frame shows a red square, answered with the time the video
block shows. Both runs train the same records for the same {steps} steps from the stage-1 export
with LoRA; "tiles" reads each image as its thumbnail plus 4 x 4 tiles of 32 px (the object at 1:1),
"untiled" the thumbnail alone (view 0 of the same cache). Stage 7 took {seconds:.0f} s.
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
         "--pope", data / "heldout_pope.jsonl",
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
        "pope": {key: res["pope"][key] for key in ("accuracy", "precision", "recall", "f1", "yes_ratio")},
        "pope_by_setting": {s: {key: res["pope"][s][key] for key in ("accuracy", "f1", "yes_ratio")}
                            for s in POPE_SETTINGS},
        "heldout_loss": res["loss"].get("loss"),
        "heldout_perplexity": res["loss"].get("perplexity"),
        "eval_dir": str(out),
    }


def write_report(out: Path, results: dict, run_dirs: list[Path], data: Path) -> Path:
    """results.json, the before/after table on the console, and out/report via `vlm-eval report`."""
    from vlm_dist.inference.report import build_report
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
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
    for s in POPE_SETTINGS:
        pb, pa = b["pope_by_setting"][s], a["pope_by_setting"][s]
        table.append(f"| POPE {s}: F1 / accuracy / yes-ratio | {pb['f1']:.3f} / {pb['accuracy']:.3f} / "
                     f"{pb['yes_ratio']:.2f} | {pa['f1']:.3f} / {pa['accuracy']:.3f} / {pa['yes_ratio']:.2f} |")
    report = build_report([b["eval_dir"], a["eval_dir"], *run_dirs], out / "report",
                          names=["before", "after"] + [d.name for d in run_dirs], image_root=data,
                          title="vlm_dist demo", intro=INTRO.format(seconds=results["seconds"]))
    if "media" in results:
        from vlm_dist.demo.media_stage import table as media_table
        media = media_table(results["media"])
        table += [""] + media
        from vlm_dist.fileio import write_text_atomic
        page = (report / "report.md").read_text()
        write_text_atomic(report / "report.md", page + "\n## High resolution and video (stage 7)\n\n"
                          + MEDIA_INTRO.format(**results["media"]) + "\n" + "\n".join(media) + "\n")
    print("\n" + "\n".join(table) + f"\n\ndemo took {results['seconds']:.0f}s; report: {report / 'report.md'}",
          flush=True)
    return report
