"""The VLM: splice, connector, gradients, trainable sets, generation, connector export."""
import pytest
import torch

from vlm_dist.model.build import (build_vlm, load_connectors, load_llm, save_connectors, set_trainable,
                                  trainable_table)
from vlm_dist.model.connector import Connector
from vlm_dist.model.vlm import SpliceError
from vlm_dist.contract.prompt import IGNORE, PromptEncoder

N, P, DV = 4, 16, 32


def make_vlm(tiny_models, tokenizer, mode="frozen", **conn):
    torch.manual_seed(0)
    llm = load_llm(tiny_models["llm"], mode, dtype=torch.float32)
    vlm = build_vlm(llm, tokenizer, vision_dim=DV, num_patches=P,
                    connector=dict(num_latents=N, depth=1, heads=4, **conn), dtype=torch.float32)
    set_trainable(vlm, mode)
    return vlm


def batch_for(tokenizer, record, feats, template="plain"):
    s = PromptEncoder(tokenizer, template, N).encode(record)
    ids, lab = torch.tensor([s.input_ids]), torch.tensor([s.labels])
    tgt = torch.full_like(lab, IGNORE)
    tgt[:, :-1] = lab[:, 1:]
    media = {"image": {"features": feats, "counts": torch.tensor([feats.shape[0]])}}
    return dict(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None], targets=tgt, media=media,
                sample_ids=[[record["id"]]])


def two_image_record():
    return {"id": "two", "images": ["a", "b"], "conversations": [
        {"role": "user", "content": "<image> and <image>\nDescribe each image in order."},
        {"role": "assistant", "content": "Image 1: red. Image 2: blue."}]}


def test_connector_shapes():
    x = torch.randn(3, P, DV)
    assert Connector(DV, 64, num_latents=N, depth=2, heads=4)(x).shape == (3, N, 64)
    mlp = Connector(DV, 64, kind="mlp")
    assert mlp(x).shape == (3, P, 64) and mlp.num_tokens(P) == P
    with pytest.raises(ValueError, match="not divisible"):
        Connector(DV, 64, heads=5)


def test_swapping_images_swaps_exactly_their_blocks(tiny_models, tokenizer):
    vlm = make_vlm(tiny_models, tokenizer)
    feats = torch.randn(2, P, DV)
    b = batch_for(tokenizer, two_image_record(), feats)
    e1 = vlm.embed(b["input_ids"], b["media"])[0]
    b["media"]["image"]["features"] = feats.flip(0)
    e2 = vlm.embed(b["input_ids"], b["media"])[0]
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    slots = (b["input_ids"][0] == pad).nonzero().squeeze(1)
    blk1, blk2 = slots[:N], slots[N:]
    assert torch.equal(e1[blk1], e2[blk2]) and torch.equal(e1[blk2], e2[blk1])
    assert not torch.equal(e1[blk1], e1[blk2])
    other = torch.ones(e1.shape[0], dtype=torch.bool)
    other[slots] = False
    assert torch.equal(e1[other], e2[other])  # text rows untouched
    # the k-th block holds exactly connector(features[k])
    tokens = vlm.connectors["image"](feats)
    torch.testing.assert_close(e1[blk1], tokens[0])
    torch.testing.assert_close(e1[blk2], tokens[1])


def test_splice_by_index_equals_masked_scatter(tiny_models, tokenizer):
    """The splice writes connector tokens with index_copy at the loader's slot positions (backward:
    a gather, no host sync); it equals the masked_scatter it replaced, with or without given slots."""
    vlm = make_vlm(tiny_models, tokenizer)
    b = batch_for(tokenizer, two_image_record(), torch.randn(2, P, DV))
    ids, pad = b["input_ids"], tokenizer.convert_tokens_to_ids("<|image_pad|>")
    tokens = vlm.connectors["image"](b["media"]["image"]["features"])
    want = vlm.llm.get_input_embeddings()(ids).masked_scatter((ids == pad).unsqueeze(-1), tokens)
    slots = (ids.reshape(-1) == pad).nonzero().squeeze(1)
    with_slots = {"image": dict(b["media"]["image"], slots=slots)}
    assert torch.equal(vlm.embed(ids, b["media"]), want)
    assert torch.equal(vlm.embed(ids, with_slots), want)


def test_slot_image_mismatch_names_the_sample(tiny_models, tokenizer):
    vlm = make_vlm(tiny_models, tokenizer)
    b = batch_for(tokenizer, two_image_record(), torch.randn(2, P, DV))
    b["media"] = {"image": {"features": torch.randn(1, P, DV), "counts": torch.tensor([1])}}
    with pytest.raises(SpliceError, match=r"\['two'\].*8 image slots.*1 image"):
        vlm(**b)
    b["media"] = {"image": {"features": torch.randn(3, P, DV), "counts": torch.tensor([3])}}
    with pytest.raises(SpliceError, match="two"):
        vlm(**b)


