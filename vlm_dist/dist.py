"""Everything about running on many processes: who am I, start the process group, stop together.

The one module that knows about distribution (model code never imports torch.distributed).

    env = init_distributed(timeout_s=600)      # any launcher: torchrun, deepspeed, srun, mpirun, plain python
    stop = Preemption()                         # SIGUSR1/SIGTERM -> flag; install it early (before, they kill)
    engine, optimizer, _, scheduler = ds_initialize(model, params, ds_config)
    for step in ...:
        train_step(...)
        if stop.should_stop():                  # every rank agrees at the same step
            save(...)                           # vlm_dist.training.loop.save
            exit_for_requeue()                  # exit code REQUEUE_EXIT_CODE: the sbatch script requeues
    shutdown()                                  # before Python exits, on every rank

Faults end the job instead of hanging it: every collective has a bounded timeout, NCCL
aborts the process on a timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING), the per-step check
is a gloo monitored barrier that names the ranks which did not arrive, and an optional
stall watchdog ends a rank that makes no step for `stall_timeout_s` (printing its stack). Under the
`deepspeed` launcher a rank whose launcher is gone stops as on SIGTERM (watch_deepspeed_launcher).

Self-test on any cluster (all-reduce across all ranks; exits 0 when it adds up):

    srun -n 2 python -m vlm_dist.dist --selftest
    torchrun --nproc-per-node 2 -m vlm_dist.dist --selftest
    mpirun -n 2 python -m vlm_dist.dist --selftest
    deepspeed --num_gpus 2 --module vlm_dist.dist --selftest
    deepspeed --hostfile hostfile --launcher pdsh --master_addr HOST0 --module vlm_dist.dist --selftest
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist

from vlm_dist.errors import UserError

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped on a signal after saving a checkpoint, run me again"
STALL_EXIT_CODE = 86    # the stall watchdog ended this rank
DEFAULT_PORT = 29500


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as found in the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int          # index of this process on its node (= its GPU)
    local_world_size: int    # processes on this node
    node_rank: int
    master_addr: str         # rendezvous host (rank 0's node)
    master_port: int
    launcher: str            # torchrun | deepspeed | slurm | mpi | single


class DistError(UserError, RuntimeError):
    """A launcher environment that cannot be used, or a rank that did not show up."""


# ----------------------------------------------------------------------------- discovery

def _int(env: dict, key: str) -> int:
    try:
        return int(env[key])
    except ValueError as e:
        raise DistError(f"environment variable {key}={env[key]!r} is not an integer") from e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _slurm_tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """SLURM_STEP_TASKS_PER_NODE like '8(x2),4' -> tasks on node `node_id`."""
    counts: list[int] = []
    for part in tasks_per_node.split(","):
        n, _, rep = part.partition("(x")
        counts += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    return counts[node_id]


def _first_slurm_host(nodelist: str) -> str:
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0 or not out.stdout.split():
        raise DistError(f"`scontrol show hostnames {nodelist}` failed: {out.stderr.strip()}")
    return out.stdout.split()[0]


def _from_torch_launcher(env: dict) -> DistEnv:
    rank, world = _int(env, "RANK"), _int(env, "WORLD_SIZE")
    local_size = int(env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or world)
    if world > 1 and "MASTER_ADDR" not in env:
        raise DistError(f"RANK/WORLD_SIZE are set (rank {rank} of {world}) but MASTER_ADDR is not")
    return DistEnv(
        rank=rank, world_size=world, local_rank=int(env.get("LOCAL_RANK", 0)),
        local_world_size=local_size,
        node_rank=int(env.get("GROUP_RANK") or env.get("NODE_RANK") or rank // local_size),
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env.get("MASTER_PORT", DEFAULT_PORT)),
        launcher="torchrun" if "TORCHELASTIC_RUN_ID" in env else "deepspeed")


def _from_slurm(env: dict) -> DistEnv:
    node_id = _int(env, "SLURM_NODEID")
    world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    local = _slurm_tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env["SLURM_TASKS_PER_NODE"], node_id)
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    addr = env.get("MASTER_ADDR") or _first_slurm_host(nodelist)
    # a port from the job id keeps two jobs that share a first node apart
    port = int(env.get("MASTER_PORT") or 20000 + _int(env, "SLURM_JOB_ID") % 20000)
    return DistEnv(rank=_int(env, "SLURM_PROCID"), world_size=world, local_rank=_int(env, "SLURM_LOCALID"),
                   local_world_size=local, node_rank=node_id, master_addr=addr, master_port=port,
                   launcher="slurm")


def _from_mpi(env: dict) -> DistEnv:
    if "OMPI_COMM_WORLD_SIZE" in env:  # Open MPI
        rank, world = _int(env, "OMPI_COMM_WORLD_RANK"), _int(env, "OMPI_COMM_WORLD_SIZE")
        local, local_size = _int(env, "OMPI_COMM_WORLD_LOCAL_RANK"), _int(env, "OMPI_COMM_WORLD_LOCAL_SIZE")
    else:  # MPICH / Intel MPI (hydra)
        rank, world = _int(env, "PMI_RANK"), _int(env, "PMI_SIZE")
        local = int(env.get("MPI_LOCALRANKID", env.get("SLURM_LOCALID", rank)))
        local_size = int(env.get("MPI_LOCALNRANKS", world))
    node_rank = int(env.get("OMPI_COMM_WORLD_NODE_RANK", rank // local_size))
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if addr is None or port is None:
        try:
            from mpi4py import MPI
        except ImportError as e:
            if local_size != world and addr is None:
                raise DistError("mpirun across nodes needs MASTER_ADDR or mpi4py "
                                "(pip install mpi4py) to find rank 0's host") from e
            addr, port = addr or "127.0.0.1", port or DEFAULT_PORT
        else:  # rank 0 names its host and a free port; everyone agrees through MPI
            mine = (socket.gethostname(), _free_port()) if rank == 0 else None
            host0, port0 = MPI.COMM_WORLD.bcast(mine, root=0)
            addr, port = addr or host0, port or port0
    return DistEnv(rank=rank, world_size=world, local_rank=local, local_world_size=local_size,
                   node_rank=node_rank, master_addr=addr, master_port=int(port), launcher="mpi")


def discover(env: dict | None = None) -> DistEnv:
    """Read rank/world/rendezvous from whichever launcher started this process.

    Precedence: torchrun/deepspeed (RANK, WORLD_SIZE) > mpirun (OMPI_COMM_WORLD_*, PMI_*)
    > srun step (SLURM_PROCID inside a step) > a single process. MPI wins over Slurm because
    mpirun inside an sbatch script inherits the batch shell's SLURM_PROCID=0.
    """
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return _from_torch_launcher(env)
    if "OMPI_COMM_WORLD_SIZE" in env or "PMI_SIZE" in env:
        return _from_mpi(env)
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # the batch shell has SLURM_PROCID but no step
        return _from_slurm(env)
    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                   master_addr="127.0.0.1", master_port=int(env.get("MASTER_PORT") or _free_port()),
                   launcher="single")


# ----------------------------------------------------------------------------- process group

_MONITOR: tdist.ProcessGroup | None = None  # gloo group for CPU-side checks (= WORLD on gloo)
_TIMEOUT_S: float = 600.0
_ENV: DistEnv | None = None  # what init_distributed found; a second call returns it


def init_distributed(timeout_s: float = 600.0, backend: str | None = None) -> DistEnv:
    """Start torch.distributed through DeepSpeed: nccl on CUDA, gloo on CPU.

    Exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT so DeepSpeed and torch agree.
    Every collective gives up after `timeout_s`, so a dead or hung rank ends the job.
    """
    global _MONITOR, _TIMEOUT_S, _ENV
    import deepspeed

    if _ENV is not None and tdist.is_initialized():
        return _ENV
    env = discover()
    if env.launcher == "deepspeed":
        watch_deepspeed_launcher()
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(env.local_world_size), MASTER_ADDR=env.master_addr,
                      MASTER_PORT=str(env.master_port))
    from deepspeed.accelerator import get_accelerator

    # follow DeepSpeed's accelerator, so DS_ACCELERATOR=cpu on a GPU machine means gloo too
    backend = backend or ("nccl" if get_accelerator().device_name() == "cuda" else "gloo")
    if backend == "nccl":
        # local_rank indexes the node's GPUs; with one GPU visible per task (--gpus-per-task=1) it is 0
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        # a timed-out NCCL collective aborts the process (logging "[Rank r] Watchdog caught
        # collective operation timeout") instead of leaving it blocked on the GPU
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    _TIMEOUT_S = timeout_s
    # dist_backend is passed explicitly: on CPU DeepSpeed would pick "ccl" if oneCCL is installed
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=timedelta(seconds=timeout_s))
    got = tdist.get_backend()
    if got != backend:
        raise DistError(f"asked DeepSpeed for backend {backend!r}, torch.distributed runs {got!r}")
    _MONITOR = (tdist.group.WORLD if backend == "gloo"
                else tdist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s)))
    _ENV = env
    return env


def rank() -> int:
    return tdist.get_rank() if tdist.is_initialized() else int(os.environ.get("RANK", 0))


def world_size() -> int:
    return tdist.get_world_size() if tdist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only, flushed (logs from many ranks are for machines, not people)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def _all_reduce(x, op):
    if not tdist.is_initialized():
        return x
    if isinstance(x, torch.Tensor):  # in place on the training backend (GPU tensors on nccl)
        tdist.all_reduce(x, op=op)
        return x
    t = torch.tensor([x], dtype=torch.float64)  # a python number: CPU, gloo, no GPU sync
    tdist.all_reduce(t, op=op, group=_MONITOR)
    return type(x)(t.item())


def all_reduce_max(x):
    """Max over ranks of a python number (returned as the same type) or a tensor (in place)."""
    return _all_reduce(x, tdist.ReduceOp.MAX)


def all_reduce_sum(x):
    """Sum over ranks of a python number (returned as the same type) or a tensor (in place)."""
    return _all_reduce(x, tdist.ReduceOp.SUM)


def compute_on_rank0(fn):
    """fn() on rank 0 only, its result (or its exception) handed to every rank.

    For start-up work every rank needs but one can do (e.g. loading an encoder to
    fingerprint it); an error is raised on every rank, so none waits forever.
    """
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return fn()
    box = [None]
    if tdist.get_rank() == 0:
        try:
            box[0] = (fn(), None)
        except Exception as e:               # re-raised on every rank below
            box[0] = (None, e)
    tdist.broadcast_object_list(box, src=0, group=_MONITOR)   # gloo: CPU pickles, no GPU sync
    value, error = box[0]
    if error is not None:
        raise error
    return value


def ds_initialize(model, model_parameters, config: dict | str, **kwargs):
    """deepspeed.initialize after init_distributed; returns its (engine, optimizer, dataloader, scheduler)."""
    import deepspeed

    if not tdist.is_initialized():
        raise DistError("call vlm_dist.dist.init_distributed() before ds_initialize()")
    return deepspeed.initialize(model=model, model_parameters=model_parameters, config=config,
                                dist_init_required=False, **kwargs)


def shutdown() -> None:
    """Tear the process groups down before Python exits.

    The group objects must be gone before interpreter finalization: a gloo group destroyed
    then can abort the process ("terminate called without an active exception"), turning a
    clean exit into SIGABRT. So drop our reference, let DeepSpeed drop its own, and collect.
    """
    global _MONITOR, _ENV
    _MONITOR, _ENV = None, None
    if tdist.is_initialized():
        import deepspeed.comm

        deepspeed.comm.destroy_process_group()
    gc.collect()


def exit_for_requeue() -> None:
    """After the checkpoint is saved: wait for every rank, then exit with REQUEUE_EXIT_CODE.

    SIGTERM/SIGUSR1 are ignored from here on: once one rank has exited, srun/torchrun send
    SIGTERM to the others, and that must not turn their exit code 75 into "Terminated"
    (Python restores the default handlers while it shuts down; it leaves SIG_IGN alone).
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    barrier()
    print0(f"preempted: checkpoint saved, exiting with {REQUEUE_EXIT_CODE} so the job is requeued")
    shutdown()
    sys.exit(REQUEUE_EXIT_CODE)


