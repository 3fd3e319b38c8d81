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
    from vlm_dist.cache.reader import FeatureCache
    from vlm_dist.inference.export import load_export
    from vlm_dist.contract.prompt import IGNORE, PromptEncoder
    from vlm_dist.contract.records import read_records

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
    rows = [json.loads(line) for line in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))  # the redone steps once


@pytest.mark.parametrize("ds", ["zero2", "zero3"])
def test_qlora_sft_stage_runs_and_loss_falls(tiny_data, tmp_path, ds):
    out = tmp_path / ds
    launch(train_args(tiny_data, out, stage="stage3_multi", ds=ds, **{
        "model.llm_mode": "qlora", "model.dtype": "bfloat16", "model.init_from": "null", "train.max_steps": 10, "checkpoint.every": 0}))
    ls = losses(out)
    assert sum(ls[s] for s in (9, 10)) < sum(ls[s] for s in (1, 2))
    assert (out / "export" / "adapter" / "adapter_config.json").exists()


def test_missing_explicit_checkpoint_is_an_error_on_every_rank(tiny_data, tmp_path):
    # the deepspeed launcher passes the ranks' exit code on (torchrun adds a traceback of its own)
    rc, out = launch(train_args(tiny_data, tmp_path / "r", **{"checkpoint.resume": tmp_path / "nope"}),
                     launcher="deepspeed", expect_rc=2)
    # both ranks stop on it (neither waits for the other); rank 0 alone prints it, once
    assert out.count("no such checkpoint directory") == 1 and "Traceback" not in out


def test_nan_losses_skip_steps_then_save_and_stop(tiny_data, tmp_path):
    from vlm_dist.training.checkpoint import load_rank_state, resolve_resume

    # an absurd learning rate blows the connector up: non-finite losses from step 2 on
    args = {"train.lr_connector": 1e30, "train.max_grad_norm": 0.0, "train.nan_patience": 2, "checkpoint.every": 0}
    rc, out = launch(train_args(tiny_data, tmp_path / "r", **args), expect_rc=None)
    assert rc != 0, out[-3000:]
    assert "2 non-finite losses in a row, last at step 3" in out and "samples [" in out
    ckpts = tmp_path / "r" / "checkpoints"
    stop = ckpts / "nan_step_00000003"   # saved for inspection, after the update that broke the weights
    assert (stop / "COMPLETE").exists() and load_rank_state(stop, 1)["trainer"]["nan_run"] == 2
    assert not (ckpts / "latest").exists() and resolve_resume("auto", ckpts) is None   # never the resume target
    # resumed on purpose from it, the run goes on counting: one more non-finite step stops it
    rc, out = launch(train_args(tiny_data, tmp_path / "r", **args, **{"checkpoint.resume": stop}),
                     expect_rc=None)
    assert rc != 0 and "3 non-finite losses in a row, last at step 4" in out, out[-3000:]


