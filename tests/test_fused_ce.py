"""Liger's fused linear cross-entropy in the VLM forward: when it is used, and that it computes the loss
the checkpointed lm_head/CE chunks compute.

liger-kernel is a CUDA-only (Triton) package that is not installed here: the tests put a stand-in
`liger_kernel.transformers` module in sys.modules whose LigerFusedLinearCrossEntropyLoss computes the
same function in plain torch (linear -> cross-entropy, ignore_index, sum), and records its calls, so what
is checked is the VLM's wiring (which weight, which positions, which reduction, when), not Liger.
"""
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlm_dist.config import load_config
from vlm_dist.contract.prompt import IGNORE, PromptEncoder
from vlm_dist.model.build import build_vlm, load_llm, resolve_fused_ce, set_trainable
from vlm_dist.model.vlm import unwrap_llm

N, P, DV = 4, 16, 32


class FakeLigerFLCE(nn.Module):
    """Plain-torch double of liger_kernel.transformers.LigerFusedLinearCrossEntropyLoss (same signature)."""
    calls: list = []

    def __init__(self, ignore_index=-100, reduction="mean"):
        super().__init__()
        self.ignore_index, self.reduction = ignore_index, reduction

    def forward(self, lin_weight, _input, target, bias=None):
        type(self).calls.append((lin_weight, _input, target, self.ignore_index, self.reduction))
        return F.cross_entropy(F.linear(_input, lin_weight, bias).float(), target,
                               ignore_index=self.ignore_index, reduction=self.reduction)


@pytest.fixture
def fake_liger(monkeypatch):
    FakeLigerFLCE.calls = []
    pkg = types.ModuleType("liger_kernel")
    pkg.transformers = types.ModuleType("liger_kernel.transformers")
    pkg.transformers.LigerFusedLinearCrossEntropyLoss = FakeLigerFLCE
    pkg.transformers.apply_liger_kernel_to_qwen3 = lambda **kwargs: None   # load_llm's patch: not under test
    monkeypatch.setitem(sys.modules, "liger_kernel", pkg)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", pkg.transformers)
    return FakeLigerFLCE.calls


def make_vlm(tiny_models, tokenizer, mode, fused_ce):
    torch.manual_seed(0)
    llm = load_llm(tiny_models["llm"], mode, dtype=torch.float32)
    vlm = build_vlm(llm, tokenizer, vision_dim=DV, num_patches=P,
                    connector=dict(num_latents=N, depth=1, heads=4), dtype=torch.float32, fused_ce=fused_ce)
    set_trainable(vlm, mode)
    return vlm


def batch(tokenizer, answer="Image 1: red. Image 2: blue.", supervised=True):
    rec = {"id": "s", "images": ["a", "b"], "conversations": [
        {"role": "user", "content": "<image> and <image>\nDescribe each image in order."},
        {"role": "assistant", "content": answer}]}
    s = PromptEncoder(tokenizer, "plain", N).encode(rec)
    ids, lab = torch.tensor([s.input_ids]), torch.tensor([s.labels])
    tgt = torch.full_like(lab, IGNORE)
    if supervised:
        tgt[:, :-1] = lab[:, 1:]
    torch.manual_seed(1)
    media = {"image": {"features": torch.randn(2, P, DV), "counts": torch.tensor([2])}}
    return dict(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], targets=tgt, media=media)


def loss_and_grads(vlm, b):
    vlm.zero_grad(set_to_none=True)
    out = vlm(**b)
    out["loss_sum"].backward()
    return out, {n: p.grad.clone() for n, p in vlm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["frozen", "full"])
