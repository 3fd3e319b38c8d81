"""The one-shot GPU check: a matrix of benchmark and correctness runs, each in its own process with
its own timeout, written as one JSON under benchmarks/ and printed as a Markdown table.

    make gpu-check                                          # on one H100, ~8 minutes, wheels from .whl/
    python launch/gpu_check.py --wheels .whl --out benchmarks
    python launch/gpu_check.py --tiny --out /tmp/check      # the CPU pipeline check (tests run it)

A row is a command line of vlm_dist.benchmark.cli (train or cache), vlm_dist.benchmark.correctness
(packed rows against each sample alone) or vlm_dist.benchmark.learning (memorise a small set, reload
the export) plus the run config's own flags: the attention backend and
the fused kernels are `--model.attn_implementation=...` / `--model.kernels=...` values, so a new
backend is a new row, and a value the config rejects is recorded as "failed: <its message>" while the
other rows run on. A row that needs a package the machine lacks (bitsandbytes for QLoRA, liger-kernel
for fused kernels) is recorded as skipped, naming it. Rows still waiting when the total budget is
spent are recorded as skipped too, so a slow row never costs the report.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlm_dist.config import REPO_ROOT

STAGE1 = str(REPO_ROOT / "launch" / "configs" / "stage1_align.yaml")
STAGE3 = str(REPO_ROOT / "launch" / "configs" / "stage3_multi.yaml")
# the packages a GPU image may lack, by import name -> distribution name (for versions and skips)
OPTIONAL = {"deepspeed": "deepspeed", "bitsandbytes": "bitsandbytes", "liger_kernel": "liger-kernel"}


@dataclass(frozen=True)
class Row:
    """One run of the matrix."""
    name: str
    kind: str                  # "train" | "cache" (vlm_dist.benchmark.cli), "correctness" or "learning"
    stage: int | None          # 1: frozen LLM, connector only; 3: adapters on the LLM
    llm_mode: str | None
    attention: str | None      # --model.attn_implementation; None: the stage config's own
    kernels: str | None        # --model.kernels; None: the config's default (no flag passed)
    flags: tuple[str, ...] = ()
    timeout_s: float = 120.0
    needs: tuple[str, ...] = ()   # import names the run cannot do without

    def command(self, tiny: bool, work_dir: Path, out: Path) -> list[str]:
        module = {"correctness": "vlm_dist.benchmark.correctness",
                  "learning": "vlm_dist.benchmark.learning"}.get(self.kind, "vlm_dist.benchmark.cli")
        cmd = [sys.executable, "-m", module, "--work-dir", str(work_dir), "--out", str(out), "--name", self.name]
        if self.kind == "cache":
            cmd += ["--mode", "cache"]
        if tiny:
            cmd += ["--tiny"]
        if self.attention is not None:
            cmd += [f"--model.attn_implementation={self.attention}"]
        if self.kernels is not None:
            cmd += [f"--model.kernels={self.kernels}"]
        return cmd + list(self.flags)


def gpu_matrix(attentions: tuple[str, ...], kernels: tuple[str | None, ...], timeout_s: float) -> list[Row]:
    """What one H100 runs in ~8 minutes: stage 1 for each attention backend with and without fused
    kernels, stage-3 LoRA and QLoRA, a tiled and a video workload, the cache builder, and packed-vs-alone for each backend (kernels
    on). Short timed windows (5 steps after 2): a check that each configuration runs and what it
    roughly costs; BENCHMARKS.md's headline figures come from longer runs of the same commands."""
    short = ("--steps", "5", "--warmup", "2")
    rows = []
    for attn in attentions:
        for k in kernels:
            rows.append(Row(f"stage1 {attn} kernels={k or 'default'}", "train", 1, "frozen", attn, k,
                            ("--config", STAGE1) + short, timeout_s, ("deepspeed",) + _kernel_needs(k)))
    for mode, needs in (("lora", ()), ("qlora", ("bitsandbytes",))):
        rows.append(Row(f"stage3 {mode}", "train", 3, mode, None, None,
                        ("--config", STAGE3, f"--model.llm_mode={mode}", "--model.init_from=null") + short,
                        timeout_s, ("deepspeed",) + needs))
    # AnyRes (one image on a 2x2 grid: 5 views) and video (8 frames of 16 tokens): the connector runs per view
    rows.append(Row("stage1 tiled 2x2", "train", 1, "frozen", None, None,
                    ("--config", STAGE1, "--lengths", "tiled") + short, timeout_s, ("deepspeed",)))
    rows.append(Row("stage1 video 8 frames", "train", 1, "frozen", None, None,
                    ("--config", STAGE1, "--lengths", "video", "--model.video.num_frames=8",
                     "--model.video.tokens_per_frame=16") + short, timeout_s, ("deepspeed",)))
    rows.append(Row("cache builder", "cache", None, None, None, None, ("--engine", "torch") + short, timeout_s))
    # full size, kernels on: Qwen3-8B's real heads (GQA, head_dim 128) through each backend
    on = next((k for k in kernels if k not in (None, "none")), None)
    for attn in attentions:
        rows.append(Row(f"packed = alone {attn} kernels={on or 'default'}", "correctness", 1, "frozen", attn, on,
                        ("--config", STAGE1, "--engine", "torch"), timeout_s, _kernel_needs(on)))
    # does the real size learn: LoRA r=128 memorises 8 samples (loss / 5 in <= 60 steps) and its export
    # reloads to the same loss; stage 1's connector alone moves the loss too (/ 2)
    rows.append(Row("learning stage3 lora", "learning", 3, "lora", None, None,
                    ("--config", STAGE3, "--model.llm_mode=lora", "--model.init_from=null", "--steps", "60"),
                    timeout_s, ("deepspeed",)))
    rows.append(Row("learning stage1", "learning", 1, "frozen", None, None,
                    ("--config", STAGE1, "--steps", "60"), timeout_s, ("deepspeed",)))
    return rows