def test_a_nan_loss_whose_update_was_applied_stops_without_publishing(tiny_data, tmp_path):
    """DeepSpeed's overflow check skips a step with non-finite gradients; a non-finite loss that got
    through anyway (injected at step 6, after its update) is caught on the device and read at the next
    log/save (step 8): that step is not published, the resume target stays step 4."""
    from vlm_dist.training.checkpoint import resolve_resume

    rc, out = launch(train_args(tiny_data, tmp_path / "r", **{"train.log_every": 4, "checkpoint.every": 4}),
                     env_extra={"VLM_DIST_NAN_LOSS_AT": "6"}, expect_rc=None)
    assert rc != 0 and "between steps 5 and 8 had its update applied" in out, out[-3000:]
    ckpts = tmp_path / "r" / "checkpoints"
    assert not (ckpts / "step_00000008").exists() and (ckpts / "nan_step_00000008" / "COMPLETE").exists()
    assert (ckpts / "latest").read_text() == "step_00000004"
    assert resolve_resume("auto", ckpts).name == "step_00000004"
    assert not (tmp_path / "r" / "export").exists()


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
    from vlm_dist.cache.reader import FeatureCache
    from vlm_dist.config import RecordSource
    from vlm_dist.data.samples import load_training_set

    train_set, _, report = load_training_set(
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


def test_eval_split_is_taken_before_the_upsampled_mixture_and_duplicate_ids_are_listed(tiny_data, tmp_path):
    from vlm_dist.cache.reader import FeatureCache
    from vlm_dist.config import RecordSource
    from vlm_dist.data.samples import load_training_set
    from vlm_dist.contract.records import RecordError

    lines = (tiny_data["data"] / "stage1_train.jsonl").read_text().splitlines()
    path = tmp_path / "dups.jsonl"
    path.write_text("\n".join(lines + lines[:2]) + "\n")   # two records repeated in the input file
    cache = FeatureCache(tiny_data["cache"])

    def load(src, seed=0):   # 3 epochs of the file: every record drawn three times
        return load_training_set([src], tiny_data["llm"], "plain", 4, 160, False, cache, seed=seed,
                                 eval_fraction=0.2, log=lambda *_: None)

    train, held, report = load(RecordSource(str(path), count=3 * len(lines)))
    train_ids = [train[i].id for i in range(len(train))]
    held_ids = [held[i].id for i in range(len(held))]
    assert len(held_ids) == len(set(held_ids)) == int(len(lines) * 0.2)
    assert not set(held_ids) & set(train_ids) and len(train_ids) == 3 * len(lines)
    assert [d["index"] for d in report.duplicates] == [len(lines), len(lines) + 1]
    assert f"{len(held_ids)} held out for eval, 2 duplicate id(s) (kept)" in report.summary()
    report.write(tmp_path)
    assert len((tmp_path / "duplicates.jsonl").read_text().splitlines()) == 2
    again_train, again_held, _ = load(RecordSource(str(path), count=3 * len(lines)))
    assert (again_held.rows == held.rows).all() and (again_train.rows == train.rows).all()

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(("\n".join(lines[:2]) + "\n").encode() + lines[2].encode().replace(b"}", b"\xff}", 1) + b"\n")
    with pytest.raises(RecordError, match=f"{bad}:3: not UTF-8"):
        load(RecordSource(str(bad)))
    assert not any(".tmp" in p.name for p in tmp_path.iterdir())


def test_metrics_after_a_resume_hold_each_step_once(tmp_path):
    from vlm_dist.training.metrics import MetricsLog

    rows = [{"kind": "train", "step": s, "loss": 1.0 / s} for s in range(1, 7)] + \
        [{"kind": "eval", "step": 4, "eval_loss": 0.5}, {"kind": "note", "step": 6, "note": "x"}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "tr')
    log = MetricsLog(tmp_path, enabled=True, total_steps=8, start_step=4)   # resumed from step 4
    for s in (5, 6):
        log.step(s, loss=0.1, lr=1e-3, grad_norm=1.0, tokens=10, samples=1, seconds=1.0)
    log.close()
    got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in got] == [("train", s) for s in range(1, 5)] + [("eval", 4)] + \
        [("train", 5), ("train", 6)]
    assert got[-1]["loss"] == 0.1


def test_resume_that_changes_the_mathematics_is_refused_unless_named(tiny_data, tmp_path):
    """A changed learning rate, or records of other content with the same lengths, is refused
    (exit 2, naming the key, config.yaml untouched); named in --checkpoint.allow_changed, it trains."""
    records = tmp_path / "records.jsonl"
    shutil.copy(tiny_data["data"] / "stage1_train.jsonl", records)
    out = tmp_path / "r"
    base = {"data.records": records, "train.max_steps": 2, "checkpoint.every": 2}
    launch(train_args(tiny_data, out, **base))
    written = (out / "config.yaml").read_bytes()
    resume = {**base, "checkpoint.resume": "auto"}
    # the deepspeed launcher passes a rank's exit code on (torchrun turns every failure into 1)
    _, log = launch(train_args(tiny_data, out, **resume, **{"train.lr_connector": 1e-3}), launcher="deepspeed",
                    expect_rc=2)
    assert "train.lr_connector: 0.003 -> 0.001" in log and "--checkpoint.allow_changed=train.lr_connector" in log
    assert "Traceback" not in log
    assert (out / "config.yaml").read_bytes() == written
    lines = records.read_text().splitlines()   # same token lengths, other content: one id changed
    first = json.loads(lines[0])
    first["id"] = first["id"][:-1] + ("x" if first["id"][-1] != "x" else "y")
    records.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    _, log = launch(train_args(tiny_data, out, **resume), launcher="deepspeed", expect_rc=2)
    assert "data.records: content changed" in log and "Traceback" not in log
    assert (out / "config.yaml").read_bytes() == written
    # named explicitly (and a longer run): accepted, logged, and the new learning rate is the one used
    _, log = launch(train_args(tiny_data, out, **{**resume, "train.max_steps": 3, "train.lr_connector": 1e-3,
                                                  "checkpoint.allow_changed": "train.lr_connector,data.records"}))
    assert "resume: train.lr_connector: 0.003 -> 0.001 (allowed" in log and "resume: train.max_steps: 2 -> 3" in log
    from vlm_dist.config import load_config
    cfg = load_config(out / "config.yaml")
    assert cfg.train.lr_connector == 1e-3
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lr3 = [r["lr"] for r in rows if r["kind"] == "train" and r["step"] == 3]
    assert lr3 == [pytest.approx(1e-3 * cfg.train.min_lr_ratio)]   # warmup 0: step 3 of 3 is the floor


def test_a_users_mistake_after_start_up_is_one_line_from_rank_0_and_exit_2(tiny_data, tmp_path):
    """A broken cache is found by every rank after the process group is up: the user reads one
    line naming the shard (rank 0's), no traceback, and the launcher exits 2."""
    cache = tmp_path / "cache"
    shutil.copytree(tiny_data["cache"], cache)
    shard = sorted((cache / "shards").glob("*.arrow"))[0]
    shard.write_bytes(shard.read_bytes()[:100])   # truncated
    _, log = launch(train_args(tiny_data, tmp_path / "run", **{"data.cache": cache}), launcher="deepspeed",
                    expect_rc=2)
    assert log.count("train: error") == 1 and log.count(shard.name) == 1, log[-3000:]
    assert log.index("train: error") < log.index(shard.name)   # the message goes on to name the shard
    assert "Traceback" not in log