# ----------------------------------------------------------------------------- faults

def watch_deepspeed_launcher() -> None:
    """Under the `deepspeed` launcher, a rank whose launcher is gone sends itself SIGTERM (-> save, exit).

    The chain is `deepspeed` (runner.py) -> launch.py -> ranks; with pdsh, runner.py -> pdsh -> ssh
    -> sshd -> launch.py -> ranks. On one node runner.py has no signal handler: SIGTERM to it (kill,
    a scheduler or container stopping the job) ends it alone, and launch.py, reparented, keeps the
    ranks training with the GPUs held. PR_SET_PDEATHSIG cannot see that (it fires when a rank's own
    parent, launch.py, dies), so a thread watches both links: this rank's parent is still launch.py
    and launch.py's parent is still the process that started it. Under pdsh the ranks print into the
    ssh session: once it is gone a print raises BrokenPipeError, so an output whose reader is gone is
    pointed at /dev/null (nobody can read it) and also means the launcher is gone. Then SIGTERM goes
    to this rank: Preemption agrees on a step, the checkpoint is saved, the rank exits (before
    Preemption is installed SIGTERM just ends it). torchrun, srun and mpirun forward signals to their
    ranks themselves; ranks not started by launch.py (by hand, by tests) are not watched.
    """
    import psutil

    launch = psutil.Process().parent()
    if launch is None or "deepspeed.launcher.launch" not in launch.cmdline():
        return
    threading.Thread(target=_launcher_watch, args=(launch, launch.ppid()), daemon=True,
                     name="launcher-watch").start()


