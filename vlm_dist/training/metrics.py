"""Rank-0 training logs: a compact line per logged step, metrics.jsonl, TensorBoard, a loss PNG.

Every step is appended to `<output_dir>/metrics.jsonl` (step, loss, lr, grad_norm,
tokens_per_s, samples_per_s, ...); eval losses and notes (skipped steps) too, with a
`kind` field. TensorBoard gets the same scalars when it is installed. A run that starts at
step S (a resume) first drops the rows after S, which it is about to redo, so each step
appears once.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from vlm_dist.fileio import write_text_atomic


class MetricsLog:
    def __init__(self, out_dir: str | Path, enabled: bool, total_steps: int, start_step: int = 0):
        self.enabled, self.total_steps = enabled, total_steps
        self.out_dir = Path(out_dir)
        self.start = time.perf_counter()
        if enabled:
            truncate_metrics(self.out_dir / "metrics.jsonl", start_step)
        self._file = open(self.out_dir / "metrics.jsonl", "a") if enabled else None
        self._tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                # purge_step: TensorBoard hides the events after the resume step, which are redone
                self._tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError:  # tensorboard is optional
                self._tb = None
        self._first_step: int | None = None

    def _write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def step(self, step: int, *, loss: float, lr: float, grad_norm, tokens: int, samples: int,
             seconds: float) -> None:
        """A logged step: a line for people, a row in metrics.jsonl, TensorBoard scalars."""
        if not self.enabled:
            return
        if self._first_step is None:
            self._first_step, self.start = step, time.perf_counter() - seconds
        grad_norm = float(grad_norm) if grad_norm is not None else None
        row = {"kind": "train", "step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "tokens_per_s": tokens / seconds, "samples_per_s": samples / seconds, "tokens": tokens,
               "samples": samples, "seconds": seconds}   # totals since the previous logged step
        if torch.cuda.is_available():
            row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self._write(row)
        if self._tb is not None:
            for k in ("loss", "lr", "tokens_per_s", "samples_per_s"):
                self._tb.add_scalar(f"train/{k}", row[k], step)
        done = step - self._first_step + 1
        eta = (time.perf_counter() - self.start) / done * (self.total_steps - step)
        mem = f" | mem {row['peak_mem_gb']:.1f}GB" if "peak_mem_gb" in row else ""
        gn = f"{grad_norm:.3f}" if grad_norm is not None else "-"
        print(f"step {step}/{self.total_steps} | loss {loss:.4f} | lr {lr:.2e} | gnorm {gn} | "
              f"{row['tokens_per_s']:,.0f} tok/s | {row['samples_per_s']:.1f} samples/s | "
              f"eta {_hms(eta)}{mem}", flush=True)

    def eval(self, step: int, loss: float) -> None:
        if not self.enabled:
            return
        self._write({"kind": "eval", "step": step, "eval_loss": loss})
        if self._tb is not None:
            self._tb.add_scalar("eval/loss", loss, step)
        print(f"step {step} | eval loss {loss:.4f}", flush=True)

    def note(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        self._write({"kind": "note", "step": step, "note": text})
        print(f"step {step} | {text}", flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        # from the file, so a resumed run's curve includes the steps before the resume
        rows = [json.loads(line) for line in (self.out_dir / "metrics.jsonl").read_text().splitlines()]
        train = sorted({r["step"]: r["loss"] for r in rows if r["kind"] == "train"}.items())
        evals = sorted({r["step"]: r["eval_loss"] for r in rows if r["kind"] == "eval"}.items())
        if train:
            plot_losses(train, evals, self.out_dir / "loss.png")


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the rows of `path` up to `last_step` (atomic rewrite). A row cut short by a crash is
    always the last one, and after the checkpoint it resumes from: it goes too."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for n, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) - 1:
                break
            raise ValueError(f"{path}:{n + 1}: not a metrics row ({e})") from e
        if row["step"] <= last_step:
            kept.append(line)
    if len(kept) < len(lines):
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def plot_losses(train: list[tuple[int, float]], evals: list[tuple[int, float]], path: Path | None = None,
                ax=None, title: str | None = None) -> None:
    """Train (and held-out) loss against step: into `ax`, or a new figure saved at `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if title:
        ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    if fig is not None:
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
