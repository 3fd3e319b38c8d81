"""The slurm/ scripts on a real Slurm: srun ranks, the stage templates, preemption and requeue.

    bash .ci/slurm_up.sh                      # as root: a one-node cluster on localhost
    python -m pytest tests/test_slurm.py -x -q

Skipped (with the reason) when `sbatch` is missing or the cluster does not answer. Jobs run
with 2 CPU tasks on gloo (--gpus-per-node=0). The trainer is one variable (TRAIN_CMD): these
tests use FAKE_TRAINER, a stand-in that keeps launch/train.py's contract with vlm_dist.dist;
`run_stage()` runs any stage template, e.g. with the real trainer on a tiny config.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlm_dist.dist import REQUEUE_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["common.sh", "env.sh", "build_cache.sbatch", "stage1_align.sbatch", "stage2_sft.sbatch",
           "stage3_multi.sbatch"]
CPU_JOB = ["--nodes=1", "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1",
           "--time=60"]  # longer than the 10 minutes of the USR1 lead

# launch/train.py's side of the contract: init_distributed, a Preemption check every step,
# checkpoint + exit_for_requeue on a signal, resume from the checkpoint under --resume auto.
FAKE_TRAINER = '''
import json, os, sys, time
from pathlib import Path
from vlm_dist import dist

argv = sys.argv[1:]
opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
out, max_steps = Path(opts["train.output_dir"]), int(opts["train.max_steps"])
resume = argv[argv.index("--resume") + 1] if "--resume" in argv else None
env = dist.init_distributed(timeout_s=60)
ckpt = out / "ckpt.json"
step = json.loads(ckpt.read_text())["step"] if resume == "auto" and ckpt.exists() else 0
stop = dist.Preemption()
while step < max_steps:
    time.sleep(float(opts.get("fake.step_s", "0.05")))
    step += 1
    loss = dist.all_reduce_sum(float(step * (env.rank + 1))) / 3.0    # a function of the step only
    if env.rank == 0:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "loss": loss,
                                "restart": int(os.environ.get("SLURM_RESTART_COUNT", 0))}) + "\\n")
    if stop.should_stop():
        if env.rank == 0:
            ckpt.write_text(json.dumps({"step": step}))
        dist.exit_for_requeue()
if env.rank == 0:
    (out / "done.json").write_text(json.dumps({"argv": argv, "world_size": env.world_size,
                                               "launcher": env.launcher}))
dist.shutdown()
'''


def _cluster_answers() -> str | None:
    """None when jobs can run, else why not."""
    if shutil.which("sbatch") is None:
        return "no sbatch on PATH: run `bash .ci/slurm_up.sh` as root to start a one-node Slurm"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 15 s: is slurmctld running? (bash .ci/slurm_up.sh)"
    if r.returncode != 0 or not re.search(r"idle|mixed|allocated", r.stdout):
        return f"no usable Slurm node (sinfo: {r.stdout.strip() or r.stderr.strip()}); run bash .ci/slurm_up.sh"
    return None


needs_slurm = pytest.mark.skipif(_cluster_answers() is not None, reason=str(_cluster_answers()))


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not re.match(r"^(SLURM_|RANK$|WORLD_SIZE$|LOCAL_RANK$|MASTER_|PMI_|OMPI_)", k)}
    env.update(VLM_REPO=str(REPO), PYTHON=sys.executable, PYTHONWARNINGS="ignore", **extra)
    return env


def run_stage(script: str, tmp_path: Path, *args: str, sbatch_args=(), block=True, **env: str):
    """sbatch --wait slurm/<script> with 2 CPU tasks: (CompletedProcess, or Popen if not block; log path)."""
    log = tmp_path / "slurm.out"
    cmd = ["sbatch", "--wait", *CPU_JOB, f"--output={log}", *sbatch_args, str(REPO / "slurm" / script), *args]
    if block:
        return subprocess.run(cmd, env=_env(**env), cwd=REPO, capture_output=True, text=True, timeout=600), log
    return subprocess.Popen(cmd, env=_env(**env), cwd=REPO, stdout=subprocess.PIPE, text=True), log


def _read(log: Path) -> str:
    return log.read_text() if log.exists() else "(no log)"


def test_scripts_parse():
    for name in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(REPO / "slurm" / name)], capture_output=True, text=True)
        assert r.returncode == 0, f"slurm/{name}: {r.stderr}"


@needs_slurm
def test_srun_selftest_through_common_sh(tmp_path):
    job = tmp_path / "selftest.sbatch"
    job.write_text('#!/bin/bash\nsource "$VLM_REPO/slurm/common.sh"\nvlm_setup\n'
                   'vlm_srun "$PYTHON" -m vlm_dist.dist --selftest --steps 2\n')
    r, log = run_stage(str(job), tmp_path)  # an absolute path replaces slurm/
    out = _read(log)
    assert r.returncode == 0, r.stderr + out[-3000:]
    assert "0: selftest ok: world_size=2 backend=gloo launcher=slurm sum=3" in out, out[-3000:]


@needs_slurm
def test_hung_rank_fails_the_job_naming_it(tmp_path):
    # rank 1 hangs: rank 0's step check names it after 5 s and exits non-zero, then srun
    # (--kill-on-bad-exit) ends rank 1; the job fails instead of running to its time limit
    job = tmp_path / "hang.sbatch"
    job.write_text('#!/bin/bash\nsource "$VLM_REPO/slurm/common.sh"\nvlm_setup\n'
                   'vlm_srun "$PYTHON" -m vlm_dist.dist --selftest --steps 50 --hang-rank 1 --timeout-s 5\n')
    r, log = run_stage(str(job), tmp_path)
    out = _read(log)
    assert r.returncode != 0, out[-3000:]
    assert "0: [rank0]: DistError: rank 0: step check" in out and "Ranks 1 failed to pass monitoredBarrier" in out, \
        out[-3000:]
    assert "srun failed with exit code" in out


@needs_slurm
def test_stage_template_passes_configs_paths_and_overrides(tmp_path):
    (tmp_path / "fake_train.py").write_text(FAKE_TRAINER)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "cache" / "shards").mkdir(parents=True)
    (tmp_path / "cache" / "shards" / "shard-00000.arrow").write_bytes(b"features")
    r, log = run_stage("stage1_align.sbatch", tmp_path, "--train.max_steps=3",
                       TRAIN_CMD=f"{sys.executable} {tmp_path / 'fake_train.py'}", RUN_DIR=str(run_dir),
                       RECORDS="a.jsonl,b.jsonl", CACHE_DIR=str(tmp_path / "cache"), STAGE_DIR=str(tmp_path / "nvme"),
                       LOADER_WORKERS="3", VERIFY_CACHE="0")   # a stand-in cache: nothing to verify
    assert r.returncode == 0, r.stderr + _read(log)[-3000:]
    done = json.loads((run_dir / "done.json").read_text())
    assert done["world_size"] == 2 and done["launcher"] == "slurm"
    assert done["argv"] == ["--deepspeed", "ds_configs/zero2.json", "--config", "launch/configs/stage1_align.yaml",
                            f"--train.output_dir={run_dir}", "--data.records=a.jsonl,b.jsonl",
                            f"--data.cache={tmp_path / 'nvme' / 'cache'}", "--data.num_workers=3",
                            "--resume", "auto", "--train.max_steps=3"]
    # the cache was staged to the node-local directory before training
    assert (tmp_path / "nvme" / "cache" / "shards" / "shard-00000.arrow").read_bytes() == b"features"


def _start_requeued_now(job_id: str, proc: subprocess.Popen) -> None:
    """Slurm holds a requeued job back for ~2 minutes (BeginTime); in CI, start it in 5 s
    (not at once: slurmd refuses a start in the same second its old credential was revoked)."""
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        info = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
        if "Restarts=0" not in info and "JobState=PENDING" in info:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+5"], check=True)
            return
        time.sleep(0.5)


def _preempt_when(proc: subprocess.Popen, log: Path, ready) -> str:
    """Once ready(): USR1 to the batch shell (what `#SBATCH --signal=B:USR1@600` does before the
    time limit), let the requeued job start, wait for the end. Returns the job id."""
    try:
        job_id = re.search(r"Submitted batch job (\d+)", proc.stdout.readline()).group(1)
        deadline = time.monotonic() + 300
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, _read(log)[-3000:]
            time.sleep(0.2)
        subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], check=True)
        _start_requeued_now(job_id, proc)
        proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            subprocess.run(["scancel", job_id])
            proc.kill()
    return job_id


@needs_slurm
def test_preempted_job_saves_requeues_and_resumes(tmp_path):
    (tmp_path / "fake_train.py").write_text(FAKE_TRAINER)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    steps = 25
    proc, log = run_stage("stage3_multi.sbatch", tmp_path, f"--train.max_steps={steps}", "--fake.step_s=0.2",
                          block=False, TRAIN_CMD=f"{sys.executable} {tmp_path / 'fake_train.py'}",
                          RUN_DIR=str(run_dir))
    metrics = run_dir / "metrics.jsonl"
    job_id = _preempt_when(proc, log, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3)
    out = _read(log)
    assert proc.returncode == 0, out[-4000:]
    assert f"exit {REQUEUE_EXIT_CODE}): requeueing job {job_id}" in out, out[-4000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    stopped_at = json.loads((run_dir / "ckpt.json").read_text())["step"]
    # every step ran exactly once: 1..stopped_at before the requeue, the rest after it
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert {r["restart"] for r in rows if r["step"] <= stopped_at} == {0}
    assert {r["restart"] for r in rows if r["step"] > stopped_at} == {1}
    assert [r["loss"] for r in rows] == [float(s) for s in range(1, steps + 1)]  # = an uninterrupted run
    assert (run_dir / "done.json").exists()


@needs_slurm
def test_build_cache_template_two_ranks(tmp_path, tiny_models):
    import numpy as np
    from PIL import Image

    from vlm_dist.contract.records import write_records

    (tmp_path / "images").mkdir()
    records = []
    for i in range(6):
        pixels = (np.random.RandomState(i).rand(40, 40, 3) * 255).astype("uint8")
        Image.fromarray(pixels).save(tmp_path / "images" / f"{i}.png")
        records.append({"id": f"r{i}", "images": [f"{i}.png"],
                        "conversations": [{"role": "user", "content": "<image> what is it?"},
                                          {"role": "assistant", "content": "a thing"}]})
    write_records(tmp_path / "records.jsonl", records)
    cache = tmp_path / "cache"
    r, log = run_stage("build_cache.sbatch", tmp_path, "--shard-size", "2", "--no-progress",
                       RECORDS=str(tmp_path / "records.jsonl"), IMAGE_ROOT=str(tmp_path / "images"),
                       CACHE_DIR=str(cache), VISION_MODEL=tiny_models["vision"])
    out = _read(log)
    assert r.returncode == 0, out[-3000:]
    assert "0: [vlm-cache]" in out and "1: " in out  # both ranks ran
    assert (cache / "manifest.json").exists(), out[-3000:]


# ----------------------------------------------------------------------------- the real trainer

@pytest.fixture(scope="module")
def tiny_run(tiny_models, tmp_path_factory):
    """Demo shapes data + its feature cache, and the tiny-model overrides for launch/train.py."""
    root = tmp_path_factory.mktemp("slurm_train")
    subprocess.run([sys.executable, str(REPO / "launch" / "demo_data.py"), "--out", str(root / "data"),
                    "--scale", "0.05"], check=True, capture_output=True, cwd=REPO)
    subprocess.run([sys.executable, "-m", "preprocess.cache_cli", "build", "--records",
                    str(root / "data" / "stage1_train.jsonl"), str(root / "data" / "sft_train.jsonl"),
                    "--image-root", str(root / "data"),
                    "--vision-model", tiny_models["vision"], "--out", str(root / "cache"), "--dtype", "fp32",
                    "--workers", "0", "--no-progress"], check=True, capture_output=True, cwd=REPO)
    overrides = [f"--model.llm={tiny_models['llm']}", f"--model.vision={tiny_models['vision']}",
                 "--model.dtype=float32", "--model.num_latents=4", "--model.resampler_depth=1",
                 "--model.resampler_heads=4", "--data.max_seq_len=160", "--data.num_workers=0",
                 "--train.epochs=null", "--train.micro_batch_size=1", "--train.log_every=1",
                 "--train.lr_connector=3e-3", "--train.warmup_ratio=0.0", "--train.eval_every=0"]
    return {"env": {"RECORDS": str(root / "data" / "stage1_train.jsonl"), "CACHE_DIR": str(root / "cache")},
            "overrides": overrides, "sft_records": str(root / "data" / "sft_train.jsonl")}


def _train_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("kind") == "train"}


@needs_slurm
def test_stage1_real_trainer_preempted_requeued_same_losses(tiny_run, tmp_path):
    """launch/train.py through slurm/stage1_align.sbatch: USR1 -> checkpoint -> exit 75 ->
    requeue -> --resume auto; the losses equal an uninterrupted run's, and the export exists."""
    steps = 60
    args = [*tiny_run["overrides"], f"--train.max_steps={steps}", "--checkpoint.every=0"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    r, log = run_stage("stage1_align.sbatch", tmp_path / "a", *args, RUN_DIR=str(tmp_path / "a" / "run"),
                       **tiny_run["env"])
    assert r.returncode == 0, _read(log)[-4000:]
    want = _train_losses(tmp_path / "a" / "run")

    run_dir = tmp_path / "b" / "run"
    proc, log = run_stage("stage1_align.sbatch", tmp_path / "b", *args, block=False, RUN_DIR=str(run_dir),
                          **tiny_run["env"])
    _preempt_when(proc, log, lambda: (run_dir / "metrics.jsonl").exists() and len(_train_losses(run_dir)) >= 5)
    out = _read(log)
    assert proc.returncode == 0, out[-4000:]
    assert "requeueing job" in out and "resumed from" in out, out[-4000:]
    got = _train_losses(run_dir)
    assert sorted(got) == list(range(1, steps + 1))
    assert got == pytest.approx(want, rel=1e-5)
    assert (run_dir / "export" / "connector.safetensors").exists()


@needs_slurm
def test_stage3_multi_image_lora_through_sbatch(tiny_run, tmp_path):
    """sbatch --wait slurm/stage3_multi.sbatch on the tiny config: exit 0, metrics, exported adapter."""
    run_dir = tmp_path / "run"
    args = [*tiny_run["overrides"], "--train.max_steps=6", "--checkpoint.every=3", "--model.init_from=null",
            "--lora.r=4", "--lora.alpha=8", "--lora.dropout=0.0"]
    r, log = run_stage("stage3_multi.sbatch", tmp_path, *args, RUN_DIR=str(run_dir),
                       **dict(tiny_run["env"], RECORDS=tiny_run["sft_records"]))
    assert r.returncode == 0, _read(log)[-4000:]
    assert sorted(_train_losses(run_dir)) == list(range(1, 7))
    assert (run_dir / "export" / "connector.safetensors").exists()
    assert (run_dir / "export" / "adapter" / "adapter_config.json").exists()
    assert (run_dir / "checkpoints" / "step_00000006" / "COMPLETE").exists()
