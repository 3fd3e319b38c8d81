"""Packed attention: a packed multi-row batch gives each sample exactly its loss alone,
through every backend that runs on the CPU (the varlen path through its CPU reference;
the CUDA kernel is exercised by the GPU check), and the flash path gets the boundaries."""
import re

import pytest
import torch
import torch.nn.functional as F

from vlm_dist.contract.prompt import IGNORE
from vlm_dist.data import collate
from vlm_dist.model import attention
from vlm_dist.model.build import build_vlm, load_llm, set_trainable
from vlm_dist.model.vlm import unwrap_llm

N, P, DV = 4, 16, 32  # visual tokens per image, patches, vision width


class S:
    def __init__(self, sid, ids, labels, images):
        self.id, self.input_ids, self.labels, self.image_keys = sid, ids, labels, images


def make_vlm(tiny_models, tokenizer, impl):
    torch.manual_seed(0)
    llm = load_llm(tiny_models["llm"], "frozen", dtype=torch.float32, attn_implementation=impl)
    vlm = build_vlm(llm, tokenizer, DV, P, dict(num_latents=N, depth=1, heads=4), dtype=torch.float32)
    set_trainable(vlm, "frozen")
    return vlm


@pytest.fixture(scope="module")
def data(tokenizer):
    """Five samples (0-2 images each) packed into two rows, and their image features."""
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    start, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>"))
    g = torch.Generator().manual_seed(0)

    def make(sid, n_text, n_images, supervised_from):
        ids = [start, *[pad] * N, end] * n_images + torch.randint(0, 300, (n_text,), generator=g).tolist()
        labels = [IGNORE if i < supervised_from or t in (start, pad, end) else t for i, t in enumerate(ids)]
        return S(sid, ids, labels, [f"{sid}{k}" for k in range(n_images)])

    a, b, c, d, e = (make("a", 9, 1, 3), make("b", 5, 0, 1), make("c", 7, 2, 4), make("d", 12, 0, 0),
                     make("e", 3, 1, 2))
    feats = {f"{s.id}{k}": torch.randn(P, DV, generator=g) for s in (a, b, c, d, e)
             for k in range(len(s.image_keys))}
    return dict(rows=[[a, b, c], [d, e]], feats=feats, pad=pad, pad_id=tokenizer.pad_token_id)


def batch_of(data, rows, **kw):
    return collate(rows, data["feats"].__getitem__, data["pad_id"], 64, feature_shape=(P, DV),
                   image_pad_id=data["pad"], **kw)


def per_token_loss(vlm, batch):
    """(R, L) loss, 0 where ignored: the VLM's forward up to the CE, per token. A batch without
    cu_seqlens runs as plain causal rows (attention_mask=None), the reference for one sample."""
    base = unwrap_llm(vlm.llm)
    emb = vlm.embed(batch["input_ids"], batch["media"])
    if batch.get("cu_seqlens") is None:
        attn = {"attention_mask": None}
    else:
        attn = attention.packed_attention_inputs(base.config, batch["cu_seqlens"], batch["max_seqlen"],
                                                 tuple(batch["input_ids"].shape), emb.dtype)
    hidden = base.model(inputs_embeds=emb, position_ids=batch["position_ids"], use_cache=False,
                        **attn).last_hidden_state
    return F.cross_entropy(base.lm_head(hidden).transpose(1, 2), batch["targets"], ignore_index=IGNORE,
                           reduction="none")


def alone(data, s):
    """Sample s on its own unpadded row, without boundaries."""
    b = batch_of(data, [[s]], pad_to_multiple=1)
    del b["cu_seqlens"], b["max_seqlen"]
    return b


