"""One family for the mistakes a user can fix, and how every command reports them.

Every error whose message names the user's file, line, record, key, shard or flag
derives from `UserError` (ConfigError, RecordError, CacheError, CheckpointError,
ExportError, ...). Entry points run their body through `run_cli`: a UserError is
printed as one line, without a traceback, by rank 0 only (every rank usually hits
the same mistake), and the process exits with USER_ERROR_EXIT. An error that only
one rank can see (its own state file) sets `rank_local = True` and is printed by
that rank too. Anything else is a bug in this code: its traceback is kept.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

USER_ERROR_EXIT = 2


class UserError(Exception):
    """A problem with the user's input or command line; the message says which and what to do."""

    rank_local = False
    """True when only the raising rank can see the problem, so that rank reports it too."""


def _rank() -> int:
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank()
    for key in ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def report(prog: str, err: UserError) -> None:
    """Print `prog: error: message` once (rank 0, or the raising rank for rank-local errors)."""
    rank = _rank()
    if rank == 0 or err.rank_local:
        where = f" (rank {rank})" if rank else ""
        print(f"{prog}: error{where}: {err}", file=sys.stderr, flush=True)


def run_cli(prog: str, main: Callable[[], int | None]) -> int:
    """Run an entry point's body; a UserError becomes one line on stderr and exit code 2."""
    try:
        return int(main() or 0)
    except UserError as e:
        report(prog, e)
        return USER_ERROR_EXIT
