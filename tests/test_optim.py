"""AdamW parameter groups and the warmup -> cosine schedule, on the real tiny VLM,
and once through deepspeed.initialize (ZeRO-2 and ZeRO-3, one CPU rank).

    python -m pytest tests/test_optim.py -q
"""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vlm_dist.config import ConfigError, load_config
from vlm_dist.training.optim import (WarmupCosine, build_optimizer, build_param_groups, build_scheduler,
                            describe_param_groups, param_component, total_steps, warmup_steps)

REPO = Path(__file__).resolve().parents[1]
STAGES = REPO / "launch" / "configs"


def tiny_vlm(tiny_models, mode: str):
    from transformers import AutoTokenizer

    from vlm_dist.config import LoraConfig
    from vlm_dist.model.build import build_vlm, load_llm, set_trainable

    llm = load_llm(tiny_models["llm"], mode, torch.float32, "sdpa", LoraConfig(r=4, alpha=8))
    tok = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    vlm = build_vlm(llm, tok, vision_dim=32, num_patches=16,
                    connector=dict(kind="resampler", num_latents=4, depth=1, heads=4), dtype=torch.float32)
    set_trainable(vlm, mode)
    return vlm


def by_name(groups):
    return {g["name"]: g for g in groups}


def names_in(group, model):
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_component_from_name():
    assert param_component("connectors.image.resampler.latents") == "connector"
    assert param_component("llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight") == "adapters"
    assert param_component("llm.model.layers.0.mlp.up_proj.weight") == "llm"


def test_lora_groups(tiny_models):
    cfg = load_config(STAGES / "stage2_sft.yaml", ["--train.weight_decay=0.05"])
    vlm = tiny_vlm(tiny_models, "lora")
    groups = build_param_groups(vlm.named_parameters(), cfg)
    g = by_name(groups)
    assert list(g) == ["connector/decay", "connector/no_decay", "adapters/decay"]
    assert (g["connector/decay"]["lr"], g["connector/no_decay"]["lr"], g["adapters/decay"]["lr"]) == (2e-5, 2e-5, 2e-4)
    assert (g["connector/decay"]["weight_decay"], g["connector/no_decay"]["weight_decay"],
            g["adapters/decay"]["weight_decay"]) == (0.05, 0.0, 0.05)
    # every trainable parameter exactly once, nothing frozen
    grouped = [id(p) for grp in groups for p in grp["params"]]
    assert len(grouped) == len(set(grouped))
    assert set(grouped) == {id(p) for p in vlm.parameters() if p.requires_grad}
    no_decay = names_in(g["connector/no_decay"], vlm)
    decay = names_in(g["connector/decay"], vlm)
    norms = {n for n, m in vlm.connectors.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert norms and all(f"connectors.{n}.weight" in no_decay for n in norms)
    assert all(n.endswith(("bias", "weight")) for n in no_decay)
    assert all(vlm.get_parameter(n).ndim < 2 for n in no_decay)
    assert "connectors.image.resampler.latents" in decay
    assert all(vlm.get_parameter(n).ndim >= 2 for n in decay)
    assert all("lora_" in n for n in names_in(g["adapters/decay"], vlm))
    table = describe_param_groups(groups)
    assert "adapters/decay" in table and "2.00e-04" in table


def test_full_groups_keep_norms_out_of_decay(tiny_models):
    cfg = load_config(STAGES / "stage2_sft.yaml", ["--model.llm_mode=full", "--train.lr_llm=1e-5",
                                                    "--train.weight_decay=0.1"])
    vlm = tiny_vlm(tiny_models, "full")
    g = by_name(build_param_groups(vlm.named_parameters(), cfg))
    assert set(g) == {"connector/decay", "connector/no_decay", "llm/decay", "llm/no_decay"}
    assert g["llm/decay"]["lr"] == g["llm/no_decay"]["lr"] == 1e-5
    llm_no_decay = names_in(g["llm/no_decay"], vlm)
    rms = [n for n, _ in vlm.named_parameters() if n.startswith("llm.") and n.endswith("norm.weight")]
    assert rms and set(rms) <= llm_no_decay
    assert all(vlm.get_parameter(n).ndim >= 2 for n in names_in(g["llm/decay"], vlm))


def test_frozen_groups_and_a_wrong_trainable_set(tiny_models):
    cfg = load_config(STAGES / "stage1_align.yaml")
    vlm = tiny_vlm(tiny_models, "frozen")
    assert [g["name"] for g in build_param_groups(vlm.named_parameters(), cfg)] == \
        ["connector/decay", "connector/no_decay"]
    lora = tiny_vlm(tiny_models, "lora")   # adapters train, but the config says frozen
    with pytest.raises(ConfigError, match=r"lora_A.*adapters\) is trainable, but --model\.llm_mode=frozen"):
        build_param_groups(lora.named_parameters(), cfg)
    vlm.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_param_groups(vlm.named_parameters(), cfg)


def test_build_optimizer_is_adamw_over_the_groups(tiny_models):
    cfg = load_config(STAGES / "stage2_sft.yaml", ["--train.adam_betas=[0.9,0.95]", "--train.adam_eps=1e-6"])
    vlm = tiny_vlm(tiny_models, "lora")
    opt = build_optimizer(vlm, cfg)
    assert type(opt) is torch.optim.AdamW
    assert [g["name"] for g in opt.param_groups] == ["connector/decay", "connector/no_decay", "adapters/decay"]
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-6 for g in opt.param_groups)
    assert all(g["fused"] for g in opt.param_groups)   # one kernel per step (CUDA and CPU)