def test_frozen_llm_only_connector_gets_gradients(tiny_models, tokenizer):
    vlm = make_vlm(tiny_models, tokenizer, "frozen")
    b = batch_for(tokenizer, two_image_record(), torch.randn(2, P, DV))
    out = vlm(**b)
    assert out["num_supervised"] == b["targets"].ne(IGNORE).sum().item()
    out["loss_sum"].backward()
    with_grad = {n for n, p in vlm.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, _ in vlm.named_parameters() if n.startswith("connectors.")}
    assert all(vlm.get_parameter(n).grad.abs().sum() > 0 for n in with_grad
               if "latents" in n or "projector" in n)


def test_gradient_checkpointing_with_frozen_llm_reaches_connector(tiny_models, tokenizer):
    torch.manual_seed(0)
    llm = load_llm(tiny_models["llm"], "frozen", dtype=torch.float32, gradient_checkpointing=True)
    vlm = build_vlm(llm, tokenizer, DV, P, dict(num_latents=N, depth=1, heads=4), dtype=torch.float32)
    set_trainable(vlm, "frozen")
    vlm.train()
    vlm(**batch_for(tokenizer, two_image_record(), torch.randn(2, P, DV)))["loss_sum"].backward()
    assert vlm.connectors["image"].projector[0].weight.grad.abs().sum() > 0


def test_text_only_batch_still_runs_the_connector(tiny_models, tokenizer):
    vlm = make_vlm(tiny_models, tokenizer)
    r = {"id": "t", "images": [], "conversations": [{"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": "Hello there."}]}
    b = batch_for(tokenizer, r, torch.zeros(0, P, DV))
    vlm(**b)["loss_sum"].backward()
    # every connector parameter took part (zero gradient), as ZeRO-3 needs on every rank
    grads = [p.grad for p in vlm.connectors.parameters()]
    assert all(g is not None for g in grads) and all(g.abs().sum() == 0 for g in grads)


@pytest.mark.parametrize("mode,expect", [
    ("frozen", lambda n: n.startswith("connectors.")),
    ("lora", lambda n: n.startswith("connectors.") or ("lora_A" in n or "lora_B" in n)),
    ("qlora", lambda n: n.startswith("connectors.") or ("lora_A" in n or "lora_B" in n)),
    ("full", lambda n: True),
])
def test_exact_trainable_set_per_mode(tiny_models, tokenizer, mode, expect):
    vlm = make_vlm(tiny_models, tokenizer, mode)
    names = [n for n, _ in vlm.named_parameters()]
    trainable = {n for n, p in vlm.named_parameters() if p.requires_grad}
    assert trainable == {n for n in names if expect(n)}
    if mode in ("lora", "qlora"):
        layers = vlm.llm.get_base_model().config.num_hidden_layers
        assert len([n for n in trainable if "lora_A" in n]) == 7 * layers  # q k v o gate up down
    table = trainable_table(vlm)
    assert "connectors.image.projector" in table and "trainable" in table


@pytest.mark.parametrize("n_images", [0, 1, 3])
@pytest.mark.parametrize("template", ["plain", "chatml"])
def test_generation_with_0_1_3_images(tiny_models, tokenizer, n_images, template):
    vlm = make_vlm(tiny_models, tokenizer).eval()
    enc = PromptEncoder(tokenizer, template, N)
    ids, counts = enc.encode_prompt([{"role": "user", "content": "<image> " * n_images + "What?"}])
    assert counts["image"] == n_images
    media = {"image": {"features": torch.randn(n_images, P, DV), "counts": torch.tensor([n_images])}}
    greedy = [vlm.generate(torch.tensor([ids]), media, max_new_tokens=6) for _ in range(2)]
    assert greedy[0].shape == (1, 6) and torch.equal(greedy[0], greedy[1])
    sampled = vlm.generate(torch.tensor([ids]), media, max_new_tokens=6, do_sample=True,
                           temperature=1.0, top_p=0.9)
    assert sampled.shape[1] <= 6
    assert isinstance(tokenizer.decode(greedy[0][0]), str)


def test_connector_export_round_trip(tiny_models, tokenizer, tmp_path):
    vlm = make_vlm(tiny_models, tokenizer)
    save_connectors(vlm, tmp_path)
    fresh = make_vlm(tiny_models, tokenizer)
    with torch.no_grad():
        for p in fresh.connectors.parameters():
            p.add_(1.0)
    load_connectors(fresh, tmp_path)
    b = batch_for(tokenizer, two_image_record(), torch.randn(2, P, DV))
    torch.testing.assert_close(vlm(**b)["loss_sum"], fresh(**b)["loss_sum"], rtol=0, atol=0)


def test_lm_head_runs_the_requested_number_of_chunks(tiny_models, tokenizer):
    """Under ZeRO-3 every lm_head call is a collective: the caller fixes the count for all ranks."""
    vlm = make_vlm(tiny_models, tokenizer)
    b = batch_for(tokenizer, two_image_record(), torch.randn(2, P, DV))
    calls = []
    head = vlm.llm.get_output_embeddings()
    hook = head.register_forward_hook(lambda *a: calls.append(1))
    ref = vlm(**b)["loss_sum"]
    assert len(calls) == 1
    calls.clear()
    torch.testing.assert_close(vlm(**b, num_ce_chunks=3)["loss_sum"], ref)  # extra chunks are empty
    assert len(calls) == 3
    hook.remove()


