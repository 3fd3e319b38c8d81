"""The DeepSpeed trainer end to end: 2 CPU ranks on gloo, tiny models, a real feature cache.

Each test launches `launch/train.py` the way a user does (torchrun, or the
`deepspeed` launcher) and reads what the run wrote: metrics.jsonl, checkpoints,
the export.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
_PORT = [29700]


@pytest.fixture(scope="module")
def tiny_data(tiny_models, tmp_path_factory):
    """Demo-style shapes dataset (small) and its feature cache, built once for the module."""
    root = tmp_path_factory.mktemp("train_data")
    subprocess.run([sys.executable, str(REPO / "launch" / "demo_data.py"), "--out", str(root / "data"),
                    "--scale", "0.05"], check=True, capture_output=True)
    data = root / "data"
    # one record whose image is an empty file: the cache lists it as failed, training drops it
    (data / "images" / "broken.png").write_bytes(b"")
    good = (data / "stage1_train.jsonl").read_text().splitlines()[0]
    bad = json.loads(good)
    bad["id"], bad["images"] = "broken-image-record", ["images/broken.png"]
    (data / "with_broken.jsonl").write_text(good + "\n" + json.dumps(bad) + "\n")
    subprocess.run([sys.executable, "-m", "preprocess.cache_cli", "build", "--records",
                    str(data / "stage1_train.jsonl"), str(data / "sft_train.jsonl"),
                    str(data / "heldout_loss.jsonl"), str(data / "with_broken.jsonl"),
                    "--image-root", str(data), "--vision-model",
                    tiny_models["vision"], "--out", str(root / "cache"), "--dtype", "fp32", "--workers", "0",
                    "--no-progress"], check=True, capture_output=True, cwd=REPO)
    return {"data": data, "cache": root / "cache", **tiny_models}


def train_args(tiny, out, stage="stage1_align", ds="zero2", **over):
    args = {
        "model.llm": tiny["llm"], "model.vision": tiny["vision"], "model.dtype": "float32",
        "model.num_latents": 4, "model.resampler_depth": 1, "model.resampler_heads": 4,
        "data.cache": tiny["cache"], "data.max_seq_len": 160, "data.num_workers": 0,
        "train.output_dir": out, "train.max_steps": 8, "train.epochs": "null", "train.micro_batch_size": 1,
        "train.log_every": 1, "train.lr_connector": 3e-3, "train.lr_adapters": 3e-3, "train.warmup_ratio": 0.0,
        "checkpoint.every": 4,
        "data.records": tiny["data"] / ("stage1_train.jsonl" if stage == "stage1_align" else "sft_train.jsonl"),
    }
    if stage != "stage1_align":
        args.update({"lora.r": 4, "lora.alpha": 8, "lora.dropout": 0.0})
    args.update(over)
    return ["--deepspeed", str(REPO / "ds_configs" / f"{ds}.json"),
            "--config", str(REPO / "launch" / "configs" / f"{stage}.yaml")] + \
        [f"--{k}={v}" for k, v in args.items()]


def launch(args, launcher="torchrun", env_extra=None, expect_rc=0):
    _PORT[0] += 1
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-port", str(_PORT[0])]
    else:  # the deepspeed launcher, as a user types it
        cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_PORT[0])]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.run(cmd + [str(REPO / "launch" / "train.py")] + [str(a) for a in args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    if expect_rc is not None:
        assert proc.returncode == expect_rc, out[-6000:]
    return proc.returncode, out


def losses(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


@pytest.fixture(scope="module")
def stage1_runs(tiny_data, tmp_path_factory):
    """Stage 1 under ZeRO-2 (through the deepspeed launcher) and ZeRO-3 (torchrun), same seed."""
    root = tmp_path_factory.mktemp("stage1")
    launch(train_args(tiny_data, root / "z2"), launcher="deepspeed")
    launch(train_args(tiny_data, root / "z3", ds="zero3"))
    return root


def test_stage1_zero2_loss_falls_and_run_dir_is_complete(stage1_runs):
    run = stage1_runs / "z2"
    ls = losses(run)
    assert sorted(ls) == list(range(1, 9))
    assert sum(ls[s] for s in (7, 8)) < sum(ls[s] for s in (1, 2))
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "export/connector.safetensors",
                 "export/vlm_config.json", "checkpoints/latest", "checkpoints/step_00000008/COMPLETE",
                 "checkpoints/step_00000004/export/connector.safetensors"):
        assert (run / name).exists(), name
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "samples_per_s"} <= set(row)


def test_zero2_and_zero3_give_the_same_losses(stage1_runs):
    z2, z3 = losses(stage1_runs / "z2"), losses(stage1_runs / "z3")
    for s in z2:
        assert z3[s] == pytest.approx(z2[s], rel=1e-4, abs=1e-4), (s, z2, z3)


@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_export_reloads_into_a_fresh_model_with_identical_outputs(stage1_runs, tiny_data, ds):
    """Held-out loss of the exported weights in a plain (non-DeepSpeed) model equals the
    loss the run computed with its engine at the last step."""
    from vlm_dist.cache import FeatureCache
    from vlm_dist.export import load_export
    from vlm_dist.prompt import IGNORE, PromptEncoder
    from vlm_dist.records import read_records

    run = stage1_runs / {"zero2": "z2", "zero3": "z3"}[ds]
    vlm, tok, _, _ = load_export(run / "export", device="cpu", dtype=torch.float32)
    # the engine's own view of the weights, rebuilt from the (partitioned, for ZeRO-3) checkpoint
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    engine_sd = get_fp32_state_dict_from_zero_checkpoint(str(run / "checkpoints"), tag="step_00000008")
    for k, v in vlm.connectors.state_dict().items():
        assert torch.equal(v, engine_sd["connectors." + k]), k
    cache = FeatureCache(tiny_data["cache"])
    enc = PromptEncoder(tok, "plain", vlm.num_tokens["image"])
    rec = next(read_records(tiny_data["data"] / "stage1_train.jsonl"))
    s = enc.encode(rec)
    feats = torch.stack([cache[cache.resolve(r)] for r in s.image_keys]).float()
    ids, lab = torch.tensor([s.input_ids]), torch.tensor([s.labels])
    tgt = torch.full_like(lab, IGNORE)
    tgt[:, :-1] = lab[:, 1:]
    out = vlm(ids, torch.arange(ids.shape[1])[None], tgt,
              {"image": {"features": feats, "counts": torch.tensor([len(feats)])}})
    assert torch.isfinite(out["loss_sum"])
    # ZeRO-3 and ZeRO-2 exports hold the same trained weights
    other = "zero3" if ds == "zero2" else "zero2"
    from safetensors.torch import load_file
    a = load_file(str(run / "export" / "connector.safetensors"))
    b = load_file(str(stage1_runs / {"zero2": "z2", "zero3": "z3"}[other] / "export" / "connector.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_kill9_one_rank_then_resume_auto_matches_uninterrupted(tiny_data, tmp_path):
    ref = tmp_path / "ref"
    launch(train_args(tiny_data, ref))
    crashed = tmp_path / "crashed"
    rc, out = launch(train_args(tiny_data, crashed), env_extra={"VLM_DIST_KILL_AT": "6:1"}, expect_rc=None)
    assert rc != 0 and "killing myself" in out
    assert (crashed / "checkpoints" / "step_00000004" / "COMPLETE").exists()
    assert not (crashed / "checkpoints" / "step_00000008").exists()
    launch(train_args(tiny_data, crashed, **{"checkpoint.resume": "auto"}))
    a, b = losses(ref), losses(crashed)
    for s in range(5, 9):  # the resumed run re-does steps 5..8 from the step-4 checkpoint
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6), (s, a, b)


@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_qlora_sft_stage_runs_and_loss_falls(tiny_data, tmp_path, ds):
    out = tmp_path / ds
    launch(train_args(tiny_data, out, stage="stage3_multi", ds=ds, **{
        "model.llm_mode": "qlora", "model.dtype": "bfloat16", "model.init_from": "null", "train.max_steps": 10, "checkpoint.every": 0}))
    ls = losses(out)
    assert sum(ls[s] for s in (9, 10)) < sum(ls[s] for s in (1, 2))
    assert (out / "export" / "adapter" / "adapter_config.json").exists()


def test_missing_explicit_checkpoint_is_an_error_on_every_rank(tiny_data, tmp_path):
    rc, out = launch(train_args(tiny_data, tmp_path / "r", **{"checkpoint.resume": tmp_path / "nope"}),
                     expect_rc=None)
    assert rc != 0
    assert out.count("no such checkpoint directory") >= 2  # both ranks say it


def test_nan_losses_skip_steps_then_save_and_stop(tiny_data, tmp_path):
    # an absurd learning rate blows the connector up: non-finite losses from step 2 on
    rc, out = launch(train_args(tiny_data, tmp_path / "r", **{
        "train.lr_connector": 1e30, "train.max_grad_norm": 0.0, "train.nan_patience": 2,
        "checkpoint.every": 0}), expect_rc=None)
    assert rc != 0, out[-3000:]
    assert "non-finite losses in a row" in out and "samples [" in out
    assert any(p.name.startswith("step_") for p in (tmp_path / "r" / "checkpoints").iterdir())


def test_run_without_inputs_names_the_flags_to_add(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), "--deepspeed",
                           str(REPO / "ds_configs" / "zero2.json"), f"--train.output_dir={tmp_path}",
                           "--model.llm=/nonexistent/llm", "--data.records=/nonexistent.jsonl"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, DS_ACCELERATOR="cpu"))
    assert proc.returncode != 0
    err = proc.stderr
    assert "--model.llm" in err and "--data.records" in err


def test_records_whose_image_failed_are_dropped_counted_and_listed(tiny_data):
    from vlm_dist.cache import FeatureCache
    from vlm_dist.config import RecordSource
    from vlm_dist.data.samples import load_training_set

    train_set, report = load_training_set(
        [RecordSource(str(tiny_data["data"] / "with_broken.jsonl"))], tiny_data["llm"], "plain", 4, 160, False,
        FeatureCache(tiny_data["cache"]), seed=0, log=lambda *_: None)
    assert len(train_set) == 1 and report.dropped == {"image_failed": 1}
    assert report.listed[0]["id"] == "broken-image-record" and "broken.png" in report.listed[0]["detail"]
    sample = train_set[0]
    assert len(sample.image_keys[0]) == 64  # references became SHA-256 cache keys


@pytest.mark.skipif(not shutil.which("mpirun"), reason="no mpirun (pip install mpich mpi4py)")
def test_mpirun_two_ranks_trains(tiny_data, tmp_path):
    """mpirun -n 2: rank and world come from MPI (mpi4py), as on a cluster without torchrun."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    _PORT[0] += 1
    env["MASTER_PORT"] = str(_PORT[0])
    out = tmp_path / "mpi"
    proc = subprocess.run(["mpirun", "-n", "2", sys.executable, str(REPO / "launch" / "train.py")] +
                          [str(a) for a in train_args(tiny_data, out, **{"train.max_steps": 3})],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert sorted(losses(out)) == [1, 2, 3]
    assert (out / "export" / "connector.safetensors").exists()