def test_the_fused_step_is_adamw(tiny_models):
    """The fused kernel applies the same update as torch's unfused AdamW, per group."""
    cfg = load_config(STAGES / "stage2_sft.yaml", ["--train.weight_decay=0.1"])
    vlm = tiny_vlm(tiny_models, "lora")
    params = [p for p in vlm.parameters() if p.requires_grad]
    torch.manual_seed(0)
    grads = [torch.randn_like(p) for p in params]
    start = [p.detach().clone() for p in params]
    results = []
    for fused in (True, False):
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        opt = build_optimizer(vlm, cfg)
        if not fused:
            opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "fused"} for g in opt.param_groups])
        for _ in range(3):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach().clone() for p in params])
    for a, b, s in zip(*results, start):
        assert not torch.equal(a, s)                       # the step moved the weights
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_schedule_shape():
    T, W, floor = 100, 10, 0.1
    f = WarmupCosine(W, T, floor)
    vals = [f(s) for s in range(T + 20)]
    warm, decay = vals[:W + 1], vals[W:T]
    assert vals[0] == pytest.approx(1 / 11)                      # the first step already learns
    assert all(a < b for a, b in zip(warm, warm[1:]))             # rises ...
    assert vals[W] == 1.0                                          # ... to the peak at step W
    assert all(a > b for a, b in zip(decay, decay[1:]))           # cosine down ...
    assert vals[T - 1] == pytest.approx(floor, abs=1e-12)          # ... to the floor at the last step
    assert all(v == pytest.approx(floor) for v in vals[T:])        # and stays there
    mid = W + (T - 1 - W) / 2                                      # half way down the cosine
    assert f(mid) == pytest.approx(floor + (1 - floor) / 2)
    s = W + 30
    assert f(s) == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 30 / (T - 1 - W))))
    assert WarmupCosine(0, 5, 0.0)(0) == 1.0 and WarmupCosine(0, 5, 0.0)(4) == pytest.approx(0.0)


def test_steps_from_config():
    cfg = load_config(STAGES / "stage1_align.yaml")
    assert total_steps(cfg.train, 250) == 250 and warmup_steps(250, cfg.train.warmup_ratio) == 5
    cfg = load_config(STAGES / "stage1_align.yaml", ["--train.max_steps=40"])
    assert total_steps(cfg.train, 250) == 40
    cfg = load_config(STAGES / "stage1_align.yaml", ["--train.epochs=3"])
    assert total_steps(cfg.train, 7) == 21
    with pytest.raises(ConfigError, match="too few records"):
        total_steps(cfg.train, 0)


