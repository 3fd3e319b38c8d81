"""The learning check (vlm_dist.benchmark.learning) on the tiny models: the loop learns, the export reloads.

    python -m pytest tests/test_learning.py -q

On a GPU the same module memorises with Qwen3-8B and SigLIP-so400m at full size (launch/gpu_check.py).
"""
import json

from vlm_dist.benchmark.learning import main

COMMON = ["--tiny", "--lengths", "stage1", "--samples", "4", "--model.init_from=null"]


def test_full_fine_tuning_memorises_the_set(tmp_path, capsys):
    out = tmp_path / "full.json"
    rc = main(COMMON + ["--config", "launch/configs/stage3_multi.yaml", "--model.llm_mode=full", "--lr", "1e-2",
                        "--steps", "40", "--work-dir", str(tmp_path / "w"), "--out", str(out)])
    r = json.loads(out.read_text())
    assert rc == 0 and r["ok"] and r["learned"], capsys.readouterr().out
    assert r["loss_ratio"] >= 5 and r["steps_to_target"] <= 40
    assert r["losses"][0] > r["losses"][-1] and len(r["losses"]) == 40
    assert r["reload"] is None                       # a full LLM is not an adapter: nothing to reload here


def test_lora_export_reloads_to_the_same_loss_and_a_missed_target_fails(tmp_path, capsys):
    out = tmp_path / "lora.json"
    rc = main(COMMON + ["--config", "launch/configs/stage3_multi.yaml", "--model.llm_mode=lora", "--lora.r=4",
                        "--steps", "3", "--work-dir", str(tmp_path / "w"), "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["reload"]["rel_err"] <= 1e-4 and r["reload"]["trained_loss"] == r["final_loss"]
    assert {"adapter/adapter_model.safetensors", "connector.safetensors", "vlm_config.json"} <= \
        set(r["reload"]["export_files"])
    # the tiny LoRA cannot fall 5x in 3 steps: the check says so and exits 1
    assert rc == 1 and not r["learned"] and r["steps_to_target"] is None
    assert "error: the loss fell only" in capsys.readouterr().err
