"""AdamW parameter groups and the learning-rate schedule of a run.

    ds = build_ds_config(args.deepspeed, cfg, world_size)        # vlm_dist.training.ds_config
    optimizer = build_optimizer(model, cfg, ds)                  # AdamW over the trainable params
    scheduler = build_scheduler(optimizer, cfg, total_steps)     # warmup -> cosine to the floor
    print0(describe_param_groups(optimizer.param_groups))
    engine, _, _, scheduler = deepspeed.initialize(model=model, config=ds, optimizer=optimizer,
                                                   lr_scheduler=scheduler)

Groups are decided from parameter names: a name with a `lora_*` part is an
adapter, a name with a `connector`/`connectors` part is the connector, anything
else is an LLM weight. Each gets its own peak learning rate (train.lr_connector,
lr_adapters, lr_llm). Norms, biases and other 1-D parameters get no weight
decay. The schedule is linear warmup then cosine decay to a floor, as a torch
LambdaLR, so DeepSpeed steps it and saves it in its checkpoints. Gradient
clipping is DeepSpeed's (`gradient_clipping`, filled in by vlm_dist.training.ds_config).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR

from vlm_dist.config import Config, ConfigError, TrainConfig
from vlm_dist.training.ds_config import offloads_optimizer

COMPONENTS = ("connector", "adapters", "llm")
# Which llm_mode trains which components; a trainable parameter outside its mode's set is a bug upstream.
TRAINS = {"frozen": {"connector"}, "lora": {"connector", "adapters"}, "qlora": {"connector", "adapters"},
          "full": {"connector", "llm"}}


def param_component(name: str) -> str:
    """'connector', 'adapters' (LoRA) or 'llm', from a parameter's dotted name."""
    parts = name.split(".")
    if any(p.startswith("lora_") for p in parts):   # PEFT: ...q_proj.lora_A.default.weight
        return "adapters"
    if "connector" in parts or "connectors" in parts:
        return "connector"
    return "llm"


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether AdamW decays this parameter: matrices yes; norms, biases and 1-D parameters no."""
    shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape   # ZeRO-3 partitions hide the shape
    parts = name.split(".")
    return len(shape) >= 2 and parts[-1] != "bias" and not any("norm" in p.lower() for p in parts[:-1])


def build_param_groups(named_parameters: Iterable[tuple[str, torch.nn.Parameter]], cfg: Config) -> list[dict]:
    """AdamW groups for the trainable parameters: one per (component, decay), empty ones left out.

    Each group: {"params", "name" (e.g. "connector/decay"), "lr" (peak), "weight_decay"}.
    Raises ConfigError when a trainable parameter does not belong to cfg.model.llm_mode's set.
    """
    t, mode = cfg.train, cfg.model.llm_mode
    peak = {"connector": t.lr_connector, "adapters": t.lr_adapters, "llm": t.lr_llm}
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    seen: set[int] = set()
    for name, p in named_parameters:
        if not p.requires_grad or id(p) in seen:   # tied weights appear once
            continue
        seen.add(id(p))
        comp = param_component(name)
        if comp not in TRAINS[mode]:
            raise ConfigError(f"parameter {name} ({comp}) is trainable, but --model.llm_mode={mode} trains only "
                              f"{' and '.join(sorted(TRAINS[mode]))}: the trainable set is wrong")
        buckets.setdefault((comp, decays(name, p)), []).append(p)
    if not buckets:
        raise ConfigError(f"no trainable parameters (--model.llm_mode={mode}): the connector should always train")
    groups = []
    for comp in COMPONENTS:
        for decay in (True, False):
            params = buckets.get((comp, decay))
            if params:
                groups.append({"params": params, "name": f"{comp}/{'decay' if decay else 'no_decay'}",
                               "lr": peak[comp], "weight_decay": t.weight_decay if decay else 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: Config, ds_config: dict | None = None) -> torch.optim.Optimizer:
    """AdamW over build_param_groups(model.named_parameters(), cfg), for deepspeed.initialize(optimizer=...).

    torch's AdamW (no compiled op needed) with fused=True: one kernel per step for all tensors of a
    group instead of a chain of foreach kernels. torch >= 2.4 (setup.py's floor) has the fused kernel
    for both devices this trains on, CUDA and CPU, and checks the devices here, while the parameters
    are still on the CPU; DeepSpeed then swaps its fp32 master partitions (on the GPU) into the groups,
    keeping the flag. DeepSpeed's CPU Adam when ds_config offloads the optimizer to CPU/NVMe, the only
    optimizer ZeRO-Offload takes. Pass the built DeepSpeed config for that check.
    """
    t = cfg.train
    groups = build_param_groups(model.named_parameters(), cfg)
    kwargs = dict(lr=t.lr_connector, betas=(t.adam_betas[0], t.adam_betas[1]), eps=t.adam_eps,
                  weight_decay=t.weight_decay)   # defaults only: every group sets its own lr and weight_decay
    if ds_config is not None and offloads_optimizer(ds_config):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=True, **kwargs)


def describe_param_groups(groups: list[dict]) -> str:
    """A small table of the groups: name, tensors, parameters, peak lr, weight decay."""
    lines = [f"{'group':<22}{'tensors':>8}{'params':>14}{'lr':>10}{'wd':>8}"]
    for g in groups:
        n = sum((p.ds_numel if hasattr(p, "ds_numel") else p.numel()) for p in g["params"])
        lines.append(f"{g['name']:<22}{len(g['params']):>8}{n:>14,}{g['lr']:>10.2e}{g['weight_decay']:>8.3g}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- schedule

def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warmup length in optimizer steps: floor(warmup_ratio x total_steps)."""
    return int(warmup_ratio * total_steps)


def total_steps(train: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the run: train.max_steps, or train.epochs x steps_per_epoch."""
    if train.max_steps is not None:
        return train.max_steps
    assert train.epochs is not None, "validate_config guarantees max_steps or epochs"
    if steps_per_epoch < 1:
        raise ConfigError(f"an epoch has {steps_per_epoch} optimizer steps: too few records for "
                          "--train.micro_batch_size x --train.grad_accum x world size")
    return train.epochs * steps_per_epoch


class WarmupCosine:
    """LR multiplier of optimizer step s (0-based): (s+1)/(W+1) while s < W, so it rises to the
    peak; 1.0 at s = W; cosine down to min_lr_ratio, reached at the last step s = T-1 and held after.

    A plain object (not a closure) so LambdaLR's state_dict saves and restores its fields.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_lr_ratio: float):
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(f"warmup_steps={warmup_steps} must be in [0, total_steps={total_steps})")
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio

    def __call__(self, step: int) -> float:
        w, t, floor = self.warmup_steps, self.total_steps, self.min_lr_ratio
        if step < w:
            return (step + 1) / (w + 1)
        progress = min(1.0, (step - w) / max(1, t - 1 - w))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config | TrainConfig, total_steps: int) -> LambdaLR:
    """Warmup then cosine to train.min_lr_ratio over total_steps, on each group's own peak lr.

    Give it to deepspeed.initialize(lr_scheduler=...): DeepSpeed steps it once per optimizer step
    and saves/restores it with its checkpoints.
    """
    train = cfg.train if isinstance(cfg, Config) else cfg
    fn = WarmupCosine(warmup_steps(total_steps, train.warmup_ratio), total_steps, train.min_lr_ratio)
    return LambdaLR(optimizer, fn)


def apply_config_after_resume(scheduler: LambdaLR, cfg: Config, total_steps: int) -> None:
    """Make the run's config win over what DeepSpeed's load_checkpoint restored (each group's peak
    lr, weight decay, betas, eps and the schedule's fields): they differ only where the resume
    check accepted a change (a longer run, --checkpoint.allow_changed), and then the new value must
    be the one that trains, as config.yaml says."""
    t = cfg.train
    peak = {"connector": t.lr_connector, "adapters": t.lr_adapters, "llm": t.lr_llm}
    fn = WarmupCosine(warmup_steps(total_steps, t.warmup_ratio), total_steps, t.min_lr_ratio)
    groups = scheduler.optimizer.param_groups
    scheduler.lr_lambdas = [fn] * len(groups)
    scheduler.base_lrs = []
    for g in groups:   # names as build_param_groups gives them, e.g. "connector/no_decay"
        component, kind = g["name"].split("/")
        g["initial_lr"] = peak[component]
        g["weight_decay"] = t.weight_decay if kind == "decay" else 0.0
        g["betas"], g["eps"] = (t.adam_betas[0], t.adam_betas[1]), t.adam_eps
        g["lr"] = peak[component] * fn(scheduler.last_epoch)   # what LambdaLR would give at this step
        scheduler.base_lrs.append(peak[component])
    scheduler._last_lr = [g["lr"] for g in groups]
