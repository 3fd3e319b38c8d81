"""vlm_dist.dist: launcher discovery, two CPU ranks on gloo, preemption agreement, dead ranks.

    python -m pytest tests/test_dist.py -x -q

The multi-process tests start real ranks (torchrun, mpirun, or two plain processes with
the deepspeed launcher's RANK/WORLD_SIZE variables) running `python -m vlm_dist.dist --selftest`.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlm_dist import dist
from vlm_dist.dist import DistError, discover

REPO = Path(__file__).resolve().parents[1]
LAUNCH_VARS = re.compile(r"^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|MASTER_PORT|SLURM_.*|"
                         r"PMI_.*|OMPI_.*|MPI_LOCAL.*|TORCHELASTIC_.*|GROUP_RANK)$")


# ----------------------------------------------------------------------------- discover()

def test_torchrun_env():
    env = discover({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8",
                    "GROUP_RANK": "0", "MASTER_ADDR": "node1", "MASTER_PORT": "1234",
                    "TORCHELASTIC_RUN_ID": "x"})
    assert env == dist.DistEnv(5, 16, 1, 8, 0, "node1", 1234, "torchrun")


def test_deepspeed_launcher_env():
    env = discover({"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_SIZE": "8",
                    "MASTER_ADDR": "node1", "MASTER_PORT": "29500"})
    assert (env.launcher, env.node_rank, env.local_world_size) == ("deepspeed", 1, 8)


def test_rank_without_master_addr_is_an_error():
    with pytest.raises(DistError, match="MASTER_ADDR"):
        discover({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})


def test_srun_step_env(monkeypatch):
    asked = []
    monkeypatch.setattr(dist, "_first_slurm_host", lambda nodelist: asked.append(nodelist) or "dgx-001")
    env = discover({"SLURM_PROCID": "11", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "20",
                    "SLURM_NTASKS": "20", "SLURM_LOCALID": "3", "SLURM_NODEID": "1",
                    "SLURM_STEP_TASKS_PER_NODE": "8(x2),4", "SLURM_STEP_NODELIST": "dgx-[001-003]",
                    "SLURM_JOB_NODELIST": "dgx-[001-003]", "SLURM_JOB_ID": "123456"})
    assert env == dist.DistEnv(11, 20, 3, 8, 1, "dgx-001", 20000 + 123456 % 20000, "slurm")
    assert asked == ["dgx-[001-003]"]
    assert dist._slurm_tasks_on_node("8(x2),4", 2) == 4


def test_sbatch_shell_without_srun_is_one_process():
    # the batch shell carries SLURM_PROCID=0 and SLURM_NTASKS=16 but is not a step
    env = discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "16", "SLURM_JOB_ID": "7", "SLURM_LOCALID": "0"})
    assert (env.launcher, env.world_size) == ("single", 1)


def test_open_mpi_env():
    env = discover({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
                    "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "OMPI_COMM_WORLD_NODE_RANK": "1",
                    "MASTER_ADDR": "n0", "MASTER_PORT": "2000",
                    "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"})  # mpirun inside sbatch: MPI wins
    assert env == dist.DistEnv(3, 4, 1, 2, 1, "n0", 2000, "mpi")


def test_mpich_env_one_node_needs_no_mpi4py(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import fails
    env = discover({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (1, 2, 1, "127.0.0.1")
    with pytest.raises(DistError, match="mpi4py"):
        discover({"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})


def test_bad_value_names_the_variable():
    with pytest.raises(DistError, match="SLURM_PROCID"):
        discover({"SLURM_PROCID": "x", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_NODEID": "0",
                  "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_NODELIST": "n", "MASTER_ADDR": "n",
                  "SLURM_JOB_ID": "1", "SLURM_LOCALID": "0"})


def test_requeue_code_matches_the_slurm_scripts():
    text = (REPO / "slurm" / "common.sh").read_text()
    assert f"REQUEUE_EXIT_CODE={dist.REQUEUE_EXIT_CODE}" in text


# ----------------------------------------------------------------------------- real ranks

def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not LAUNCH_VARS.match(k)}
    env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONWARNINGS="ignore")
    return env


@pytest.fixture(scope="module")
def deepspeed_cpu_ops_built():
    """DeepSpeed compiles its CPU shared-memory comm op once per machine (~40 s, then cached);
    do it here once instead of in two ranks at the same time inside a test."""
    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; build_shm_op()"],
                   env=_clean_env(), check=True, capture_output=True, timeout=600)


def _selftest(*args: str) -> list[str]:
    return [sys.executable, "-m", "vlm_dist.dist", "--selftest", *args]


def _start_two_ranks(tmp_path: Path, *args: str) -> list[tuple[subprocess.Popen, Path]]:
    """Two ranks with the deepspeed launcher's variables; output of rank r in tmp_path/rank{r}.log."""
    port = dist._free_port()
    procs = []
    for r in range(2):
        env = _clean_env()
        env.update(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = tmp_path / f"rank{r}.log"
        procs.append((subprocess.Popen(_selftest(*args), env=env, cwd=REPO, stdout=log.open("w"),
                                       stderr=subprocess.STDOUT), log))
    return procs


def _wait_for(log: Path, text: str, procs, limit_s: float = 120) -> None:
    end = time.monotonic() + limit_s
    while text not in log.read_text():
        if any(p.poll() is not None for p, _ in procs) or time.monotonic() > end:
            for p, _ in procs:
                p.kill()
            raise AssertionError(f"{text!r} never appeared in {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _finish(procs, limit_s: float = 120) -> list[tuple[int, str]]:
    out = []
    for p, log in procs:
        try:
            p.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                q.kill()
            raise AssertionError(f"rank did not end within {limit_s}s:\n{log.read_text()[-3000:]}")
        out.append((p.returncode, log.read_text()))
    return out


@pytest.mark.usefixtures("deepspeed_cpu_ops_built")
def test_torchrun_two_cpu_ranks_all_reduce():
    r = subprocess.run(["torchrun", "--nproc-per-node", "2", "--master-port", str(dist._free_port()),
                        "-m", "vlm_dist.dist", "--selftest", "--steps", "2"],
                       env=_clean_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "selftest ok: world_size=2 backend=gloo launcher=torchrun sum=3" in r.stdout


@pytest.mark.usefixtures("deepspeed_cpu_ops_built")
def test_deepspeed_launcher_two_cpu_ranks():
    r = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(dist._free_port()),
                        "--module", "vlm_dist.dist", "--selftest"],
                       env=_clean_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "selftest ok: world_size=2 backend=gloo launcher=deepspeed sum=3" in r.stdout


@pytest.mark.usefixtures("deepspeed_cpu_ops_built")
def test_torchrun_two_nodes_on_loopback(tmp_path):
    port = str(dist._free_port())
    procs = []
    for node in range(2):
        log = tmp_path / f"node{node}.log"
        cmd = ["torchrun", "--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1",
               "--master-addr", "127.0.0.1", "--master-port", port, "-m", "vlm_dist.dist", "--selftest"]
        procs.append((subprocess.Popen(cmd, env=_clean_env(), cwd=REPO, stdout=log.open("w"),
                                       stderr=subprocess.STDOUT), log))
    (rc0, out0), (rc1, out1) = _finish(procs)
    assert (rc0, rc1) == (0, 0), out0[-3000:] + out1[-3000:]
    assert "rank 1/2" in out1 and "node 1" in out1
    assert "selftest ok: world_size=2 backend=gloo launcher=torchrun" in out0


@pytest.mark.usefixtures("deepspeed_cpu_ops_built")
def test_signal_on_one_rank_stops_both_at_the_same_step(tmp_path):
    procs = _start_two_ranks(tmp_path, "--steps", "1000", "--step-s", "0.05")
    _wait_for(procs[0][1], "step 3\n", procs)
    pid1 = int(re.search(r"rank 1/2 pid (\d+)", procs[1][1].read_text()).group(1))
    os.kill(pid1, signal.SIGUSR1)
    (rc0, out0), (rc1, out1) = _finish(procs)
    assert (rc0, rc1) == (dist.REQUEUE_EXIT_CODE, dist.REQUEUE_EXIT_CODE), out0[-2000:] + out1[-2000:]
    step0 = re.search(r"rank 0: stopped at step (\d+)", out0).group(1)
    step1 = re.search(r"rank 1: stopped at step (\d+)", out1).group(1)
    assert step0 == step1
    assert "signal on rank 1 (SIGUSR1)" in out0


@pytest.mark.usefixtures("deepspeed_cpu_ops_built")
def test_hung_rank_ends_the_job_and_is_named(tmp_path):
    # rank 1 stops making steps: rank 0's step check names it after the collective timeout,
    # and rank 1's own stall watchdog ends it with its stack
    procs = _start_two_ranks(tmp_path, "--steps", "100", "--step-s", "0.05", "--hang-rank", "1",
                             "--fault-step", "3", "--timeout-s", "5", "--stall-timeout-s", "8")
    (rc0, out0), (rc1, out1) = _finish(procs)
    assert rc0 != 0 and "Ranks 1 failed to pass monitoredBarrier" in out0, out0[-3000:]
    assert rc1 == dist.STALL_EXIT_CODE and "rank 1: no step for 8s" in out1, out1[-3000:]
    assert "time.sleep" in out1 or "_selftest" in out1  # the stack of the hung rank


@pytest.mark.usefixtures("deepspeed_cpu_ops_built")
def test_crashed_rank_ends_the_other(tmp_path):
    procs = _start_two_ranks(tmp_path, "--steps", "100", "--step-s", "0.05", "--crash-rank", "1",
                             "--fault-step", "3", "--timeout-s", "30")
    (rc0, out0), (rc1, out1) = _finish(procs)
    assert rc1 != 0 and "rank 1: crashing at step 3" in out1
    assert rc0 != 0 and "rank 0: step check" in out0, out0[-3000:]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="no mpirun on PATH (pip install mpich mpi4py)")
@pytest.mark.usefixtures("deepspeed_cpu_ops_built")
def test_mpirun_two_ranks():
    pytest.importorskip("mpi4py", reason="mpi4py not installed (pip install mpich mpi4py)")
    r = subprocess.run(["mpirun", "-n", "2", *_selftest("--steps", "2")], env=_clean_env(), cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "selftest ok: world_size=2 backend=gloo launcher=mpi sum=3" in r.stdout
