"""Evaluation: probe/answer accounting on hand-made predictions, perplexity on a tiny model, vlm-eval end to end.

    python -m pytest tests/test_eval.py -q
"""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vlm_dist.inference import evaluation as ev
from vlm_dist.contract.prompt import IGNORE, PromptEncoder

REPO = Path(__file__).resolve().parents[1]


def probe(rid, k, answer):
    return {"id": rid, "images": [f"{rid}_{i}.png" for i in range(k)], "answer": answer,
            "scenes": [f"s{i}" for i in range(k)],
            "conversations": [{"role": "user", "content": "\n".join(["<image>"] * k) + "\nWhich?"},
                              {"role": "assistant", "content": f"Image {answer}."}]}


# -- parsing ---------------------------------------------------------------------------------
@pytest.mark.parametrize("text,k,want", [
    ("Image 2.", 3, 2), ("image 3", 3, 3), ("2", 2, 2), ("The second image.", 3, 2),
    ("the last one", 3, 3), ("Image two", 2, 2), ("Image 4.", 3, None), ("a red circle", 2, None),
    ("Image 1: a red circle. Image 2: ...", 2, 1),
])
def test_parse_image_choice(text, k, want):
    assert ev.parse_image_choice(text, k) == want


def test_parse_bool_and_options():
    assert ev.parse_bool("True.") is True and ev.parse_bool("no, it is not") is False
    assert ev.parse_bool("maybe") is None
    assert ev.answer_bool("False") is False and ev.answer_bool(True) is True and ev.answer_bool(1) is True
    with pytest.raises(ValueError):
        ev.answer_bool("perhaps")
    assert ev.parse_option("B", 4) == "B" and ev.parse_option("(c) a cat", 4) == "C"
    assert ev.parse_option("The answer is D.", 4) == "D"
    assert ev.parse_option("E", 4) is None            # not an option of a 4-way question
    assert ev.parse_option("a blue square", 3, ["a red circle", "a blue square", "x"]) == "B"
    assert ev.parse_option("I am not sure", 4) is None


# -- accounting ------------------------------------------------------------------------------
def test_rotated_probes_balance_positions_and_follow_the_answer_image():
    recs = [probe("a", 2, 1), probe("b", 3, 3)]
    asked = ev.rotated_probes(recs)
    assert len(asked) == 5
    for r in asked:
        orig = recs[0] if r["id"].startswith("a") else recs[1]
        # the image at the answer position is the original answer image, and so is its scene
        assert r["images"][r["answer"] - 1] == orig["images"][orig["answer"] - 1]
        assert r["scenes"][r["answer"] - 1] == orig["scenes"][orig["answer"] - 1]
        assert sorted(r["images"]) == sorted(orig["images"]) and r["conversations"] == orig["conversations"]
    assert sorted(r["answer"] for r in asked if r["id"].startswith("b")) == [1, 2, 3]
    assert sorted(r["answer"] for r in asked if r["id"].startswith("a")) == [1, 2]
    with pytest.raises(ValueError, match="not a permutation"):
        ev.permute_probe(recs[0], [0, 0])


def test_latest_image_bias_is_exposed_per_position():
    asked = ev.rotated_probes([probe(f"p{i}", k, 1) for i, k in enumerate([2, 2, 3, 3, 3, 3])])
    answers = [r["answer"] for r in asked]
    ks = [len(r["images"]) for r in asked]
    last = ev.score_choices(ks, answers, ks)         # always names the last image
    assert last["per_position"]["1"]["accuracy"] == 0.0
    assert last["per_num_images_position"]["3:3"]["accuracy"] == 1.0
    assert last["per_num_images_position"]["2:2"]["accuracy"] == 1.0
    assert last["last_image_rate"] == 1.0
    assert last["accuracy"] == pytest.approx(last["last_image_chance"])    # = mean 1/k: chance
    assert last["accuracy"] == pytest.approx((2 * 1 + 4 * 1) / (2 * 2 + 4 * 3))
    perfect = ev.score_choices(answers, answers, ks)
    assert perfect["accuracy"] == 1.0 and all(v["accuracy"] == 1.0 for v in perfect["per_position"].values())
    assert perfect["last_image_rate"] == pytest.approx(perfect["last_image_chance"])
    hand = ev.score_choices([1, None, 2, 3], [1, 2, 2, 1], [2, 2, 3, 3])
    assert hand["accuracy"] == 0.5 and hand["unparsed"] == 1
    assert hand["per_position"] == {"1": {"accuracy": 0.5, "correct": 1, "n": 2},
                                    "2": {"accuracy": 0.5, "correct": 1, "n": 2}}
    assert hand["predicted_position"] == {"1": 1, "2": 1, "3": 1, "none": 1}