def test_fused_ce_is_called_once_and_equals_the_chunked_loss_and_gradients(tiny_models, tokenizer, fake_liger,
                                                                           mode):
    """frozen: lm_head.weight frozen (Liger skips grad_weight); full: the weight's gradient flows too."""
    vlm = make_vlm(tiny_models, tokenizer, mode, fused_ce=False)
    b = batch(tokenizer)
    ref, ref_grads = loss_and_grads(vlm, b)
    assert fake_liger == []

    vlm.fused_ce = True
    head = unwrap_llm(vlm.llm).get_output_embeddings()
    head_calls = []
    hook = head.register_forward_hook(lambda *a: head_calls.append(1))
    out, grads = loss_and_grads(vlm, b)
    hook.remove()

    assert len(fake_liger) == 1 and head_calls == []   # one fused call; the lm_head module never runs
    weight, h, t, ignore_index, reduction = fake_liger[0]
    supervised = (b["targets"].reshape(-1) != IGNORE)
    assert weight is head.weight and (ignore_index, reduction) == (IGNORE, "sum")
    assert h.shape == (int(supervised.sum()), head.weight.shape[1])    # supervised positions only
    assert torch.equal(t, b["targets"].reshape(-1)[supervised])
    assert out["num_supervised"] == ref["num_supervised"] == int(supervised.sum())
    torch.testing.assert_close(out["loss_sum"], ref["loss_sum"])
    assert grads.keys() == ref_grads.keys() and grads
    assert ("llm.lm_head.weight" in grads) is (mode == "full")
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_no_supervised_token_keeps_the_graph_connected(tiny_models, tokenizer, fake_liger):
    vlm = make_vlm(tiny_models, tokenizer, "frozen", fused_ce=True)
    out, grads = loss_and_grads(vlm, batch(tokenizer, supervised=False))
    assert fake_liger == [] and out["num_supervised"] == 0 and out["loss_sum"].item() == 0.0
    connector = [n for n, p in vlm.named_parameters() if p.requires_grad]
    assert connector and all(n in grads for n in connector)   # backward reached every trainable param


def test_fused_ce_refuses_a_zero3_partitioned_lm_head(tiny_models, tokenizer, fake_liger):
    vlm = make_vlm(tiny_models, tokenizer, "frozen", fused_ce=True)
    unwrap_llm(vlm.llm).get_output_embeddings().weight.ds_numel = 1   # what ZeRO-3 marks its params with
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        vlm(**batch(tokenizer))


def test_resolve_fused_ce_only_with_liger_and_zero_below_3():
    assert resolve_fused_ce("liger", 0)[0] and resolve_fused_ce("liger", 1)[0] and resolve_fused_ce("liger", 2)[0]
    on3, why3 = resolve_fused_ce("liger", 3)
    assert not on3 and "ZeRO-3" in why3
    assert not resolve_fused_ce("liger", None)[0]
    off, why = resolve_fused_ce("none", 2)
    assert not off and "kernels=none" in why


@pytest.mark.parametrize("kernels, stage, fused, line", [
    ("liger", 2, True, "loss: Liger fused linear cross-entropy: kernels=liger, ZeRO-2"),
    ("liger", 3, False, "loss: chunked lm_head/cross-entropy: ZeRO-3 partitions lm_head.weight"),
    ("none", 2, False, "loss: chunked lm_head/cross-entropy: kernels=none"),
])
def test_trainer_build_model_decides_and_logs_the_loss_path(tiny_models, tokenizer, fake_liger, monkeypatch,
                                                            capsys, kernels, stage, fused, line):
    from vlm_dist.training.loop import build_model

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)   # resolve_kernels: liger needs CUDA
    cfg = load_config(None, [f"--model.llm={tiny_models['llm']}", "--model.dtype=float32",
                             f"--model.kernels={kernels}", "--model.num_latents=4", "--model.resampler_depth=1",
                             "--model.resampler_heads=4"])
    vlm = build_model(cfg, tokenizer, (P, DV), True, zero_stage=stage)
    assert vlm.fused_ce is fused
    assert line in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = vlm(**batch(tokenizer))
    assert len(fake_liger) == (1 if fused else 0) and out["num_supervised"] > 0
