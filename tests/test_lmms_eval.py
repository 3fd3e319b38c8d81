"""lmms-eval runs our export: the `lmms-eval` CLI itself on three local tasks in its own format.

The tasks live in tests/lmms_tasks (YAML + utils.py; the POPE one reuses lmms-eval's own POPE
functions); make_data.py writes their data (PIL-drawn shapes and real photos) as parquet files,
which the YAMLs name relative to the working directory, so the CLI runs there:

    lmms-eval eval --model vlm_dist --model_args pretrained=EXPORT \\
        --tasks vlm_dist_pope,vlm_dist_pairs,vlm_dist_choice --include_path tests/lmms_tasks \\
        --output_path OUT --batch_size 2 --log_samples

The tiny export is untrained: scores are checked for validity, and the answers against what
Generator (vlm-generate's path) gives for the same prompt and images.

    python -m pytest tests/test_lmms_eval.py -q
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is the [eval] extra: pip install -e '.[eval]'")

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tests" / "lmms_tasks"
TASKS = ("vlm_dist_pope", "vlm_dist_pairs", "vlm_dist_choice")
POPE_METRICS = ("pope_accuracy", "pope_precision", "pope_recall", "pope_f1_score", "pope_yes_ratio")


def _make_data():
    spec = importlib.util.spec_from_file_location("lmms_make_data", TASKS_DIR / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generator(export):
    from vlm_dist.inference.export import load_export
    from vlm_dist.inference.generate import Generator
    vlm, tokenizer, tower, cfg = load_export(export, "cpu")
    return Generator(vlm, tokenizer, cfg, tower)


def _cli() -> str:
    beside = Path(sys.executable).with_name("lmms-eval")   # the console script of this interpreter
    found = str(beside) if beside.exists() else shutil.which("lmms-eval")
    assert found, "the lmms-eval console script is not installed (pip install -e '.[eval]')"
    return found


def run_lmms_eval(launcher: list[str], export, tasks, data: Path, out: Path):
    """The lmms-eval CLI on our local tasks in `data`; (results json, samples per task, printed log)."""
    cmd = launcher + ["--model", "vlm_dist", "--model_args", f"pretrained={export}",
                      "--tasks", ",".join(tasks), "--include_path", str(TASKS_DIR), "--output_path", str(out),
                      "--batch_size", "2", "--log_samples"]
    env = dict(os.environ, HF_DATASETS_CACHE=str(data.parent / "hf_datasets"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=data, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    if "No module named 'filelock._api'" in log:
        pytest.fail("lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed: pip install 'filelock<4'")
    assert proc.returncode == 0, log[-4000:]
    results = list(out.rglob("*_results.json"))
    assert len(results) == 1, (results, log[-2000:])
    samples = {}
    for task in tasks:
        files = list(out.rglob(f"*_samples_{task}.jsonl"))
        assert len(files) == 1, (task, files)
        samples[task] = [json.loads(line) for line in files[0].read_text().splitlines()]
    return json.loads(results[0].read_text()), samples, log


@pytest.fixture(scope="module")
def lmms_run(tiny_export, real_photos, tmp_path_factory):
    """Data built, the CLI run once; (data dir, doc counts, results json, samples per task, log)."""
    root = tmp_path_factory.mktemp("lmms")
    counts = _make_data().build(root / "data", real_photos)
    results, samples, log = run_lmms_eval([_cli(), "eval"], tiny_export, TASKS, root / "data", root / "out")
    return root / "data", counts, results, samples, log


def test_the_cli_writes_valid_scores_for_every_document(lmms_run):
    _, counts, results, samples, log = lmms_run
    assert set(counts) == set(TASKS) and all(n >= 5 for n in counts.values()), counts
    for task in TASKS:
        assert results["n-samples"][task] == {"original": counts[task], "effective": counts[task]}
        assert sorted(s["doc_id"] for s in samples[task]) == list(range(counts[task]))
    scores = results["results"]
    for metric in POPE_METRICS:
        assert 0.0 <= scores["vlm_dist_pope"][f"{metric},none"] <= 1.0, metric
    # lmms-eval's pope_yes_ratio is the share of "yes" in the ground truth (its utils); ours is balanced
    assert scores["vlm_dist_pope"]["pope_yes_ratio,none"] == 0.5
    assert 0.0 <= scores["vlm_dist_pairs"]["pair_accuracy,none"] <= 1.0
    assert 0.0 <= scores["vlm_dist_choice"]["acc,none"] <= 1.0
    assert "|vlm_dist_pope" in log and "pope_f1_score" in log      # the printed results table


def test_generated_answers_are_what_generator_gives(lmms_run, tiny_export):
    """Batched (2, left-padded) answers through lmms-eval equal vlm-generate's one-prompt path,
    for one image prepended (POPE) and two images interleaved by `<image>` markers (pairs)."""
    from datasets import load_dataset

    from vlm_dist.inference.generate import GenerationSettings
    from vlm_dist.inference.generate_cli import build_conversation

    data, _, _, samples, _ = lmms_run
    gen = _generator(tiny_export)
    visuals = {"vlm_dist_pope": ["image"], "vlm_dist_pairs": ["image_0", "image_1"]}
    for task, columns in visuals.items():
        docs = load_dataset("parquet", data_files=str(data / f"{task}.parquet"), split="train",
                            cache_dir=str(data.parent / "hf_test"))
        for s in sorted(samples[task], key=lambda s: s["doc_id"]):
            images = [docs[s["doc_id"]][c].convert("RGB") for c in columns]
            turns = build_conversation(s["input"], None, len(images))
            text = gen.generate(turns, gen.encode_images(images), GenerationSettings(max_new_tokens=8))
            want = text.split("\n\n")[0].strip()      # the task's `until` (lmms-eval's default "\n\n")
            assert s["filtered_resps"].strip() == want, (task, s["doc_id"], s["input"])


def test_multiple_choice_scores_are_the_continuations_nll(lmms_run, tiny_export):
    """Each choice's score is -sum log p(choice | prompt, image), as the VLM's own training loss
    computes it; lmms-eval takes the argmin, so acc is 1 exactly where the gold choice is likeliest."""
    from datasets import load_dataset

    from vlm_dist.contract.prompt import IGNORE
    from vlm_dist.inference.generate_cli import build_conversation

    data, _, _, samples, _ = lmms_run
    rows = sorted(samples["vlm_dist_choice"], key=lambda s: s["doc_id"])
    for s in rows:
        nll = [float(r[0]) for r in s["filtered_resps"]]
        assert all(x > 0 for x in nll)
        assert s["acc"] == float(min(range(len(nll)), key=nll.__getitem__) == int(s["target"]))

    docs = load_dataset("parquet", data_files=str(data / "vlm_dist_choice.parquet"), split="train",
                        cache_dir=str(data.parent / "hf_test"))
    gen = _generator(tiny_export)
    doc = docs[0]
    ctx_ids, _ = gen.prompt_ids(build_conversation(doc["question"], None, 1))
    feats = gen.encode_images([doc["image"].convert("RGB")])
    for k, choice in enumerate(doc["choices"]):
        cont = gen.tokenizer.encode(choice, add_special_tokens=False)
        ids = torch.tensor([ctx_ids + cont])
        targets = torch.full_like(ids, IGNORE)
        targets[0, len(ctx_ids) - 1:-1] = torch.tensor(cont)       # targets[t] is the token after t
        with torch.no_grad():
            out = gen.vlm(ids, torch.arange(ids.shape[1])[None], targets,
                          {"image": {"features": feats, "counts": torch.tensor([1])}})
        assert float(rows[0]["filtered_resps"][k][0]) == pytest.approx(out["loss_sum"].item(), rel=1e-4)


def test_two_cpu_processes_share_the_documents_and_agree(lmms_run, tiny_export):
    """torchrun, 2 processes on gloo: each rank answers its slice; the gathered answers and scores
    equal the one-process run's."""
    data, counts, results, samples, _ = lmms_run
    torchrun = Path(sys.executable).with_name("torchrun")
    tasks = ("vlm_dist_pairs", "vlm_dist_choice")
    launcher = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "lmms_eval", "eval"]
    results2, samples2, log = run_lmms_eval(launcher, tiny_export, tasks, data, data.parent / "out2")
    assert "Running on rank 1" in log
    for task in tasks:
        assert results2["n-samples"][task] == results["n-samples"][task]
        one = {s["doc_id"]: s["filtered_resps"] for s in samples[task]}
        two = {s["doc_id"]: s["filtered_resps"] for s in samples2[task]}
        assert two == one, task
    assert results2["results"]["vlm_dist_choice"]["acc,none"] == results["results"]["vlm_dist_choice"]["acc,none"]


def test_lmms_eval_finds_the_model_through_the_entry_point():
    from lmms_eval.api.model import lmms
    from lmms_eval.models import get_model

    cls = get_model("vlm_dist")
    assert issubclass(cls, lmms) and cls.__module__ == "vlm_dist.inference.lmms" and cls.is_simple


def test_an_unknown_model_arg_is_named(tiny_export):
    from lmms_eval.models import get_model

    from vlm_dist.errors import UserError
    with pytest.raises(UserError, match="unknown argument.*'temprature'"):
        get_model("vlm_dist").create_from_arg_string(f"pretrained={tiny_export},temprature=0.5")


def test_importing_the_module_does_not_import_lmms_eval():
    code = "import sys, vlm_dist.inference.lmms as m; assert 'lmms_eval' not in sys.modules; print(m.MODEL_ID)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and out.stdout.strip() == "vlm_dist", out.stderr
