"""The one-shot GPU check's runner (launch/gpu_check.py, vlm_dist.benchmark.gpu_check), rehearsed on the
CPU with the tiny models: every row in its own process, a failing row recorded while the others finish,
the report's fields, skips for missing packages and a spent budget.

    python -m pytest tests/test_gpu_check.py -q
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_dist.benchmark import gpu_check as gc

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "gpu_check.py"


def test_tiny_matrix_runs_every_row_and_records_the_failing_one(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path / "out"),
                           "--work-dir", str(tmp_path / "work")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]     # 1: one row failed
    [path] = (tmp_path / "out").glob("gpu_check-tiny-*.json")
    r = json.loads(path.read_text())
    assert r["gpu"] is None and r["tiny"] is True and r["date"]
    assert {"torch", "cuda", "transformers", "deepspeed", "bitsandbytes", "liger-kernel"} <= set(r["versions"])
    runs = {e["name"]: e for e in r["runs"]}
    assert list(runs) == [row.name for row in gc.tiny_matrix(1)]
    for e in r["runs"]:
        assert {"name", "stage", "llm_mode", "attention", "kernels", "status", "tokens_per_s_per_gpu", "mfu",
                "mfu_measured", "peak_memory_gb", "loader_stall_pct", "packing_efficiency", "command"} <= set(e)

    bad = runs.pop("stage1 no-such-attention")
    assert bad["status"].startswith("failed: ") and "--model.attn_implementation=no_such_attention" in bad["status"]
    assert bad["tokens_per_s_per_gpu"] is None and "ConfigError" in bad["log_tail"]
    assert all(e["status"] == "ok" for e in runs.values()), {k: e["status"] for k, e in runs.items()}

    for name in ("stage1 sdpa", "stage3 lora"):
        e = runs[name]
        assert e["tokens_per_s_per_gpu"] > 0 and e["mfu_measured"] > 0 and e["peak_memory_gb"] > 0
        assert e["mfu"] is None                                  # no data-sheet peak for a CPU: none made up
        assert 0 < e["packing_efficiency"] <= 1 and 0 <= e["loader_stall_pct"] <= 100
        assert e["report"]["setup"]["llm_mode"] == e["llm_mode"]
    assert runs["stage3 lora"]["report"]["setup"]["lora_r"] == 4
    assert runs["cache builder"]["images_per_s"] > 0
    ok = runs["packed = alone sdpa"]
    assert ok["loss_rel_err"] <= 1e-4 and ok["grad_rel_err"] <= 1e-4 and ok["report"]["ok"] is True
    learn = runs["learning lora"]
    assert learn["loss_ratio"] > 1 and learn["loss_rel_err"] <= 1e-4             # fell; the export reloads
    assert "adapter/adapter_model.safetensors" in learn["report"]["reload"]["export_files"]

    # the Markdown table: a header, a separator, one line per run, the failure's message in its line
    table = proc.stdout[proc.stdout.index("| run |"):].split("\n\n")[0].splitlines()
    assert len(table) == 2 + len(r["runs"])
    assert any("no_such_attention" in ln and "failed" in ln for ln in table)


def test_missing_package_timeout_and_spent_budget(tmp_path):
    """A row whose package is absent is skipped, naming it; a row past its timeout is failed, naming
    the time; once the budget is spent the rest are skipped, not lost."""
    sleeper = gc.Row("slow", "train", 1, "frozen", "sdpa", None, ("--steps", "1"), timeout_s=0.5)
    rows = [gc.Row("needs it", "train", 3, "qlora", None, None, needs=("no_such_module_for_the_check",)),
            sleeper]
    r = gc.run_matrix(rows, tmp_path / "out", tiny=True, work_dir=tmp_path / "work", budget_s=600)
    skipped, slow = r["runs"]
    assert skipped["status"].startswith("skipped: no_such_module_for_the_check not installed")
    assert slow["status"].startswith("failed: timed out after")
    r = gc.run_matrix([sleeper], tmp_path / "out", tiny=True, work_dir=tmp_path / "work", budget_s=0)
    assert r["runs"][0]["status"].startswith("skipped: the check's 0 s budget was spent")
    assert json.loads(Path(r["path"]).read_text())["runs"][0]["status"] == r["runs"][0]["status"]


def test_gpu_matrix_takes_backends_and_kernels_from_config_values():
    rows = gc.gpu_matrix(("sdpa", "varlen"), ("none", "liger"), timeout_s=120)
    names = [r.name for r in rows]
    assert names[:4] == ["stage1 sdpa kernels=none", "stage1 sdpa kernels=liger",
                         "stage1 varlen kernels=none", "stage1 varlen kernels=liger"]
    cmd = rows[3].command(False, Path("w"), Path("o.json"))
    assert "--model.attn_implementation=varlen" in cmd and "--model.kernels=liger" in cmd
    assert "--model.kernels=none" in rows[2].command(False, Path("w"), Path("o.json"))
    # None: the config's default, no flag at all
    default = gc.gpu_matrix(("sdpa",), (None,), timeout_s=120)[0]
    assert default.name == "stage1 sdpa kernels=default"
    assert not any(a.startswith("--model.kernels") for a in default.command(False, Path("w"), Path("o.json")))
    by_name = {r.name: r for r in rows}
    assert "bitsandbytes" in by_name["stage3 qlora"].needs and "liger_kernel" in rows[1].needs
    assert by_name["cache builder"].kind == "cache"
    # packed = alone for every backend, with the fused kernels on
    assert [r.attention for r in rows if r.kind == "correctness"] == ["sdpa", "varlen"]
    assert all(r.kernels == "liger" for r in rows if r.kind == "correctness")


@pytest.mark.parametrize("output, message", [
    ("noise\nTraceback ...\nValueError: --data.max_seq_len=64 is too small\n", "ValueError: --data.max_seq_len=64 is too small"),
    ("error: packed rows differ\nmore\n", "error: packed rows differ"),
    ("just a line\n", "just a line"),
    ("", "no output"),
])
def test_failure_message_is_the_error_line(output, message):
    assert gc.failure_message(output) == message
