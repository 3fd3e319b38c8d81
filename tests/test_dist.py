"""vlm_dist.dist: launcher discovery, two CPU ranks on gloo, preemption agreement, dead ranks.

    python -m pytest tests/test_dist.py -x -q

The multi-process tests start real ranks (torchrun, mpirun, the deepspeed launcher, or two
plain processes with its RANK/WORLD_SIZE variables) running `python -m vlm_dist.dist --selftest`.
The pdsh tests need passwordless `ssh localhost` and pdsh (`bash .ci/ssh_up.sh` as root); they
skip without them, except under CI (CI=true), where that is a failure.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path

import psutil
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


def _kill_tree(proc: subprocess.Popen) -> None:
    """Kills proc and its descendants (a launcher killed alone leaves its children running)."""
    try:
        tree = psutil.Process(proc.pid)
        tree = [*tree.children(recursive=True), tree]
    except psutil.NoSuchProcess:
        return
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def _wait_for(log: Path, text: str, procs, limit_s: float = 120) -> None:
    end = time.monotonic() + limit_s
    while text not in log.read_text():
        if any(p.poll() is not None for p, _ in procs) or time.monotonic() > end:
            for p, _ in procs:
                _kill_tree(p)
            raise AssertionError(f"{text!r} never appeared in {log}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _finish(procs, limit_s: float = 120) -> list[tuple[int, str]]:
    out = []
    for p, log in procs:
        try:
            p.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            for q, _ in procs:
                _kill_tree(q)
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


# launch/train.py's side of the contract, small: a Preemption check every step, and on a stop a
# marker (the "checkpoint") and exit_for_requeue. Writes env{rank} (pid, environment) at start.
LOOP = '''
import os, sys, time
from pathlib import Path
from vlm_dist import dist

out = Path(sys.argv[-1])  # the deepspeed launcher puts --local_rank=N first
env = dist.init_distributed(timeout_s=60)
(out / f"env{env.rank}").write_text(f"{os.getpid()} DS_ACCELERATOR={os.environ.get('DS_ACCELERATOR')}")
stop = dist.Preemption()
step = 0
while True:
    step += 1
    time.sleep(0.05)
    dist.print0(f"step {step}")
    if stop.should_stop():
        (out / f"stopped{env.rank}").write_text(str(step))
        dist.exit_for_requeue()
'''


def _loop_ranks(out: Path, log: Path, procs) -> list[psutil.Process]:
    """Once both LOOP ranks have made 3 steps: the two ranks and their launch.py parents."""
    _wait_for(log, "step 3\n", procs)
    ranks = [psutil.Process(int((out / f"env{r}").read_text().split()[0])) for r in range(2)]
    return ranks + [p.parent() for p in ranks]


def _still_running(procs: list[psutil.Process], limit_s: float = 120) -> list[psutil.Process]:
    """Waits at most limit_s for the processes to end; kills and returns those that did not."""
    def running(p):
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    end = time.monotonic() + limit_s
    while any(map(running, procs)) and time.monotonic() < end:
        time.sleep(0.2)
    alive = [p for p in procs if running(p)]
    for p in alive:
        p.kill()
    return alive


def _stopped_steps(out: Path) -> list[str | None]:
    return [(out / f"stopped{r}").read_text() if (out / f"stopped{r}").exists() else None for r in range(2)]


@pytest.mark.usefixtures("deepspeed_cpu_ops_built")
def test_sigterm_to_the_deepspeed_launcher_saves_and_ends_the_ranks(tmp_path):
    # on one node runner.py (the `deepspeed` command) forwards no signal: killed, it leaves
    # launch.py and the ranks training on; the ranks' launcher watch turns that into SIGTERM
    (tmp_path / "loop.py").write_text(LOOP)
    log = tmp_path / "launcher.log"
    top = subprocess.Popen(["deepspeed", "--num_gpus", "2", "--master_port", str(dist._free_port()),
                            str(tmp_path / "loop.py"), str(tmp_path)],
                           env=_clean_env(), cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        procs = _loop_ranks(tmp_path, log, [(top, log)])
        top.send_signal(signal.SIGTERM)
        top.wait(timeout=60)
        assert _still_running(procs) == [], log.read_text()[-3000:]
    finally:
        _kill_tree(top)
    step0, step1 = _stopped_steps(tmp_path)
    assert step0 is not None and step0 == step1, log.read_text()[-3000:]
    assert "the deepspeed launcher is gone" in log.read_text()


@cache
def _no_pdsh_to_localhost() -> str | None:
    """None when `deepspeed --launcher pdsh` can reach localhost, else why not."""
    if shutil.which("pdsh") is None:
        return "pdsh is not installed: run `bash .ci/ssh_up.sh` as root"
    for host in ("localhost", "127.0.0.1"):
        r = subprocess.run(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5", host, "true"],
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return f"`ssh {host} true` fails ({r.stderr.strip()}): run `bash .ci/ssh_up.sh` as root"
    return None


@pytest.fixture
def pdsh_to_localhost():
    why = _no_pdsh_to_localhost()
    if why and os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the pdsh tests (make test runs .ci/ssh_up.sh): {why}")
    if why:
        pytest.skip(why)


def _pdsh_launcher(tmp_path: Path, *args: str) -> list[str]:
    """`deepspeed --launcher pdsh` on two "nodes" (localhost and 127.0.0.1: two ssh sessions, node
    ranks 0 and 1), run from tmp_path, whose .deepspeed_env carries the variables ssh would drop."""
    (tmp_path / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    (tmp_path / ".deepspeed_env").write_text("DS_ACCELERATOR=cpu\nCUDA_VISIBLE_DEVICES=\nOMP_NUM_THREADS=1\n")
    return ["deepspeed", "--hostfile", "hostfile", "--launcher", "pdsh", "--master_addr", "127.0.0.1",
            "--master_port", str(dist._free_port()), *args]


def _pdsh_env() -> dict:
    # PYTHON* variables are exported to the nodes by DeepSpeed itself
    return {**_clean_env(), "PYTHONPATH": str(REPO)}


@pytest.mark.usefixtures("deepspeed_cpu_ops_built", "pdsh_to_localhost")
def test_deepspeed_pdsh_launcher_two_nodes_on_loopback(tmp_path):
    r = subprocess.run(_pdsh_launcher(tmp_path, "--module", "vlm_dist.dist", "--selftest", "--steps", "2"),
                       env=_pdsh_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rank 1/2" in r.stdout and "node 1" in r.stdout, r.stdout[-3000:]
    assert "selftest ok: world_size=2 backend=gloo launcher=deepspeed sum=3" in r.stdout


@pytest.mark.usefixtures("deepspeed_cpu_ops_built", "pdsh_to_localhost")
def test_lost_pdsh_connection_saves_and_ends_the_ranks(tmp_path):
    # The ranks print into their ssh session; when it goes (pdsh killed, a node's link lost),
    # a print raised BrokenPipeError and the rank died without saving. SIGTERM to the top
    # `deepspeed` ends pdsh the same way, but also runs `pkill -f deepspeed.launcher.launch` on
    # every host, which would end any other DeepSpeed launch on this machine: so pdsh it is.
    (tmp_path / "loop.py").write_text(LOOP)
    log = tmp_path / "launcher.log"
    top = subprocess.Popen(_pdsh_launcher(tmp_path, "loop.py", str(tmp_path)), env=_pdsh_env(), cwd=tmp_path,
                           stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        procs = _loop_ranks(tmp_path, log, [(top, log)])
        assert [(tmp_path / f"env{r}").read_text().split()[1] for r in range(2)] == ["DS_ACCELERATOR=cpu"] * 2
        [pdsh] = [p for p in psutil.Process(top.pid).children() if p.cmdline()[0] == "pdsh"]
        pdsh.terminate()
        top.wait(timeout=60)
        assert _still_running(procs) == [], log.read_text()[-3000:]
    finally:
        _kill_tree(top)  # pdsh and ssh; then the ranks see their session gone
    step0, step1 = _stopped_steps(tmp_path)
    assert step0 is not None and step0 == step1, log.read_text()[-3000:]


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
@pytest.mark.parametrize("check_every", [1, 4])
def test_signal_on_one_rank_stops_both_at_the_same_step(tmp_path, check_every):
    # with check_every > 1 the ranks talk only at every check_every-th step, and still agree
    procs = _start_two_ranks(tmp_path, "--steps", "1000", "--step-s", "0.05", "--check-every", str(check_every))
    _wait_for(procs[0][1], "step 3\n", procs)
    pid1 = int(re.search(r"rank 1/2 pid (\d+)", procs[1][1].read_text()).group(1))
    os.kill(pid1, signal.SIGUSR1)
    (rc0, out0), (rc1, out1) = _finish(procs)
    assert (rc0, rc1) == (dist.REQUEUE_EXIT_CODE, dist.REQUEUE_EXIT_CODE), out0[-2000:] + out1[-2000:]
    step0 = re.search(r"rank 0: stopped at step (\d+)", out0).group(1)
    step1 = re.search(r"rank 1: stopped at step (\d+)", out1).group(1)
    assert step0 == step1 and int(step0) % check_every == 0
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
