"""The demo's own pieces: the tiny towers' pretraining, the LLM's reading corpus, and the whole demo."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlm_dist.contract.media import IMAGE, block_ids
from vlm_dist.contract.prompt import IGNORE, PromptEncoder
from vlm_dist.contract.records import read_records
from vlm_dist.demo import run as demo
from vlm_dist.demo.data import DemoDataConfig, generate
from vlm_dist.testing.tiny import (build_tiny_models, build_tiny_siglip, pretrain_tiny_llm, pretrain_tiny_siglip,
                                   siglip_zero_shot)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("small_demo")
    generate(root / "data", DemoDataConfig().scaled(0.1))
    return root


def test_siglip_pretraining_learns_every_caption(small_demo, tmp_path):
    """The stand-in SigLIP must separate the scenes; a collapsed tower would make the demo unlearnable."""
    paths, captions = demo.caption_pairs(small_demo / "data")
    assert len(set(captions)) == 24
    build_tiny_siglip(tmp_path / "siglip")
    before = siglip_zero_shot(tmp_path / "siglip", paths, captions)
    losses = pretrain_tiny_siglip(tmp_path / "siglip", paths, captions, steps=300)
    after = siglip_zero_shot(tmp_path / "siglip", paths, captions)
    held = siglip_zero_shot(tmp_path / "siglip", *demo.caption_pairs(small_demo / "data", "heldout_captions.jsonl"),
                            words=captions)
    assert losses[-1] < losses[0] / 4
    assert before < 0.25 and after >= 0.9 and held >= 0.8, (before, after, held)


def test_reading_corpus_writes_each_scene_into_its_block(small_demo):
    models = build_tiny_models(small_demo / "models")
    data = small_demo / "data"
    examples = demo.reading_corpus(data, models["llm"])
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(models["llm"])
    block = block_ids(tok, IMAGE, demo.NUM_LATENTS)
    records = [(r, "plain") for r in read_records(data / "stage1_train.jsonl")] + \
              [(r, "chatml") for r in read_records(data / "sft_train.jsonl")]
    assert len(examples) == len(records)
    encoders = {t: PromptEncoder(tok, t, demo.NUM_LATENTS) for t in ("plain", "chatml")}
    for (ids, labels), (rec, template) in zip(examples, records):
        sample = encoders[template].encode(rec)
        assert labels == sample.labels                       # only the replies are supervised
        assert len(ids) == len(sample.input_ids)
        starts = [i for i, t in enumerate(ids) if t == block.start]
        scenes = rec.get("scenes") or [rec["scene"]]
        assert len(starts) == len(scenes) == len(rec["images"])
        for start, scene in zip(starts, scenes):
            inside = ids[start + 1:start + 1 + demo.NUM_LATENTS]
            assert ids[start + 1 + demo.NUM_LATENTS] == block.end
            words = [t for t in inside if t != block.pad]
            assert inside[:len(words)] == words and set(inside[len(words):]) <= {block.pad}  # first slots
            assert tok.decode(words).split() == [scene["colour"], scene["shape"], scene["position"]], rec["id"]
        # outside the blocks, the text is exactly what the VLM is trained on
        outside = [(a, b) for a, b in zip(ids, sample.input_ids) if b != block.pad]
        assert all(a == b for a, b in outside)


def test_reading_corpus_names_a_record_without_its_scenes(small_demo, tmp_path):
    models = build_tiny_models(small_demo / "models")
    data = tmp_path / "data"
    data.mkdir()
    (data / "stage1_train.jsonl").write_text((small_demo / "data" / "stage1_train.jsonl").read_text())
    recs = list(read_records(small_demo / "data" / "sft_train.jsonl"))
    bad = next(r for r in recs if len(r["images"]) == 3)
    bad["scenes"] = bad["scenes"][:2]
    (data / "sft_train.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    with pytest.raises(ValueError, match=f"record {bad['id']} in sft_train.jsonl: 3 image blocks but 2 scenes"):
        demo.reading_corpus(data, models["llm"])


def test_pretrained_models_are_reused_only_for_the_same_recipe(small_demo, tmp_path, monkeypatch):
    """A demo_out built with other schedules is rebuilt, with its cache, never silently reused."""
    monkeypatch.setattr(demo, "PRETRAIN_STEPS", {"vision": 2, "llm": 2})
    config = json.loads((small_demo / "data" / "dataset.json").read_text())["config"]
    marker = tmp_path / "models" / "PRETRAINED.json"
    demo.pretrained_models(tmp_path, small_demo / "data", config)
    first = marker.stat().st_mtime_ns
    (tmp_path / "cache").mkdir()
    demo.pretrained_models(tmp_path, small_demo / "data", config)
    assert marker.stat().st_mtime_ns == first and (tmp_path / "cache").exists()   # same recipe: reused
    monkeypatch.setattr(demo, "PRETRAIN_STEPS", {"vision": 3, "llm": 2})
    demo.pretrained_models(tmp_path, small_demo / "data", config)
    assert json.loads(marker.read_text())["recipe"]["pretrain_steps"]["vision"] == 3
    assert not (tmp_path / "cache").exists()                                  # the old tower's features


def test_pretrain_tiny_llm_learns_only_the_labelled_tokens(tmp_path):
    models = build_tiny_models(tmp_path / "models")
    # prompt token a -> reply token b; the prompt itself is random and unsupervised
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(64):
        a = int(torch.randint(20, 40, (1,), generator=g))
        prompt = torch.randint(40, 200, (6,), generator=g).tolist()
        examples.append((prompt + [a, a + 100], [IGNORE] * 7 + [a + 100]))
    losses = pretrain_tiny_llm(models["llm"], examples, steps=60, lr=1e-2, batch_size=16)
    assert losses[-1] < 0.5 < losses[0]
    with pytest.raises(ValueError, match="example 1: 3 input ids but 2 labels"):
        pretrain_tiny_llm(models["llm"], [([1, 2], [1, 2]), ([1, 2, 3], [1, 2])], steps=1)


# stage 7's bar for "when" on held-out clips (chance 1/8): measured, see media_stage.MEDIA_STEPS
WHEN_BAR, WHEN_POSITION_BAR = 0.9, 0.75
# stage 7's bar for the small object's shape (chance 1/3), 72 held-out images: measured 2026-11-27
# at 700 steps, tiles 0.986 / untiled 0.333 (MEDIA_LR, adapter lr 1e-3), 0.917 / 0.319 at 2e-3,
# the untiled run naming one shape for every image; this test's demo 0.931 / 0.333 (media_stage)
DETAIL_BAR, DETAIL_GAP = 0.75, 0.35
# the run whose "when" is held to WHEN_BAR: measured 1.00 at every position untiled; with the 4x4
# detail tiles in the mix the tiles run measured 0.50-0.73, whole seconds (media_stage's docstring)
WHEN_RUN = "untiled"


@pytest.mark.skipif(os.environ.get("VLM_DIST_SKIP_DEMO") == "1", reason="VLM_DIST_SKIP_DEMO=1")
def test_the_demo_meets_its_bar(tmp_path):
    """The README's first command, end to end: both held-out accuracies >= 0.9, every answer position,
    POPE learned in every setting, and the `vlm-eval report` page with its PNGs.

    About 6 minutes on 2 quiet CPU cores (10 on a shared box): the issue allows the full demo in CI when it fits. The bar's 10-minute budget is not asserted here
    (timing belongs to the benchmark); the run time is in results.json.
    """
    out = tmp_path / "demo_out"
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "demo.py"), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    after, before = results["after"], results["before"]
    assert after["caption_accuracy"] >= 0.9 and after["which_image_accuracy"] >= 0.9, results
    assert set(after["which_image_accuracy_by_position"]) == {"1", "2", "3"}
    assert min(after["which_image_accuracy_by_position"].values()) >= 0.85, results
    assert before["caption_accuracy"] < 0.2 and before["which_image_accuracy"] < 0.6, results
    # answer positions in the held-out set are exactly balanced
    summary = json.loads((out / "data" / "dataset.json").read_text())
    for counts in summary["which_answer_positions"]["heldout"].values():
        assert len(set(counts.values())) == 1
    # POPE before and after, every setting, beside the other numbers
    for res in (before, after):
        assert set(res["pope_by_setting"]) == {"random", "popular", "adversarial"}
        assert all(0 <= v["accuracy"] <= 1 and 0 <= v["yes_ratio"] <= 1 for v in res["pope_by_setting"].values())
    # trained on a yes and a no question per training image (question first), it answers on held-out
    # images; adversarial negatives (same colour or shape) are the hardest
    assert after["pope"]["accuracy"] >= 0.7 and after["pope"]["f1"] >= 0.75, results
    assert min(v["accuracy"] for v in after["pope_by_setting"].values()) >= 0.6, results
    assert before["pope"]["accuracy"] < 0.55, results
    # the report: `vlm-eval report` over both evaluations and both runs, PNGs that open
    report = out / "report"
    text = (report / "report.md").read_text()
    assert "| metric | before | after | after − before |" in text and "| `pope.f1` |" in text
    from PIL import Image
    for name in ("which_image.png", "pope.png", "loss.png", "captions.png"):
        assert f"]({name})" in text
        with Image.open(report / name) as im:
            assert im.format == "PNG" and im.size[0] >= 400 and im.size[1] >= 250, (name, im.size)
    export = out / "stage2" / "export"
    assert (export / "connector.safetensors").exists()
    # stage 7 (vlm_dist.demo.media_stage): both runs evaluated on the same held-out images and clips.
    # "when does the red square appear" is read off the video block's timestamps at every position.
    # "What shape is the small object?": the 4x4 tiles show it at 1:1, the untiled view shrinks it
    # to a blob, so the tiles run is clearly above the untiled one on the same cache and steps.
    media = results["media"]
    assert set(media) >= {"tiles", "untiled", "chance", "steps", "seconds"}
    tiles, untiled = media["tiles"]["detail"], media["untiled"]["detail"]
    assert tiles["n"] == untiled["n"] == 72 and set(tiles["per_answer"]) == {"circle", "square", "triangle"}
    assert tiles["accuracy"] >= DETAIL_BAR and tiles["accuracy"] - untiled["accuracy"] >= DETAIL_GAP, media
    when = media[WHEN_RUN]["when"]
    assert set(when["per_answer"]) == {str(k) for k in range(1, 9)} and when["n"] == 64
    assert when["accuracy"] >= WHEN_BAR and min(when["per_answer"].values()) >= WHEN_POSITION_BAR, media
    assert "## High resolution and video (stage 7)" in text