def test_nlvr2_and_mc_scoring():
    s = ev.score_binary([True, False, None, True], [True, True, False, False])
    assert s["accuracy"] == 0.25 and s["unparsed"] == 1
    assert s["per_answer"]["true"] == {"accuracy": 0.5, "n": 2}
    assert s["per_answer"]["false"] == {"accuracy": 0.0, "n": 2}
    m = ev.score_mc(["A", "C", None, "b"], ["A", "B", "C", "b"])
    assert m["accuracy"] == 0.25 and m["unparsed"] == 1 and m["picked"]["A"] == 1


# -- POPE --------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [
    ("Yes", "yes"), ("yes, there is a red circle.", "yes"), ("NO.", "no"), ("No, there is not.", "no"),
    ("There is no red circle.", None), ("I think yes", None), ("", None), ("Yesterday", None),
])
def test_parse_yes_no_reads_the_first_word(text, want):
    assert ev.parse_yes_no(text) == want


def test_pope_metrics_on_hand_made_answers_per_setting():
    # random: 4 yes / 4 no answers; the model says yes 5 times: 3 right (TP), 2 wrong (FP); one reply unparsed
    answers = ["yes"] * 4 + ["no"] * 4
    random_p = ["yes", "yes", "yes", None, "yes", "yes", "no", "no"]
    # popular: always yes -> recall 1, precision 0.5, yes-ratio 1
    popular_p = ["yes"] * 8
    # adversarial: always no -> precision and F1 0 by convention, accuracy 0.5
    adversarial_p = ["no"] * 8
    preds = random_p + popular_p + adversarial_p
    settings = ["random"] * 8 + ["popular"] * 8 + ["adversarial"] * 8
    m = ev.score_pope(preds, answers * 3, settings)
    r = m["random"]
    assert (r["accuracy"], r["precision"], r["recall"]) == (5 / 8, 3 / 5, 3 / 4)
    assert r["f1"] == pytest.approx(2 * 0.6 * 0.75 / 1.35) and r["yes_ratio"] == 5 / 8 and r["unparsed"] == 1
    p = m["popular"]
    assert (p["accuracy"], p["precision"], p["recall"], p["yes_ratio"]) == (0.5, 0.5, 1.0, 1.0)
    assert p["f1"] == pytest.approx(2 / 3)
    a = m["adversarial"]
    assert (a["accuracy"], a["precision"], a["recall"], a["f1"], a["yes_ratio"]) == (0.5, 0.0, 0.0, 0.0, 0.0)
    assert m["f1"] == pytest.approx((r["f1"] + p["f1"] + 0.0) / 3) and m["n"] == 24
    assert m["accuracy"] == pytest.approx((5 / 8 + 0.5 + 0.5) / 3)
    with pytest.raises(ValueError, match="unknown POPE setting"):
        ev.score_pope(["yes"], ["yes"], ["hard"])
    with pytest.raises(ValueError, match="'yes' or 'no'"):
        ev.pope_metrics(["yes"], ["maybe"])


def test_pope_negatives_follow_their_setting():
    import random
    objects = ["a", "b", "c", "d", "e"]
    frequency = {"a": 9, "b": 1, "c": 7, "d": 5, "e": 2}
    near = {("e", "a"): 3, ("b", "a"): 1}                    # e co-occurs most with a, then b
    cooc = lambda x, y: near.get((x, y), 0)                  # noqa: E731
    rng = random.Random(0)
    assert ev.pope_negatives({"a"}, objects, "popular", 2, rng, frequency, cooc) == ["c", "d"]
    assert ev.pope_negatives({"a"}, objects, "adversarial", 2, rng, frequency, cooc) == ["e", "b"]
    drawn = {x for _ in range(50) for x in ev.pope_negatives({"a"}, objects, "random", 1, rng, frequency, cooc)}
    assert drawn == {"b", "c", "d", "e"}                      # every absent object, never the present one
    with pytest.raises(ValueError, match="only 4 absent objects for 5"):
        ev.pope_negatives({"a"}, objects, "random", 5, rng, frequency, cooc)


def test_ordered_descriptions_per_position():
    ref = "Image 1: a red circle on the left. Image 2: a blue square on the right."
    swapped = "Image 1: a blue square on the right. Image 2: a blue square on the right."
    s = ev.score_ordered_descriptions([ref, swapped], [ref, ref])
    assert s["accuracy"] == 0.5
    assert s["per_position"] == {"1": {"accuracy": 0.5, "n": 2}, "2": {"accuracy": 1.0, "n": 2}}


