"""The demo's synthetic dataset: contract-valid, deterministic, answer positions balanced.

    python -m pytest tests/test_demo_data.py -q
"""
import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest

from vlm_dist.contract.images import load_image
from vlm_dist.contract.records import read_records
from vlm_dist.demo import data as dd

SCALE = 0.1


def _digest(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "data"
    summary = dd.generate(out, dd.DemoDataConfig(seed=3).scaled(SCALE))
    return out, summary


def test_every_file_is_contract_valid_and_every_image_decodes(data):
    out, summary = data
    for name, n in summary["files"].items():
        recs = list(read_records(out / name))           # validates every record
        assert len(recs) == n > 0
        for r in recs:
            for ref in r["images"]:
                img = load_image(out / ref)
                assert img.size == (64, 64)
    text = list(read_records(out / "heldout_text.jsonl"))
    assert all(r["images"] == [] for r in text)


def test_which_image_answer_positions_are_balanced(data):
    out, summary = data
    for name in ("heldout_which.jsonl",):
        recs = list(read_records(out / name))
        for k in (2, 3):
            pos = Counter(r["answer"] for r in recs if len(r["images"]) == k)
            assert len(pos) == k and len(set(pos.values())) == 1, (k, pos)
    train = [r for r in read_records(out / "sft_train.jsonl") if r["task"] == "which_image"]
    for k in (2, 3):
        pos = Counter(r["answer"] for r in train if len(r["images"]) == k)
        assert len(pos) == k and len(set(pos.values())) == 1, (k, pos)
    assert summary["which_answer_positions"]["heldout"]["3"] == {"1": 2, "2": 2, "3": 2}


def test_questions_are_answerable_only_by_the_answer_image(data):
    out, _ = data
    for r in read_records(out / "heldout_which.jsonl"):
        target = (r["target"]["colour"], r["target"]["shape"])
        shows = [(s["colour"], s["shape"]) == target for s in r["scenes"]]
        assert shows.index(True) == r["answer"] - 1 and sum(shows) == 1
        others = [s for i, s in enumerate(r["scenes"]) if i != r["answer"] - 1]
        assert all(s["colour"] != target[0] and s["shape"] != target[1] for s in others)
        assert r["conversations"][-1]["content"] == dd.which_answer_text(r["answer"])
        assert r["conversations"][0]["content"].startswith(f"Which image shows the {target[0]} {target[1]}?")


def test_captions_name_what_is_drawn(data):
    out, _ = data
    for r in read_records(out / "heldout_describe.jsonl"):
        want = " ".join(f"Image {i + 1}: {dd.Scene(**s).caption()}" for i, s in enumerate(r["scenes"]))
        assert r["conversations"][-1]["content"] == want
    # a red shape's image is mostly red where it is not white
    r = next(r for r in read_records(out / "heldout_captions.jsonl") if r["scene"]["colour"] == "red")
    img = load_image(out / r["images"][0])
    px = [p for p in img.getdata() if p != (255, 255, 255)]
    assert sum(1 for p in px if p[0] > 150 and p[1] < 100 and p[2] < 100) > 0.8 * len(px)
    left = r["scene"]["position"] == "left"
    xs = [i % 64 for i, p in enumerate(img.getdata()) if p != (255, 255, 255)]
    assert (sum(xs) / len(xs) < 32) == left


def test_same_seed_same_bytes_and_splits_do_not_share_images(data, tmp_path):
    out, _ = data
    again = tmp_path / "again"
    dd.generate(again, dd.DemoDataConfig(seed=3).scaled(SCALE))
    assert _digest(out) == _digest(again)
    other = tmp_path / "other"
    dd.generate(other, dd.DemoDataConfig(seed=4).scaled(SCALE))
    assert _digest(other) != _digest(out)
    train = {ref for name in ("stage1_train.jsonl", "sft_train.jsonl") for r in read_records(out / name)
             for ref in r["images"]}
    held = {ref for name in ("heldout_loss.jsonl",) for r in read_records(out / name) for ref in r["images"]}
    assert train and held and not train & held


def test_cli_writes_a_summary(tmp_path, capsys):
    assert dd.main(["--out", str(tmp_path / "d"), "--scale", "0.05"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["files"]["heldout_which.jsonl"] == 12
    assert json.loads((tmp_path / "d" / "dataset.json").read_text())["images"] == printed["images"]


def test_pope_questions_ask_about_the_shown_object_and_truly_absent_ones(data):
    out, summary = data
    recs = list(read_records(out / "heldout_pope.jsonl"))
    caps = list(read_records(out / "heldout_captions.jsonl"))
    frequency = summary["object_frequency"]
    assert len(recs) == 2 * 3 * len(caps)                     # a yes and a no per image and setting
    by_image: dict = {}
    for r in recs:
        shown = dd.scene_object(r["scene"])
        assert r["conversations"][0]["content"] == f"Is there a {r['object']} in the image?\n<image>"
        assert r["conversations"][-1]["content"] == ("Yes." if r["answer"] == "yes" else "No.")
        assert (r["object"] == shown) == (r["answer"] == "yes")     # a "no" object is really absent
        by_image.setdefault((r["images"][0], r["pope_setting"]), {})[r["answer"]] = r["object"]
    absent_of = {}
    for (image, setting), qa in by_image.items():
        assert set(qa) == {"yes", "no"}
        absent = [o for o in dd.pope_objects() if o != qa["yes"]]
        if setting == "popular":      # the most frequent absent object in the training images
            assert frequency[qa["no"]] == max(frequency[o] for o in absent)
        if setting == "adversarial":  # shares its colour or its shape with the shown object
            assert dd.shared_attributes(qa["no"], qa["yes"]) == 1
        absent_of.setdefault(setting, []).append(dd.shared_attributes(qa["no"], qa["yes"]))
    # random negatives are not chosen for resemblance: most share nothing with the shown object
    assert sum(x == 0 for x in absent_of["random"]) > len(absent_of["random"]) / 3
    train = [r for r in read_records(out / "sft_train.jsonl") if r["task"] == "pope"]
    assert len(train) == 2 * summary["config"]["train_pope"]
    assert {r["answer"] for r in train} == {"yes", "no"}
    held_images = {r["images"][0] for r in recs}
    assert held_images == {r["images"][0] for r in caps} and not held_images & {r["images"][0] for r in train}


def test_object_frequency_counts_every_drawn_scene(data):
    out, summary = data
    train = [r for r in read_records(out / "sft_train.jsonl") if r["task"] != "pope"]
    assert sum(summary["object_frequency"].values()) == sum(len(r["images"]) for r in train)