@pytest.mark.parametrize("impl", ["sdpa", "eager", "varlen", "flex_attention"])
def test_packed_rows_equal_each_sample_alone(tiny_models, tokenizer, data, impl):
    """The dense mask (sdpa, eager), the varlen function (its CPU reference kernel) and flex's
    block mask (forward only on the CPU) keep a multi-row packed batch's samples apart."""
    vlm, ref = make_vlm(tiny_models, tokenizer, impl).eval(), make_vlm(tiny_models, tokenizer, "sdpa").eval()
    assert unwrap_llm(vlm.llm).config._attn_implementation == {"varlen": attention.VARLEN}.get(impl, impl)
    batch = batch_of(data, data["rows"])
    with torch.no_grad():
        packed = per_token_loss(vlm, batch)
        for r, row in enumerate(data["rows"]):
            t = 0
            for s in row:
                want, n = per_token_loss(ref, alone(data, s))[0], len(s.input_ids)
                assert want.abs().sum() > 0
                torch.testing.assert_close(packed[r, t:t + n], want, atol=1e-5, rtol=1e-5,
                                           msg=f"{impl}: sample {s.id} packed in row {r} differs")
                t += n
        # the model's own forward (boundaries from the batch) sums the same per-token losses
        torch.testing.assert_close(vlm(**batch)["loss_sum"], packed.sum(), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("impl", ["sdpa", "varlen"])
def test_packed_connector_gradients_equal_the_samples_alone(tiny_models, tokenizer, data, impl):
    vlm, ref = make_vlm(tiny_models, tokenizer, impl), make_vlm(tiny_models, tokenizer, "sdpa")
    vlm(**batch_of(data, data["rows"]))["loss_sum"].backward()
    for s in (s for row in data["rows"] for s in row):
        ref(**alone(data, s))["loss_sum"].backward()  # gradients add up over the samples
    got = {n: p.grad for n, p in vlm.connectors.named_parameters()}
    want = {n: p.grad for n, p in ref.connectors.named_parameters()}
    assert any(g.abs().sum() > 0 for g in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_flash_attention_2_gets_the_boundaries_for_packed_rows(tiny_models, tokenizer, data, monkeypatch):
    """transformers' flash path detects packing only at batch size 1: the boundaries must reach
    its varlen call as cu_seq_lens_*/max_length_*. flash-attn is not installed on the CPU, so its
    varlen kernel is stood in for by the CPU reference; the rest is transformers' own flash path."""
    from transformers import modeling_flash_attention_utils as fa_utils
    calls = []

    def varlen_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, max_seqlen_q, **_):
        assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k)
        calls.append((cu_seqlens_q, max_seqlen_q))
        return attention.varlen_reference(q, k, v, cu_seqlens_q, softmax_scale)

    def process(**kw):
        return dict(causal=kw["is_causal"], softmax_scale=kw["softmax_scale"], max_seqlen_q=kw["max_seqlen_q"])

    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention",
                        lambda *a, **k: ((None, varlen_kernel, None, None, None), (process, None)))
    vlm, ref = make_vlm(tiny_models, tokenizer, "sdpa").eval(), make_vlm(tiny_models, tokenizer, "sdpa").eval()
    unwrap_llm(vlm.llm).config._attn_implementation = "flash_attention_2"
    batch = batch_of(data, data["rows"])
    with torch.no_grad():
        got = vlm(**batch)["loss_sum"]
        want = sum(ref(**alone(data, s))["loss_sum"] for row in data["rows"] for s in row)
    layers = unwrap_llm(vlm.llm).config.num_hidden_layers
    assert len(calls) == layers and all(torch.equal(c, batch["cu_seqlens"]) for c, _ in calls)
    assert calls[0][1] == batch["max_seqlen"] and isinstance(calls[0][1], int)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_a_backend_without_boundaries_is_refused_for_packed_rows(tiny_models, tokenizer, data):
    vlm = make_vlm(tiny_models, tokenizer, "sdpa")
    unwrap_llm(vlm.llm).config._attn_implementation = "paged|eager"
    with pytest.raises(ValueError, match=re.escape("attn_implementation='paged|eager' cannot run packed")):
        vlm(**batch_of(data, data["rows"]))


def test_auto_resolves_to_varlen_on_cuda_and_sdpa_elsewhere(monkeypatch):
    assert attention.resolve("auto", "cuda") == "varlen"
    assert attention.resolve("auto", "cpu") == "sdpa"
    assert attention.resolve("flex_attention", "cuda") == "flex_attention"
    assert attention.hf_name("varlen") == attention.VARLEN and attention.hf_name("sdpa") == "sdpa"
    # a torch without the varlen kernel: auto never picks the per-sample reference loop
    monkeypatch.setattr(attention, "_torch_varlen", lambda: (None, {}, False))
    assert attention.resolve("auto", "cuda") == "sdpa"


def test_boundaries_reach_attention_through_lora_and_gradient_checkpointing(tiny_models, tokenizer, data):
    """The boundaries travel as decoder kwargs: through PEFT's wrapper and checkpointed layers too."""
    def build(impl):
        torch.manual_seed(0)
        llm = load_llm(tiny_models["llm"], "lora", dtype=torch.float32, attn_implementation=impl,
                       gradient_checkpointing=True)
        vlm = build_vlm(llm, tokenizer, DV, P, dict(num_latents=N, depth=1, heads=4), dtype=torch.float32)
        set_trainable(vlm, "lora")
        return vlm.train()

    vlm, ref = build("varlen"), build("sdpa")
    got = vlm(**batch_of(data, data["rows"]))["loss_sum"]
    want = sum(ref(**alone(data, s))["loss_sum"] for row in data["rows"] for s in row)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    got.backward()
    assert all(p.grad is not None for n, p in vlm.named_parameters() if p.requires_grad and "lora_A" in n)


def test_generation_with_the_varlen_backend_is_plain_causal(tiny_models, tokenizer):
    """No boundaries at generation: the varlen backend runs causal sdpa, token for token."""
    ids = torch.tensor([tokenizer("a short prompt for the tiny model")["input_ids"]])
    media = {"image": {"features": torch.zeros(0, P, DV), "counts": torch.tensor([0])}}
    out = [make_vlm(tiny_models, tokenizer, impl).eval().generate(ids, media, max_new_tokens=8)
           for impl in ("varlen", "sdpa")]
    assert out[0].shape == (1, 8) and torch.equal(out[0], out[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen kernel is CUDA-only")
def test_cuda_varlen_kernel_matches_the_reference():
    """The real kernel (the GPU check runs this): outputs and gradients of GQA causal attention
    over packed samples match the per-sample sdpa reference."""
    g = torch.Generator(device="cuda").manual_seed(0)
    cu = torch.tensor([0, 37, 40, 169, 256, 300], dtype=torch.int32, device="cuda")
    q = torch.randn(300, 8, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(300, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(2))
    out = attention.varlen(q, k, v, cu, 129, scale=None)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    ref = attention.varlen_reference(q, k, v, cu, scale=None)
    ref_grads = torch.autograd.grad(ref.float().square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    for name, a, b in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2, msg=f"grad {name}")