def test_caption_metrics():
    refs = {"a": ["a red circle on the left."], "b": ["a blue square on the right."],
            "c": ["a green triangle on the left."]}
    good = ev.caption_metrics({"a": "A red circle on the left", "b": "a blue square on the right.",
                               "c": "a green triangle on the left"}, refs)
    assert good["accuracy"] == 1.0 and good["bleu_4"] == pytest.approx(1.0, abs=1e-6) and good["cider"] > 0
    bad = ev.caption_metrics({"a": "a blue circle on the left.", "b": "a red square on the left.",
                              "c": "a green triangle on the left."}, refs)
    assert bad["accuracy"] == pytest.approx(1 / 3) and bad["bleu_4"] < good["bleu_4"]
    assert bad["cider"] < good["cider"]


def test_shard_covers_every_record_once():
    items = list(range(11))
    parts = [ev.shard(items, r, 3) for r in range(3)]
    assert sorted(x for p in parts for x in p) == items
    assert ev.gather_lists([1, 2]) == [1, 2]        # no process group: identity


# -- perplexity on a tiny model --------------------------------------------------------------
def test_loss_sums_equal_a_direct_computation(tiny_models, tokenizer):
    from vlm_dist.model.build import build_vlm, load_llm
    torch.manual_seed(0)
    llm = load_llm(tiny_models["llm"], "frozen", dtype=torch.float32)
    vlm = build_vlm(llm, tokenizer, 32, 16, connector=dict(num_latents=4, depth=1, heads=4),
                    dtype=torch.float32).eval()
    recs = [{"id": f"t{i}", "images": [], "conversations": [
        {"role": "user", "content": "Repeat:"}, {"role": "assistant", "content": s}]}
        for i, s in enumerate(["The quick brown fox.", "one two three four five six", "Hello world. Yes."])]
    recs.append({"id": "empty", "images": [], "conversations": [
        {"role": "assistant", "content": "x" * 300}]})  # too long at max_seq_len=64: listed, not dropped silently
    got = ev.merge_loss([ev.loss_sums(vlm, tokenizer, "chatml", 4, recs[:2], None, (16, 32), batch_size=2,
                                      max_seq_len=64),
                         ev.loss_sums(vlm, tokenizer, "chatml", 4, recs[2:], None, (16, 32), max_seq_len=64)])
    enc = PromptEncoder(tokenizer, "chatml", 4)
    total, n = 0.0, 0
    with torch.no_grad():
        for r in recs[:3]:
            s = enc.encode(r)
            logits = llm(input_ids=torch.tensor([s.input_ids])).logits[0, :-1]
            labels = torch.tensor(s.labels[1:])
            keep = labels != IGNORE
            total += F.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            n += int(keep.sum())
    assert got["tokens"] == n and got["samples"] == 3
    assert got["loss"] == pytest.approx(total / n, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert got["skipped"] == {"too_long": {"count": 1, "ids": ["empty"]}}


# -- vlm-eval end to end on a tiny export -----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_export(tiny_models, tokenizer, tmp_path_factory):
    from vlm_dist.training.checkpoint import write_export
    from vlm_dist.config import LoraConfig
    from vlm_dist.model.build import build_vlm, load_llm, set_trainable
    torch.manual_seed(0)
    llm = load_llm(tiny_models["llm"], "lora", dtype=torch.float32, lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    vlm = build_vlm(llm, tokenizer, 32, 16, connector=dict(num_latents=4, depth=1, heads=4), dtype=torch.float32)
    set_trainable(vlm, "lora")
    with torch.no_grad():
        for name, p in vlm.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    out = tmp_path_factory.mktemp("eval") / "export"
    write_export(vlm, out, {"llm": tiny_models["llm"], "vision": tiny_models["vision"], "feature_layer": -2,
                            "pool": False, "template": "chatml", "num_media_tokens": 4,
                            "vision_dtype": "float32"}, "lora", is_main=True)
    return out


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from vlm_dist.demo import data as dd
    out = tmp_path_factory.mktemp("demo")
    dd.generate(out, dd.DemoDataConfig().scaled(0.05))
    return out


def _nlvr2_and_mc(demo_data, tmp_path):
    """Hand-made NLVR2-style and multiple-choice sets over the demo images, with answer keys."""
    from vlm_dist.contract.records import write_records
    which = [json.loads(line) for line in (demo_data / "heldout_which.jsonl").open()][:4]
    pairs = [{"id": f"pair{i}", "images": r["images"][:2], "answer": i % 2 == 0, "conversations": [
        {"role": "user", "content": "<image> <image> Both images show a red shape. True or false?"},
        {"role": "assistant", "content": "True." if i % 2 == 0 else "False."}]} for i, r in enumerate(which)]
    mc = [{"id": f"mc{i}", "images": r["images"][:1], "answer": "ABC"[i % 3],
           "choices": ["circle", "square", "triangle"], "conversations": [
               {"role": "user", "content": "<image>\nWhich shape? A. circle B. square C. triangle"},
               {"role": "assistant", "content": "ABC"[i % 3]}]} for i, r in enumerate(which)]
    write_records(tmp_path / "pairs.jsonl", pairs)
    write_records(tmp_path / "mc.jsonl", mc)
    return tmp_path / "pairs.jsonl", tmp_path / "mc.jsonl"


def test_vlm_eval_end_to_end(tiny_export, demo_data, tmp_path):
    from vlm_dist.inference.eval_cli import main
    out = tmp_path / "eval"
    pairs, mc = _nlvr2_and_mc(demo_data, tmp_path)
    rc = main(["--model", str(tiny_export), "--out", str(out), "--image-root", str(demo_data),
               "--nlvr2", str(pairs), "--mc", str(mc),
               "--loss", str(demo_data / "heldout_loss.jsonl"), "--captions", str(demo_data / "heldout_captions.jsonl"),
               "--probes", str(demo_data / "heldout_which.jsonl"), "--describe", str(demo_data / "heldout_describe.jsonl"),
               "--text", str(demo_data / "heldout_text.jsonl"), "--pope", str(demo_data / "heldout_pope.jsonl"),
               "--limit", "6", "--max-new-tokens", "6",
               "--device", "cpu"])
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["loss"]["samples"] == 6 and res["loss"]["perplexity"] > 1
    assert 0 <= res["captions"]["accuracy"] <= 1 and "cider" in res["captions"]
    probes = [json.loads(line) for line in (out / "probes.jsonl").open()]
    first6 = [json.loads(line) for line in (demo_data / "heldout_which.jsonl").open()][:6]
    # each record asked once per image position
    assert res["probes"]["n"] == len(probes) == sum(len(r["images"]) for r in first6)
    assert res["probes"]["records"] == 6
    # adapter disabled -> base LLM perplexity differs from the adapted model's
    assert res["text"]["perplexity"] != res["text"]["base_perplexity"]
    assert (out / "captions.md").read_text().startswith("# Caption report")
    assert res["nlvr2"]["n"] == 4 and res["nlvr2"]["per_answer"]["true"]["n"] == 2
    assert res["mc"]["n"] == 4 and len((out / "mc.jsonl").read_text().splitlines()) == 4
    pope = [json.loads(line) for line in (out / "pope.jsonl").open()]
    assert res["pope"]["n"] == len(pope) == 6
    for row in pope:    # every reply scored by its first word, as POPE does
        assert row["parsed"] == ev.parse_yes_no(row["prediction"]) and row["answer"] in ("yes", "no")
    present = [s for s in ev.POPE_SETTINGS if s in res["pope"]]
    assert present and res["pope"]["f1"] == pytest.approx(sum(res["pope"][s]["f1"] for s in present) / len(present))
    n_caps = min(6, len((demo_data / "heldout_captions.jsonl").read_text().splitlines()))
    assert len((out / "captions.jsonl").read_text().splitlines()) == res["captions"]["n"] == n_caps


def test_vlm_eval_names_a_pope_record_without_its_setting(tiny_export, demo_data, tmp_path, capsys):
    from vlm_dist.contract.records import write_records
    from vlm_dist.inference.eval_cli import main
    recs = [json.loads(line) for line in (demo_data / "heldout_pope.jsonl").open()][:2]
    del recs[1]["pope_setting"]
    write_records(tmp_path / "pope.jsonl", recs)
    rc = main(["--model", str(tiny_export), "--out", str(tmp_path / "eval"), "--image-root", str(demo_data),
               "--pope", str(tmp_path / "pope.jsonl"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and f"record {recs[1]['id']!r} needs" in err and "pope_setting" in err and "Traceback" not in err


def test_vlm_eval_two_ranks_matches_one(tiny_export, demo_data, tmp_path):
    """torchrun with 2 CPU ranks (gloo): records sharded, results gathered, same numbers as one process."""
    args = ["--model", str(tiny_export), "--image-root", str(demo_data), "--loss",
            str(demo_data / "heldout_loss.jsonl"), "--probes", str(demo_data / "heldout_which.jsonl"),
            "--limit", "5", "--max-new-tokens", "4", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    one = subprocess.run([sys.executable, "-m", "vlm_dist.inference.eval_cli", *args, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29731", "-m", "vlm_dist.inference.eval_cli", *args, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "eval.json").read_text())
    b = json.loads((tmp_path / "two" / "eval.json").read_text())
    assert b["world_size"] == 2
    assert b["loss"]["tokens"] == a["loss"]["tokens"] and b["loss"]["loss"] == pytest.approx(a["loss"]["loss"], rel=1e-5)
    assert b["probes"]["n"] == a["probes"]["n"] and b["probes"]["accuracy"] == a["probes"]["accuracy"]


# -- launchers: srun and mpirun run vlm-eval distributed, like torchrun ---------------------------
LAUNCHER_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "PMI_", "OMPI_", "MPI_")


@pytest.mark.parametrize("launcher_env", [
    {"SLURM_PROCID": "1", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "0", "SLURM_LOCALID": "1",
     "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "7",
     "MASTER_ADDR": "127.0.0.1"},
    {"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999"},
], ids=["srun", "mpirun"])
def test_vlm_eval_starts_distributed_under_srun_and_mpirun(monkeypatch, launcher_env):
    import vlm_dist.dist as dist
    from vlm_dist.inference.eval_cli import start_ranks
    for key in list(os.environ):
        if key.startswith(LAUNCHER_KEYS):
            monkeypatch.delenv(key)
    started = []
    monkeypatch.setattr(dist, "init_distributed", lambda: started.append(dist.discover()) or started[-1])
    env = start_ranks()
    assert (env.rank, env.world_size) == (0, 1) and not started          # plain python: one process, no group
    for k, v in launcher_env.items():
        monkeypatch.setenv(k, v)
    env = start_ranks()
    assert (env.rank, env.world_size) == (1, 2) and len(started) == 1     # rank 1 of 2, process group started


@pytest.mark.skipif(not shutil.which("mpirun"), reason="no mpirun (pip install mpich mpi4py)")
def test_vlm_eval_under_mpirun_shards_over_two_ranks(tiny_export, demo_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_KEYS)}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MASTER_PORT="29741")
    proc = subprocess.run(["mpirun", "-n", "2", sys.executable, "-m", "vlm_dist.inference.eval_cli", "--model", str(tiny_export),
                           "--image-root", str(demo_data), "--loss", str(demo_data / "heldout_loss.jsonl"),
                           "--limit", "4", "--device", "cpu", "--out", str(tmp_path / "mpi")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    res = json.loads((tmp_path / "mpi" / "eval.json").read_text())
    assert res["world_size"] == 2 and res["loss"]["samples"] == 4


def test_vlm_eval_reads_images_only_under_its_image_root(tiny_export, demo_data, tmp_path, capsys):
    """A record naming a file outside --image-root (here by `..`) is refused by name, never read."""
    from vlm_dist.inference.eval_cli import main
    from vlm_dist.contract.records import read_records, write_records
    secret = tmp_path / "secret.png"
    secret.write_bytes((demo_data / next(read_records(demo_data / "heldout_loss.jsonl"))["images"][0]).read_bytes())
    rec = next(read_records(demo_data / "heldout_loss.jsonl"))
    rec["images"] = [os.path.relpath(secret, demo_data)] + rec["images"][1:]
    write_records(tmp_path / "escape.jsonl", [rec])
    rc = main(["--model", str(tiny_export), "--out", str(tmp_path / "eval"), "--image-root", str(demo_data),
               "--loss", str(tmp_path / "escape.jsonl"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "outside the image root" in err and "Traceback" not in err


def test_vlm_generate_names_a_bad_chat_file_without_a_traceback(tmp_path, capsys):
    from vlm_dist.inference.generate_cli import main
    chat = tmp_path / "chat.json"
    chat.write_bytes(b'[{"role": "user", "content": "caf\xe9"}]')   # latin-1, not UTF-8
    assert main(["--model", str(tmp_path), "--chat", str(chat)]) == 2
    err = capsys.readouterr().err
    assert "chat.json:1: not UTF-8" in err and "Traceback" not in err
    assert main(["--model", str(tmp_path), "--chat", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: cannot read" in capsys.readouterr().err