def tiny_matrix(timeout_s: float) -> list[Row]:
    """The CPU rehearsal of the same runner: one row of each kind, and one row the config rejects."""
    one = ("--steps", "1", "--warmup", "0", "--data.max_seq_len=256", "--train.micro_batch_size=2")
    return [
        Row("stage1 sdpa", "train", 1, "frozen", "sdpa", None, ("--config", STAGE1, "--engine", "torch") + one,
            timeout_s),
        Row("stage3 lora", "train", 3, "lora", "sdpa", None,
            ("--config", STAGE3, "--engine", "torch", "--model.llm_mode=lora", "--model.init_from=null",
             "--lora.r=4", "--lengths", "stage1") + one, timeout_s),
        Row("cache builder", "cache", None, None, None, None, ("--engine", "torch", "--steps", "1", "--warmup", "0",
                                                              "--cache-batch", "2"), timeout_s),
        Row("packed = alone sdpa", "correctness", 1, "frozen", "sdpa", None, ("--config", STAGE1, "--engine", "torch"),
            timeout_s),
        # tiny LoRA cannot memorise (its frozen 64-wide lm_head caps the logits near 1.3; Qwen3-8B's allows ~80):
        # here the row checks the loop and the export reload; full fine-tuning shows the loop learns
        Row("learning lora", "learning", 3, "lora", "sdpa", None,
            ("--config", STAGE3, "--model.llm_mode=lora", "--model.init_from=null", "--lora.r=4", "--lengths",
             "stage1", "--samples", "4", "--steps", "3", "--target-ratio", "1.001"), timeout_s),
        Row("stage1 no-such-attention", "train", 1, "frozen", "no_such_attention", None,
            ("--config", STAGE1, "--engine", "torch") + one, timeout_s),
    ]


def _kernel_needs(kernels: str | None) -> tuple[str, ...]:
    return ("liger_kernel",) if kernels == "liger" else ()


# ----------------------------------------------------------------------------- running

@dataclass
class Entry:
    """One row's outcome in the report."""
    name: str
    kind: str
    stage: int | None
    llm_mode: str | None
    attention: str | None
    kernels: str | None
    status: str                               # "ok", "failed: <message>" or "skipped: <why>"
    wall_s: float = 0.0
    tokens_per_s_per_gpu: float | None = None
    mfu: float | None = None                  # against the data-sheet peak
    mfu_measured: float | None = None         # against the bf16 matmul peak measured in the same process
    peak_memory_gb: float | None = None
    loader_stall_pct: float | None = None
    packing_efficiency: float | None = None
    images_per_s: float | None = None         # cache builder
    loss_rel_err: float | None = None         # packed vs alone
    grad_rel_err: float | None = None
    loss_ratio: float | None = None           # learning: first loss / last loss
    steps_to_target: int | None = None
    command: str = ""
    log_tail: str = ""                        # the end of a failed run's output
    report: dict = field(default_factory=dict)   # the run's own JSON, whole


