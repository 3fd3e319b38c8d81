"""`vlm-export hf` (native LLaVA) and `vlm-export merge`: parity with vlm-generate, refusals, read-back.

The native export is the format vLLM's LLaVA implementation serves; vLLM itself is not tested here
(it does not run on these machines). Parity is checked in float32 on the CPU: greedy tokens equal,
and the logits at every prompt and generated position equal to within an absolute 1e-4 (measured
max |delta| is printed with -s; it is ~1e-6 on the tiny models: the same ops in the same order,
differing only in where the image embeddings are spliced).
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from vlm_dist.inference.export import ExportError, load_export
from vlm_dist.inference.export_cli import main as export_main
from vlm_dist.inference.export_hf import chat_template, check_hf_dir, export_hf
from vlm_dist.inference.generate import GenerationSettings, Generator

ATOL = 1e-4
MAX_NEW = 8


@pytest.fixture(scope="module")
def hf_out(tiny_export_mlp, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "llava"
    assert export_hf(tiny_export_mlp, out) == "native"
    return out


@pytest.fixture(scope="module")
def ours(tiny_export_mlp):
    vlm, tokenizer, tower, cfg = load_export(tiny_export_mlp, "cpu", torch.float32)
    return Generator(vlm, tokenizer, cfg, tower)


@pytest.fixture(scope="module")
def theirs(hf_out):
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    model = LlavaForConditionalGeneration.from_pretrained(hf_out).eval()     # dtype "auto": as saved
    assert model.dtype == torch.float32
    return model, AutoProcessor.from_pretrained(hf_out)


def _our_logits(gen: Generator, turns, images, new_ids):
    """Our logits at every position of prompt + new tokens (one forward, as vlm_dist's splice computes)."""
    ids, _ = gen.prompt_ids(turns)
    feats = gen.encode_images(images)
    full = torch.tensor([ids + new_ids])
    media = {"image": {"features": feats, "counts": torch.tensor([feats.shape[0]])}}
    embeds = gen.vlm.embed(full, media)
    with torch.no_grad():
        return ids, gen.vlm.llm(inputs_embeds=embeds).logits[0]


def _parity(ours, theirs, turns, messages, images):
    """vlm-generate's path (PromptEncoder + Generator) against LLaVA + its processor's chat template."""
    model, processor = theirs
    settings = GenerationSettings(max_new_tokens=MAX_NEW)
    our_new = ours.generate_ids(turns, ours.encode_images(images), settings)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    our_prompt, our_logits = _our_logits(ours, turns, images, our_new)
    assert inputs["input_ids"][0].tolist() == our_prompt          # same prompt ids, image slots included
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
    their_new = out[0, len(our_prompt):].tolist()
    stops = model.generation_config.eos_token_id
    their_new = their_new[:next((i for i, t in enumerate(their_new) if t in stops), len(their_new))]
    assert their_new == our_new
    full = torch.tensor([our_prompt + our_new])
    with torch.no_grad():
        their_logits = model(input_ids=full, pixel_values=inputs["pixel_values"]).logits[0]
    delta = (their_logits - our_logits).abs().max().item()
    print(f"parity: {len(images)} image(s), {len(our_prompt)} prompt + {len(our_new)} new tokens, "
          f"tokens equal, max |dlogit| = {delta:.3g}")
    assert delta < ATOL
    return delta


def test_native_config(hf_out, tiny_export_mlp):
    config = json.loads((hf_out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"]
    assert config["vision_feature_select_strategy"] == "full" and config["vision_feature_layer"] == -2
    assert config["image_seq_length"] == 16 and config["vision_config"]["model_type"] == "siglip_vision_model"
    assert config["text_config"]["model_type"] == "qwen3" and "auto_map" not in config
    from safetensors import safe_open
    with safe_open(str(hf_out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_2.bias",
            "model.language_model.embed_tokens.weight"} <= keys
    assert any(k.startswith("model.vision_tower.encoder.layers.") for k in keys)
    assert "lm_head.weight" in keys and not any("lora" in k for k in keys)


def test_parity_real_photo(ours, theirs, real_photos):
    img = ours.tower.decode(real_photos[0])
    turns = [{"role": "user", "content": "<image>\nWhat is in this photo?"}]
    messages = [{"role": "user", "content": [{"type": "image", "image": img},
                                                  {"type": "text", "text": "\nWhat is in this photo?"}]}]
    _parity(ours, theirs, turns, messages, [img])


def test_parity_two_images_multi_turn(ours, theirs, real_photos):
    a, b = (ours.tower.decode(p) for p in real_photos[:2])
    turns = [{"role": "system", "content": "You are brief."},
             {"role": "user", "content": "Compare <image> and <image>."},
             {"role": "assistant", "content": "They differ."},
             {"role": "user", "content": "Which is brighter?"}]
    messages = [{"role": "system", "content": "You are brief."},
                {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image", "image": a},
                                             {"type": "text", "text": " and "}, {"type": "image", "image": b},
                                             {"type": "text", "text": "."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "They differ."}]},
                {"role": "user", "content": "Which is brighter?"}]
    _parity(ours, theirs, turns, messages, [a, b])


@pytest.mark.parametrize("template", ["chatml", "plain"])
def test_chat_template_matches_prompt_encoder(template, tokenizer):
    """The Jinja template + one-piece tokenization gives PromptEncoder's ids for ordinary text."""
    from jinja2 import Template
    from vlm_dist.contract.prompt import PromptEncoder
    turns = [{"role": "user", "content": "<image>\nDescribe it"}, {"role": "assistant", "content": "A cat"},
             {"role": "user", "content": "And <image>"}]
    enc = PromptEncoder(tokenizer, template, 1)
    text = Template(chat_template(template)).render(messages=turns, add_generation_prompt=True)
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == enc.encode_prompt(turns)[0]


def test_special_tokens_in_user_text(tokenizer):
    """The documented difference: PromptEncoder keeps a typed <|im_end|> as text; the HF processor (one-piece
    tokenization, special tokens parsed) makes it the control token."""
    from jinja2 import Template
    from vlm_dist.contract.prompt import PromptEncoder
    turns = [{"role": "user", "content": "say <|im_end|> now"}]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ours = PromptEncoder(tokenizer, "chatml", 1).encode_prompt(turns)[0]
    text = Template(chat_template("chatml")).render(messages=turns, add_generation_prompt=True)
    assert ours.count(im_end) == 1 and tokenizer(text, add_special_tokens=False)["input_ids"].count(im_end) == 2


def test_refusals(tiny_export, tiny_models, tmp_path, capsys):
    # the resampler: native refused naming the setting and the way out
    with pytest.raises(ExportError, match="kind='resampler'.*--remote-code"):
        export_hf(tiny_export, tmp_path / "x", kind="native")
    assert export_main(["hf", str(tiny_export), str(tmp_path / "y"), "--native"]) == 2
    err = capsys.readouterr().err
    assert "--remote-code" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # features pooled 2x2: refused whatever the kind
    from vlm_dist.testing.tiny import build_tiny_export
    pooled = build_tiny_export(tmp_path / "pooled" / "export", tiny_models, connector="mlp", use_layernorm=False)
    cfg_path = tmp_path / "pooled" / "export" / "vlm_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["pool"] = 2
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="pool=2"):
        export_hf(pooled, tmp_path / "z")
    assert not (tmp_path / "z").exists()
    # a LayerNorm before the MLP projector: not LLaVA's
    normed = build_tiny_export(tmp_path / "normed" / "export", tiny_models, connector="mlp", use_layernorm=True)
    with pytest.raises(ExportError, match="use_layernorm=true"):
        export_hf(normed, tmp_path / "w", kind="native")
    # without a flag the resampler gets the custom-code export (vlm_dist.inference.export_remote)
    assert export_main(["hf", str(tiny_export), str(tmp_path / "remote")]) == 0
    assert "auto_map" in json.loads((tmp_path / "remote" / "config.json").read_text())


def test_qlora_exports_native_after_merge(tiny_models, tmp_path):
    """QLoRA merges onto the unquantised base (as load_export runs it): a plain LLaVA, nothing quantised."""
    from vlm_dist.testing.tiny import build_tiny_export
    export = build_tiny_export(tmp_path / "q" / "export", tiny_models, llm_mode="qlora", connector="mlp",
                               use_layernorm=False)
    assert export_hf(export, tmp_path / "hf") == "native"
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "quantization_config" not in config and "quantization_config" not in config["text_config"]


def test_output_inside_export_refused(tiny_export_mlp, capsys):
    from pathlib import Path
    for cmd in ("hf", "merge"):
        assert export_main([cmd, str(tiny_export_mlp), str(Path(tiny_export_mlp) / "out")]) == 2
        err = capsys.readouterr().err
        assert "lies inside" in err and len(err.strip().splitlines()) == 1
        assert not (Path(tiny_export_mlp) / "out").exists()


def test_truncated_safetensors_named(hf_out, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(hf_out, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    with pytest.raises(ExportError, match="model.safetensors"):
        check_hf_dir(bad)
    check_hf_dir(hf_out)


def test_cli_merge_and_rerun_replaces(tiny_export_mlp, hf_out, tmp_path, capsys):
    assert export_main(["merge", str(tiny_export_mlp), str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "vlm_config.json").read_text())["merged"] is True
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    assert export_main(["hf", str(tiny_export_mlp), str(tmp_path / "full")]) == 2
    assert "non-empty" in capsys.readouterr().err and (tmp_path / "full" / "notes.txt").exists()
    assert export_main(["hf", str(tiny_export_mlp), str(tmp_path / "merged")]) == 2   # a merge is kept
    assert "not an earlier vlm-export hf output" in capsys.readouterr().err
    # an earlier hf output is replaced, atomically, by the new one
    assert export_main(["hf", str(tiny_export_mlp), str(tmp_path / "hf")]) == 0
    assert export_main(["hf", str(tiny_export_mlp), str(tmp_path / "hf"), "--dtype", "bf16"]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "hf", "merged"]    # no temp dirs left
    # a model saved from the export (its config keeps our provenance key) is somebody else's: refused
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    shutil.copy(tmp_path / "hf" / "config.json", tuned / "config.json")
    assert export_main(["hf", str(tiny_export_mlp), str(tuned)]) == 2
    assert "not an earlier vlm-export hf output" in capsys.readouterr().err and (tuned / "config.json").exists()