def _launcher_watch(launch, starter_pid: int) -> None:
    import psutil

    outputs = select.poll()
    for fd in (1, 2):
        outputs.register(fd, 0)  # 0: only POLLERR/POLLHUP/POLLNVAL, i.e. the reader is gone
    gone = False
    while True:  # until the process ends: stdout and stderr may close a moment apart
        why = None
        for fd, events in outputs.poll(1000):  # also the 1 s tick of the parent checks
            outputs.unregister(fd)
            if events & select.POLLNVAL:  # started with this fd closed: nothing to watch
                continue
            with open(os.devnull, "wb") as null:
                os.dup2(null.fileno(), fd)
            why = f"its {'stdout' if fd == 1 else 'stderr'} was closed by the reader"
        try:
            if os.getppid() != launch.pid or launch.ppid() != starter_pid:
                why = f"launch.py (pid {launch.pid}) or the process that started it exited"
        except psutil.NoSuchProcess:
            why = f"launch.py (pid {launch.pid}) exited"
        if why and not gone:
            gone = True
            os.kill(os.getpid(), signal.SIGTERM)  # before the print: an output closing now must not stop it
            print(f"rank {rank()}: the deepspeed launcher is gone ({why}); stopping as on SIGTERM",
                  file=sys.stderr, flush=True)


