"""`vlm-eval report`: renders from eval directories and training runs in their real formats.

The eval directories are written the way vlm-eval writes them (eval.json from the scoring
functions on hand-made replies, captions.jsonl rows), the runs through MetricsLog.

    python -m pytest tests/test_report.py -q
"""
import json
from pathlib import Path

import pytest
from PIL import Image

from vlm_dist.demo.data import Scene, draw
from vlm_dist.inference import evaluation as ev
from vlm_dist.inference.eval_cli import main as eval_main
from vlm_dist.inference.report import build_report, flatten
from vlm_dist.training.metrics import MetricsLog

REPO = Path(__file__).resolve().parents[1]
SCENES = [Scene("red", "circle", "left"), Scene("blue", "square", "right"), Scene("green", "triangle", "left")]


def _eval_dir(path: Path, images: Path, good: bool) -> Path:
    """An eval directory as vlm-eval writes it; `good` answers better than the other."""
    import random
    path.mkdir(parents=True)
    rng = random.Random(0)
    caps = []
    for i, s in enumerate(SCENES):
        key = f"img{i}.png"
        if not (images / key).exists():
            draw(s, 64, rng).save(images / key)
        pred = s.caption() if good or i == 0 else "a yellow circle on the left."
        caps.append({"id": f"cap{i}", "images": [key], "reference": s.caption(), "prediction": pred,
                     "exact": pred == s.caption()})
    answers = [1, 2, 3, 1, 2, 3]
    picked = answers if good else [3, 3, 3, 1, 3, 3]
    pope_answers = ["yes", "no"] * 6
    pope_preds = pope_answers if good else ["yes"] * 12
    settings = [s for s in ev.POPE_SETTINGS for _ in range(4)]
    res = {"model": str(path), "world_size": 1,
           "loss": {"loss": 0.5 if good else 2.0, "perplexity": 1.6 if good else 7.4, "tokens": 100, "samples": 6,
                    "skipped": {}},
           "captions": {"accuracy": sum(c["exact"] for c in caps) / 3, "n": 3, "bleu_4": 0.5, "cider": 1.0},
           "probes": dict(ev.score_choices(picked, answers, [3] * 6), permuted=True, records=2),
           "pope": ev.score_pope(pope_preds, pope_answers, settings)}
    (path / "eval.json").write_text(json.dumps(res, indent=2))
    (path / "captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in caps))
    return path


def _run_dir(path: Path, steps: int) -> Path:
    path.mkdir(parents=True)
    log = MetricsLog(path, enabled=True, total_steps=steps)
    for step in range(1, steps + 1):
        log.step(step, loss=3.0 / step, lr=1e-3, grad_norm=1.0, tokens=10, samples=1, seconds=0.1)
    log.eval(steps, 0.9)
    log.close()
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_inputs")
    images = root / "images"
    images.mkdir()
    return {"images": images, "before": _eval_dir(root / "eval_before", images, good=False),
            "after": _eval_dir(root / "eval_after", images, good=True),
            "stage1": _run_dir(root / "stage1", 20), "stage2": _run_dir(root / "stage2", 30)}


def test_report_renders_every_metric_and_picture(inputs, tmp_path):
    out = build_report([inputs["before"], inputs["after"], inputs["stage1"], inputs["stage2"]], tmp_path / "report",
                       names=["before", "after", "s1", "s2"], image_root=inputs["images"])
    text = (out / "report.md").read_text()
    before = json.loads((inputs["before"] / "eval.json").read_text())
    after = json.loads((inputs["after"] / "eval.json").read_text())
    table = [line for line in text.splitlines() if line.startswith("| `")]
    assert table[0] and "| metric | before | after | after − before |" in text
    for key, value in flatten(after).items():      # every metric has its row, both columns
        row = next(line for line in table if line.startswith(f"| `{key}` |"))
        assert f" {value:.3f} |" in row or f" {value} |" in row, (key, row)
        assert f" {flatten(before)[key]:.3f} |" in row or f" {flatten(before)[key]} |" in row
    pope_f1 = next(line for line in table if line.startswith("| `pope.f1` |"))
    assert f"| {before['pope']['f1']:.3f} | {after['pope']['f1']:.3f} | " \
           f"{after['pope']['f1'] - before['pope']['f1']:.3f} |" in pope_f1
    assert "`probes.per_position.3.accuracy`" in text and "`model`" not in text
    sizes = {}
    for name in ("which_image.png", "pope.png", "loss.png", "captions.png"):
        assert f"]({name})" in text
        with Image.open(out / name) as im:
            im.verify()
        with Image.open(out / name) as im:
            sizes[name] = im.size
            assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 250, (name, im.size)
    assert sizes["loss.png"][0] >= 2 * 400            # one panel per run
    assert "a yellow circle on the left." in text      # the caption table shows each column's caption
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]   # no temporary directory left