# -- selective activation checkpointing and fused kernels ---------------------------------------
def test_checkpoint_fraction_recomputes_that_share_of_layers_with_the_same_gradients(tiny_models, tmp_path):
    """--model.checkpoint_fraction=0.5: exactly every other decoder layer runs its forward again in
    backward, and the gradients equal those of a run that keeps every activation."""
    from transformers import AutoConfig

    from vlm_dist.model.build import checkpointed_layers
    from vlm_dist.testing.tiny import build_tiny_qwen3

    vocab = AutoConfig.from_pretrained(tiny_models["llm"]).vocab_size
    build_tiny_qwen3(tmp_path / "llm4", vocab, num_layers=4)
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    grads, counts = {}, {}
    for checkpointing in (False, True):
        llm = load_llm(str(tmp_path / "llm4"), "full", dtype=torch.float32,
                       gradient_checkpointing=checkpointing, checkpoint_fraction=0.5)
        llm.train()
        layers = llm.model.layers
        calls = [0] * len(layers)
        for i, layer in enumerate(layers):   # attention runs inside the layer's (re)computed forward
            layer.self_attn.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        llm(input_ids=ids, labels=ids).loss.backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in llm.named_parameters()}
        counts[checkpointing] = calls
    assert counts[False] == [1, 1, 1, 1]
    assert counts[True] == [2, 1, 2, 1] and checkpointed_layers(4, 0.5) == [0, 2]
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        torch.testing.assert_close(grads[True][name], g, rtol=1e-5, atol=1e-6, msg=name)
    assert checkpointed_layers(36, 1.0) == list(range(36)) and checkpointed_layers(36, 0.25) == list(range(0, 36, 4))
    assert len(checkpointed_layers(36, 0.75)) == 27 and checkpointed_layers(3, 0.01) == [0]


def test_kernels_auto_is_none_without_cuda_and_liger_is_refused_naming_the_flag(tiny_models, monkeypatch):
    from vlm_dist.config import ConfigError
    from vlm_dist.model.build import resolve_kernels

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    kernels, why = resolve_kernels("auto")
    assert kernels == "none" and "no CUDA" in why
    assert resolve_kernels("none")[0] == "none"
    llm = load_llm(tiny_models["llm"], "frozen", dtype=torch.float32, kernels="auto")
    assert type(llm.model.layers[0].mlp).__name__ == "Qwen3MLP"   # untouched
    with pytest.raises(ConfigError, match=r"--model\.kernels=liger needs a CUDA GPU"):
        load_llm(tiny_models["llm"], "frozen", dtype=torch.float32, kernels="liger")


def test_kernels_liger_patches_the_qwen3_instance_before_peft_wraps_it(tiny_models, monkeypatch):
    """With CUDA and liger-kernel present (both faked here), --model.kernels=liger hands the plain
    Qwen3ForCausalLM to Liger's Qwen3 patch (RMSNorm, RoPE, SwiGLU; its losses off), then PEFT wraps it."""
    import sys
    import types

    import peft

    from vlm_dist.config import ConfigError, LoraConfig
    from vlm_dist.model.build import resolve_kernels

    events = []

    def apply_liger_kernel_to_qwen3(**kwargs):
        events.append(("liger", type(kwargs.pop("model")).__name__, kwargs))

    real_get_peft_model = peft.get_peft_model

    def get_peft_model(model, *args, **kwargs):
        events.append(("peft", type(model).__name__))
        return real_get_peft_model(model, *args, **kwargs)

    fake = types.ModuleType("liger_kernel")
    fake.transformers = types.ModuleType("liger_kernel.transformers")
    fake.transformers.apply_liger_kernel_to_qwen3 = apply_liger_kernel_to_qwen3
    monkeypatch.setitem(sys.modules, "liger_kernel", fake)
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", fake.transformers)
    monkeypatch.setattr(peft, "get_peft_model", get_peft_model)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    assert resolve_kernels("auto")[0] == "liger"
    llm = load_llm(tiny_models["llm"], "lora", dtype=torch.float32, lora=LoraConfig(r=4, alpha=8),
                   kernels="liger")
    assert events == [
        ("liger", "Qwen3ForCausalLM", dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                           fused_linear_cross_entropy=False)),
        ("peft", "Qwen3ForCausalLM")]
    assert type(llm).__name__.startswith("Peft")
    # a model Liger's Qwen3 patch does not cover is refused, naming the flag
    from vlm_dist.model.build import apply_kernels
    llm.get_base_model().config.model_type = "llama"
    with pytest.raises(ConfigError, match=r"--model\.kernels=liger patches Qwen3 models.*--model\.kernels=none"):
        apply_kernels(llm.get_base_model(), "liger", "some/llama")