def failure_message(output: str) -> str:
    """The line that says what went wrong: the last exception or error line, else the last line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) or head == "error" or ln.startswith("error:"):
            return ln[:500]
    return lines[-1][:500] if lines else "no output"


def run_row(row: Row, tiny: bool, work_dir: Path, env: dict, timeout_s: float) -> Entry:
    rows_dir = work_dir / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    out, log = rows_dir / f"{_slug(row.name)}.json", rows_dir / f"{_slug(row.name)}.log"
    out.unlink(missing_ok=True)                  # a report left by an earlier check is not this run's
    cmd = row.command(tiny, work_dir, out)
    entry = Entry(row.name, row.kind, row.stage, row.llm_mode, row.attention, row.kernels, "ok",
                  command=" ".join(cmd[1:]))
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        output = proc.stdout + proc.stderr
        rc = proc.returncode
    except subprocess.TimeoutExpired as e:
        output = _text(e.stdout) + _text(e.stderr)
        rc = None
    entry.wall_s = time.perf_counter() - start
    log.write_text(output)
    if rc is None:
        entry.status = f"failed: timed out after {timeout_s:.0f} s"
    elif rc != 0 or not out.exists():
        entry.status = f"failed: {failure_message(output)}"
    if entry.status != "ok":
        entry.log_tail = output[-3000:]
    if out.exists():
        report = json.loads(out.read_text())
        entry.report = report
        for key in ("tokens_per_s_per_gpu", "mfu", "mfu_measured", "peak_memory_gb", "loader_stall_pct",
                    "packing_efficiency", "images_per_s", "loss_rel_err", "grad_rel_err", "loss_ratio",
                    "steps_to_target"):
            setattr(entry, key, report.get(key))
        if report.get("reload"):
            entry.loss_rel_err = report["reload"]["rel_err"]
    return entry


def _text(x) -> str:
    return x.decode(errors="replace") if isinstance(x, bytes) else (x or "")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def install_wheels(wheels: Path, target: Path) -> list[str]:
    """pip-install every wheel in `wheels` into `target` (no index, no dependencies: the machine has
    no network and its own torch). Returns the wheel names; an install that fails is an error."""
    found = sorted(wheels.glob("*.whl"))
    if not found:
        return []
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, found)], check=True)
    return [w.name for w in found]


def probe(env: dict, modules: dict[str, str]) -> dict:
    """GPU name, versions and which of `modules` (import name -> distribution) import, as the rows'
    processes will see them."""
    code = ("import importlib, importlib.metadata as md, json, torch, transformers\n"
            "def version(mod, dist):\n"
            "    try:\n"
            "        importlib.import_module(mod)\n"
            "    except Exception as e:\n"
            "        return None, f'{type(e).__name__}: {e}'.splitlines()[0][:300]\n"
            "    try:\n"
            "        return md.version(dist), None\n"
            "    except md.PackageNotFoundError:\n"
            "        return 'unknown', None\n"
            f"optional = {modules!r}\n"
            "found = {m: version(m, d) for m, d in optional.items()}\n"
            "print(json.dumps(dict(gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,\n"
            "    torch=torch.__version__, cuda=torch.version.cuda, transformers=transformers.__version__,\n"
            "    packages={m: v for m, (v, _) in found.items()}, missing={m: e for m, (_, e) in found.items() if e})))\n")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_matrix(rows: list[Row], out_dir: Path, *, tiny: bool, work_dir: Path, budget_s: float,
               wheels: Path | None = None) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    installed = []
    if wheels is not None:
        site = work_dir / "site"
        installed = install_wheels(wheels, site)
        if installed:
            env["PYTHONPATH"] = os.pathsep.join([str(site)] + [p for p in [env.get("PYTHONPATH")] if p])
    # the rows import vlm_dist from this checkout, whatever an editable install points at
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    machine = probe(env, {**OPTIONAL, **{m: m for r in rows for m in r.needs if m not in OPTIONAL}})
    deadline = time.monotonic() + budget_s
    entries = []
    for row in rows:
        left = deadline - time.monotonic()
        missing = [m for m in row.needs if m in machine["missing"]]
        if missing:
            entry = Entry(row.name, row.kind, row.stage, row.llm_mode, row.attention, row.kernels,
                          f"skipped: {', '.join(missing)} not installed ({machine['missing'][missing[0]]})")
        elif left < min(row.timeout_s, 30):
            entry = Entry(row.name, row.kind, row.stage, row.llm_mode, row.attention, row.kernels,
                          f"skipped: the check's {budget_s:.0f} s budget was spent")
        else:
            entry = run_row(row, tiny, work_dir, env, min(row.timeout_s, left))
        entries.append(entry)
        print(f"[{len(entries)}/{len(rows)}] {row.name}: {entry.status} ({entry.wall_s:.0f} s)", flush=True)
    report = dict(gpu=machine["gpu"], date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  tiny=tiny, versions=dict(torch=machine["torch"], cuda=machine["cuda"],
                                           transformers=machine["transformers"],
                                           **{d: machine["packages"][m] for m, d in OPTIONAL.items()}),
                  wheels_installed=installed, budget_s=budget_s, runs=[asdict(e) for e in entries])
    stamp = report["date"].replace(":", "").replace("+0000", "Z")
    path = out_dir / f"gpu_check-{'tiny-' if tiny else ''}{stamp}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    report["path"] = str(path)
    return report


def markdown(report: dict) -> str:
    """The table for BENCHMARKS.md: one line per run, its hardware and date in the heading."""
    def f(v, spec):
        return "-" if v is None else format(v, spec)
    head = (f"GPU check on {report['gpu'] or 'CPU (tiny models: a pipeline check, not a measurement)'}, "
            f"{report['date']}; torch {report['versions']['torch']}, transformers {report['versions']['transformers']}, "
            f"deepspeed {report['versions'].get('deepspeed') or '-'}\n\n")
    lines = ["| run | stage | LLM | attention | kernels | status | tokens/s/GPU | MFU (spec) | MFU (measured) "
             "| peak GB | stall % | packing | other |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["runs"]:
        other = (f"{r['images_per_s']:,.1f} images/s" if r["images_per_s"] is not None else
                 f"loss x{1 / r['loss_ratio']:.3g} (target reached at step {r['steps_to_target']})"
                 + (f", export reload rel {r['loss_rel_err']:.1e}" if r["loss_rel_err"] is not None else "")
                 if r.get("loss_ratio") is not None else
                 f"loss rel {r['loss_rel_err']:.1e}, grad rel {r['grad_rel_err']:.1e}"
                 if r["loss_rel_err"] is not None else "")
        lines.append(f"| {r['name']} | {f(r['stage'], 'd')} | {r['llm_mode'] or '-'} | {'-' if r['kind'] == 'cache' else r['attention'] or 'config'} "
                     f"| {r['kernels'] or 'default'} | {r['status'].replace('|', '/')} "
                     f"| {f(r['tokens_per_s_per_gpu'], ',.0f')} | {f(r['mfu'], '.3f')} | {f(r['mfu_measured'], '.3f')} "
                     f"| {f(r['peak_memory_gb'], '.1f')} | {f(r['loader_stall_pct'], '.1f')} "
                     f"| {f(r['packing_efficiency'], '.3f')} | {other} |")
    return head + "\n".join(lines)


def parse_args(argv: list[str]):
    ap = argparse.ArgumentParser(description="Run the GPU check's matrix (or, --tiny, its CPU rehearsal).")
    ap.add_argument("--out", default=str(REPO_ROOT / "benchmarks"), help="folder for the report (one JSON file)")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU: the runner's own check")
    ap.add_argument("--work-dir", default=os.path.expanduser("~/.cache/vlm_dist/gpu_check"),
                    help="model configs, the vision tower's weights, the wheels' install target, each run's JSON and log")
    ap.add_argument("--wheels", default=None, help="install every *.whl here first (see launch/gpu_wheels.sh)")
    ap.add_argument("--budget", type=float, default=None, help="seconds for the whole matrix (default 480; tiny 600)")
    ap.add_argument("--row-timeout", type=float, default=None, help="seconds per row (default 120; tiny 300)")
    ap.add_argument("--attention", default="sdpa,varlen,flex_attention",
                    help="comma-separated --model.attn_implementation values, one stage-1 row each")
    ap.add_argument("--kernels", default="none,liger",
                    help="comma-separated --model.kernels values per attention; 'default' passes no flag")
    ap.add_argument("--only", default=None, help="run only rows whose name contains this text")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    work = Path(args.work_dir)
    timeout = args.row_timeout or (300.0 if args.tiny else 120.0)
    if args.tiny:
        rows = tiny_matrix(timeout)
    else:
        kernels = tuple(None if k == "default" else k for k in args.kernels.split(",") if k)
        rows = gpu_matrix(tuple(a for a in args.attention.split(",") if a), kernels, timeout)
    if args.only:
        rows = [r for r in rows if args.only in r.name]
        if not rows:
            raise SystemExit(f"error: --only {args.only!r} matches no row")
    report = run_matrix(rows, out, tiny=args.tiny, work_dir=work, budget_s=args.budget or (600.0 if args.tiny else 480.0),
                        wheels=Path(args.wheels) if args.wheels else None)
    print("\n" + markdown(report) + f"\n\nwritten: {report['path']}", flush=True)
    return 0 if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in report["runs"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