class Preemption:
    """SIGUSR1/SIGTERM set a flag; should_stop() makes all ranks agree at a step boundary.

    The ranks talk at every `check_every`-th should_stop() call only: a gloo monitored barrier
    (the health check, naming the ranks which did not reach it within the collective timeout)
    and an all-reduce of the flag. Both are CPU collectives that hold every rank's host until the
    slowest arrives, so a check per step would make the host stop queueing GPU work each step.
    A signal is acted on within check_every steps: at 10 steps of a few seconds, well inside
    Slurm's `--signal=B:USR1@600` warning (the save must fit in what is left). Between checks a
    hung rank still ends the job: the others block in the step's own collectives (gradient
    reduction), which fail after the collective timeout, only without naming the rank; the next
    check names it when the others are not already stuck in one. With stall_timeout_s, a rank
    that goes that long between two should_stop() calls (a checkpoint save counts) prints its
    stack and exits with STALL_EXIT_CODE; that watch runs on every call, not only on checks.
    """

    def __init__(self, signals=(signal.SIGUSR1, signal.SIGTERM), stall_timeout_s: float | None = None,
                 check_every: int = 1):
        if check_every < 1:
            raise ValueError(f"Preemption: check_every must be >= 1, got {check_every}")
        self.signal_name: str | None = None
        self.stall_timeout_s = stall_timeout_s
        self.check_every = check_every
        self._beat = threading.Event()
        self._checks = 0
        for s in signals:
            signal.signal(s, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name
        print(f"rank {rank()}: got {self.signal_name}, will stop at the next step boundary", flush=True)

    def should_stop(self) -> bool:
        """True on every rank, at the same call, once any rank got a signal (at the next call that
        is a multiple of check_every). Call it on all ranks, once per step."""
        self._checks += 1
        if self.stall_timeout_s and self._checks == 1:
            threading.Thread(target=self._watch, daemon=True, name="stall-watchdog").start()
        self._beat.set()
        if not tdist.is_initialized() or world_size() == 1:
            return self.signal_name is not None
        if self._checks % self.check_every:
            return False
        try:
            tdist.monitored_barrier(group=_MONITOR, timeout=timedelta(seconds=_TIMEOUT_S), wait_all_ranks=True)
            flag = torch.tensor([int(self.signal_name is not None)])
            tdist.all_reduce(flag, op=tdist.ReduceOp.MAX, group=_MONITOR)
        except RuntimeError as e:  # DistBackendError: timeout or a peer's connection closed
            raise DistError(f"rank {rank()}: step check {self._checks} failed within {_TIMEOUT_S:g}s: a rank "
                            f"crashed or hung (see its log, and rank 0's monitoredBarrier line): {e}") from e
        if flag.item():
            flags = [None] * world_size()
            tdist.all_gather_object(flags, self.signal_name, group=_MONITOR)
            print0(f"stopping at step check {self._checks}: signal on "
                   + ", ".join(f"rank {r} ({s})" for r, s in enumerate(flags) if s))
        return bool(flag.item())

    def _watch(self) -> None:
        while self._beat.wait(self.stall_timeout_s):
            self._beat.clear()
        print(f"rank {rank()}: no step for {self.stall_timeout_s:g}s after step check {self._checks}; "
              f"stack follows, exiting with {STALL_EXIT_CODE}", file=sys.stderr, flush=True)
        faulthandler.dump_traceback(all_threads=True)
        os._exit(STALL_EXIT_CODE)


# ----------------------------------------------------------------------------- self-test

def _selftest(args: argparse.Namespace) -> int:
    env = init_distributed(timeout_s=args.timeout_s)
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else "cpu"
    total = all_reduce_sum(torch.tensor([float(env.rank + 1)], device=device)).item()
    want = env.world_size * (env.world_size + 1) / 2
    print(f"rank {env.rank}/{env.world_size} pid {os.getpid()} local {env.local_rank}/{env.local_world_size} "
          f"node {env.node_rank} host {socket.gethostname()} launcher {env.launcher} backend {tdist.get_backend()}",
          flush=True)
    if total != want:
        raise DistError(f"rank {env.rank}: all-reduce sum {total} != {want}")
    stop = Preemption(stall_timeout_s=args.stall_timeout_s, check_every=args.check_every)
    for step in range(1, args.steps + 1):
        if env.rank == args.hang_rank and step == args.fault_step:
            print(f"rank {env.rank}: hanging at step {step} (--hang-rank)", flush=True)
            time.sleep(10**6)
        if env.rank == args.crash_rank and step == args.fault_step:
            raise RuntimeError(f"rank {env.rank}: crashing at step {step} (--crash-rank)")
        time.sleep(args.step_s)
        if stop.should_stop():
            print(f"rank {env.rank}: stopped at step {step}", flush=True)
            exit_for_requeue()
        print0(f"step {step}")
    print0(f"selftest ok: world_size={env.world_size} backend={tdist.get_backend()} "
           f"launcher={env.launcher} sum={total:g}")
    shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Distributed self-test: all-reduce, then a step loop with "
                                "preemption checks (and optional injected faults for tests).")
    p.add_argument("--selftest", action="store_true", required=True)
    p.add_argument("--timeout-s", type=float, default=60.0, help="collective timeout")
    p.add_argument("--steps", type=int, default=0, help="step loop length after the all-reduce")
    p.add_argument("--step-s", type=float, default=0.1, help="seconds of fake work per step")
    p.add_argument("--stall-timeout-s", type=float, default=None)
    p.add_argument("--check-every", type=int, default=1, help="steps between the ranks' preemption checks")
    p.add_argument("--hang-rank", type=int, default=-1, help="this rank sleeps forever at --fault-step")
    p.add_argument("--crash-rank", type=int, default=-1, help="this rank raises at --fault-step")
    p.add_argument("--fault-step", type=int, default=2)
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher's
    return _selftest(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