def test_scheduler_scales_each_group_and_resumes_exactly():
    cfg = load_config(STAGES / "stage2_sft.yaml", ["--train.warmup_ratio=0.1", "--train.min_lr_ratio=0.1"])
    a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    make_opt = lambda: torch.optim.AdamW([{"params": [a], "lr": 2e-4}, {"params": [b], "lr": 2e-5}])  # noqa: E731
    opt = make_opt()
    sched = build_scheduler(opt, cfg, total_steps=50)
    f = WarmupCosine(5, 50, 0.1)
    history = []
    for step in range(50):
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs == pytest.approx([2e-4 * f(step), 2e-5 * f(step)])
        history.append(lrs)
        opt.step()
        sched.step()
        if step == 19:
            state = sched.state_dict()
    # a fresh scheduler (even built for another length) restored from the state continues identically
    opt2 = make_opt()
    sched2 = build_scheduler(opt2, cfg.train, total_steps=999)
    sched2.load_state_dict(state)
    for step in range(20, 50):
        for g, lr in zip(opt2.param_groups, sched2.get_last_lr()):
            g["lr"] = lr
        assert [g["lr"] for g in opt2.param_groups] == pytest.approx(history[step])
        sched2.step()


DS_SCRIPT = textwrap.dedent("""
    import json, os, socket, sys
    import torch, deepspeed
    from vlm_dist.config import load_config
    from vlm_dist.training.ds_config import build_ds_config
    from vlm_dist.training.optim import build_optimizer, build_scheduler

    class Connector(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.proj = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.connectors = torch.nn.ModuleDict({"image": Connector()})
            self.llm = torch.nn.Linear(8, 8)
            self.llm.requires_grad_(False)
        def forward(self, x):
            c = self.connectors["image"]
            return self.llm(c.proj(c.norm(x))).pow(2).mean()

    s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    out = {}
    for stage in ("zero2", "zero3"):
        torch.manual_seed(0)
        cfg = load_config(None, ["--train.max_steps=10", "--model.dtype=float32", "--train.micro_batch_size=1",
                                 "--train.warmup_ratio=0.2", "--train.max_grad_norm=0.7"])
        model = Toy()
        ds = build_ds_config(f"ds_configs/{stage}.json", cfg, 1)
        opt = build_optimizer(model, cfg, ds)
        engine, _, _, sched = deepspeed.initialize(model=model, config=ds, optimizer=opt,
                                                   lr_scheduler=build_scheduler(opt, cfg, 10))
        lrs = []
        for step in range(4):
            lrs.append([g["lr"] for g in engine.optimizer.param_groups])
            engine.backward(engine(torch.randn(1, 8)))
            engine.step()
        out[stage] = {"lrs": lrs, "wd": [g["weight_decay"] for g in engine.optimizer.param_groups],
                      "clip": engine.gradient_clipping(),
                      "fused": [g["fused"] for g in engine.optimizer.optimizer.param_groups]}
    print("RESULT " + json.dumps(out))
""")


def test_deepspeed_takes_the_optimizer_schedule_and_clipping(tmp_path):
    script = tmp_path / "ds_run.py"
    script.write_text(DS_SCRIPT)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT "):])
    f = WarmupCosine(2, 10, 0.1)
    for stage, r in result.items():
        assert r["clip"] == 0.7, stage
        assert r["wd"] == [0.01, 0.0], stage   # connector/decay, connector/no_decay
        assert r["fused"] == [True, True], stage   # DeepSpeed steps the fused AdamW on its partitions
        for step, lrs in enumerate(r["lrs"]):
            assert lrs == pytest.approx([1e-4 * f(step)] * 2), (stage, step)