def test_baseline_column_appears_with_its_source(inputs, tmp_path):
    baseline = REPO / "launch" / "configs" / "baselines" / "llava-1.5-7b.yaml"
    out = build_report([inputs["before"], inputs["after"]], tmp_path / "r", baseline=baseline)
    text = (out / "report.md").read_text()
    assert "LLaVA-1.5-7B (published)" in text and "arXiv:2310.03744" in text
    row = next(line for line in text.splitlines() if line.startswith("| `pope.f1` |"))
    assert row.rstrip().endswith("| 0.859 |")
    mmbench = next(line for line in text.splitlines() if line.startswith("| `mmbench.accuracy` |"))
    assert mmbench.startswith("| `mmbench.accuracy` | – | – | – | 0.643 |")    # a baseline-only row
    assert not (out / "captions.png").exists()         # no --image-root: the caption table only


def test_report_replaces_only_an_old_report_never_a_directory_it_did_not_write(inputs, tmp_path, capsys):
    out = tmp_path / "r"
    build_report([inputs["after"]], out)
    (out / "stale.png").write_bytes(b"old")
    build_report([inputs["after"]], out)                  # an earlier report: replaced whole
    assert not (out / "stale.png").exists() and (out / "report.md").exists()
    assert not (out / "which_image.png").stat().st_size == 0

    mine = tmp_path / "mine"                               # somebody's directory: refused, untouched
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert eval_main(["report", str(inputs["after"]), "--out", str(mine)]) == 2
    assert "did not write" in capsys.readouterr().err and (mine / "notes.txt").read_text() == "keep"
    for target in (inputs["after"], inputs["after"] / "sub", inputs["after"].parent):   # is / inside / contains
        assert eval_main(["report", str(inputs["after"]), "--out", str(target)]) == 2
        assert "is, contains or lies inside the input" in capsys.readouterr().err
    assert (inputs["after"] / "eval.json").exists()
    for target in (".", "/"):
        assert eval_main(["report", str(inputs["after"]), "--out", target]) == 2
        assert "Traceback" not in capsys.readouterr().err
    a_file = tmp_path / "file.md"
    a_file.write_text("x")
    assert eval_main(["report", str(inputs["after"]), "--out", str(a_file)]) == 2
    assert "not a directory" in capsys.readouterr().err and a_file.read_text() == "x"


def test_bad_inputs_are_named_in_one_line(inputs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert eval_main(["report", str(inputs["after"]), str(empty), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(empty) in err and "no eval.json" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()               # nothing published
    assert eval_main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "missing: not a directory" in capsys.readouterr().err
    assert eval_main(["report", str(inputs["after"]), "--out", str(tmp_path / "r"), "--names", "a", "b"]) == 2
    assert "--names gives 2 name(s) for 1 input(s)" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: X\nsource: somewhere\nscores:\n  pope.f1: high\n")
    assert eval_main(["report", str(inputs["after"]), "--out", str(tmp_path / "r"), "--baseline", str(bad)]) == 2
    assert f"--baseline {bad}: score 'pope.f1' is 'high', not a number" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "eval.json").write_text("{not json")
    assert eval_main(["report", str(broken), "--out", str(tmp_path / "r")]) == 2
    assert f"{broken / 'eval.json'}: unreadable JSON" in capsys.readouterr().err


def test_cli_writes_the_report(inputs, tmp_path, capsys):
    rc = eval_main(["report", str(inputs["before"]), str(inputs["after"]), str(inputs["stage2"]),
                    "--out", str(tmp_path / "r"), "--image-root", str(inputs["images"]), "--title", "Stages"])
    assert rc == 0 and "report.md" in capsys.readouterr().out
    text = (tmp_path / "r" / "report.md").read_text()
    assert text.startswith("# Stages") and "| metric | eval_before | eval_after |" in text
