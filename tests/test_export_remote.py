"""The transformers custom-code export (vlm_dist.inference.export_remote): loaded by stock transformers
with trust_remote_code, it gives vlm-generate's greedy tokens and logits, on real photos, one and two
images per prompt, for the Perceiver resampler and for an MLP connector with a LayerNorm before it.

    python -m pytest tests/test_export_remote.py -q
"""
from __future__ import annotations

import ast
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

ATOL = 1e-5   # fp32 logits; measured max |diff| ~1e-6 (LoRA unmerged in vlm-generate, merged in the export)
MAX_NEW = 8

PROMPTS = {   # our turns, with <image> placeholders (what vlm-generate takes)
    "one_photo": [{"role": "user", "content": "<image>\nDescribe the image in one sentence."}],
    "two_photos": [{"role": "user", "content": "Image 1: <image> Image 2: <image> Which image shows the red square?"}],
    "multi_turn": [{"role": "system", "content": "Answer in one sentence."},
                   {"role": "user", "content": "<image>\nDescribe the image."},
                   {"role": "assistant", "content": "A photo of a red circle on the left."},
                   {"role": "user", "content": "And this one? <image>"}],
}


def write_export(export_dir, out_dir) -> Path:
    """`vlm-export hf EXPORT OUT` for a custom-code export (export_hf -> export_remote)."""
    from vlm_dist.inference.export_hf import export_hf
    assert export_hf(export_dir, out_dir, kind="remote-code") == "remote-code"
    return Path(out_dir)


@pytest.fixture(scope="module")
def remote_resampler(tiny_export, tmp_path_factory):
    return write_export(tiny_export, tmp_path_factory.mktemp("remote") / "resampler")


@pytest.fixture(scope="module")
def export_mlp_ln(tiny_models, tmp_path_factory):
    """LLaVA's projector cannot hold this one: an MLP connector with a LayerNorm before it."""
    from vlm_dist.testing.tiny import build_tiny_export
    return build_tiny_export(tmp_path_factory.mktemp("mlp_ln") / "export", tiny_models, connector="mlp",
                             use_layernorm=True)


@pytest.fixture(scope="module")
def remote_mlp_ln(export_mlp_ln, tmp_path_factory):
    return write_export(export_mlp_ln, tmp_path_factory.mktemp("remote") / "mlp_ln")


def hf_messages(turns: list[dict], images: list) -> list[dict]:
    """Our turns as transformers chat messages: the text split at <image>, images (paths or PIL images)
    as content parts."""
    images = iter(images)
    out = []
    for turn in turns:
        parts = []
        for i, piece in enumerate(turn["content"].split("<image>")):
            if i:
                image = next(images)
                parts.append({"type": "image", "path": image} if isinstance(image, str) else
                             {"type": "image", "image": image})
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": turn["role"], "content": parts})
    return out


def measure_parity(export_dir, hf_dir, photos: list[str], turns: list[dict]) -> dict:
    """vlm-generate's Generator against the transformers-loaded export on one prompt."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vlm_dist.inference.export import load_export
    from vlm_dist.inference.generate import GenerationSettings, Generator

    vlm, tokenizer, tower, cfg = load_export(export_dir, "cpu", torch.float32)
    gen = Generator(vlm, tokenizer, cfg, tower)
    images = [tower.decode(p, name=p) for p in photos]
    features = gen.encode_images(images)
    ours = gen.generate_ids(turns, features, GenerationSettings(max_new_tokens=MAX_NEW))
    prompt, _ = gen.prompt_ids(turns)

    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), trust_remote_code=True, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(hf_dir), trust_remote_code=True)
    inputs = processor.apply_chat_template(hf_messages(turns, photos), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")   # the export decodes the files
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False, output_logits=True,
                         return_dict_in_generate=True)
    theirs = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    for i, t in enumerate(theirs):          # generate() keeps the stop token; vlm-generate cuts it
        if t in gen.stop_ids:
            theirs = theirs[:i]
            break

    # logits at every position of prompt + reply, one forward each side (vlm-generate's splice and LLM)
    seq = torch.tensor([prompt + ours])
    media = {"image": {"features": features, "counts": torch.tensor([len(images)])}}
    with torch.no_grad():
        ours_logits = vlm.llm(inputs_embeds=vlm.embed(seq, media), attention_mask=torch.ones_like(seq)).logits[0]
        their_logits = model(input_ids=seq, pixel_values=inputs["pixel_values"],
                             attention_mask=torch.ones_like(seq)).logits[0]
    steps = torch.stack(out.logits[:len(ours)], dim=1)[0]        # generate()'s own, through its KV cache
    at = slice(len(prompt) - 1, len(prompt) - 1 + len(ours))
    return {"prompt_equal": inputs["input_ids"][0].tolist() == prompt, "ours": ours, "theirs": theirs,
            "forward_max_abs": (ours_logits - their_logits).abs().max().item(),
            "generate_max_abs": (steps - ours_logits[at]).abs().max().item(),
            "positions": seq.shape[1], "image_slots": int((seq == model.config.image_token_id).sum())}


@pytest.mark.parametrize("prompt", sorted(PROMPTS))
@pytest.mark.parametrize("connector", ["resampler", "mlp_ln"])
def test_parity_with_vlm_generate(connector, prompt, request, real_photos):
    export_dir = request.getfixturevalue("tiny_export" if connector == "resampler" else "export_mlp_ln")
    hf_dir = request.getfixturevalue(f"remote_{connector}")
    turns = PROMPTS[prompt]
    n_images = sum(t["content"].count("<image>") for t in turns)
    r = measure_parity(export_dir, hf_dir, real_photos[:n_images], turns)
    print(f"\n{connector}/{prompt}: tokens equal={r['ours'] == r['theirs']} ({len(r['ours'])} tokens), "
          f"max|dlogit| forward={r['forward_max_abs']:.2e} generate={r['generate_max_abs']:.2e} "
          f"over {r['positions']} positions")
    tokens_per_image = json.loads((Path(hf_dir) / "config.json").read_text())["image_seq_length"]
    assert r["image_slots"] == n_images * tokens_per_image
    assert r["prompt_equal"], "the processor's chat template gives other token ids than training's template"
    assert len(r["ours"]) > 0 and r["ours"] == r["theirs"]
    assert r["forward_max_abs"] < ATOL and r["generate_max_abs"] < ATOL


def test_export_layout(remote_resampler):
    """config.json names the classes for the Auto API; the code files import only torch and transformers
    (and transformers' own image dependencies): transformers copies them into its modules cache."""
    config = json.loads((remote_resampler / "config.json").read_text())
    assert config["architectures"] == ["VlmDistForConditionalGeneration"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_vlm_dist.VlmDistConfig",
        "AutoModel": "modeling_vlm_dist.VlmDistForConditionalGeneration",
        "AutoModelForImageTextToText": "modeling_vlm_dist.VlmDistForConditionalGeneration"}
    assert config["vision_feature_select_strategy"] == "full" and config["vision_feature_layer"] == -2
    assert config["connector_config"]["kind"] == "resampler" and config["image_seq_length"] == 4
    processor = json.loads((remote_resampler / "processor_config.json").read_text())
    assert processor["auto_map"] == {"AutoProcessor": "processing_vlm_dist.VlmDistProcessor"}
    for name in ("configuration_vlm_dist.py", "modeling_vlm_dist.py", "processing_vlm_dist.py"):
        tree = ast.parse((remote_resampler / name).read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree)
                  if isinstance(n, ast.ImportFrom) and n.level == 0}
        # torch, transformers and what transformers' image stack itself needs; the standard library
        assert roots - set(sys.stdlib_module_names) <= {"torch", "transformers", "huggingface_hub", "numpy",
                                                        "PIL"}, (name, roots)


def test_auto_model_loads_the_same_model(remote_resampler, real_photos):
    """AutoModel gives the generating class too (as remote-code VLMs do), with the same weights;
    the file's keys are exactly the model's."""
    from transformers import AutoModel, AutoModelForImageTextToText

    a = AutoModel.from_pretrained(str(remote_resampler), trust_remote_code=True, dtype=torch.float32)
    b, info = AutoModelForImageTextToText.from_pretrained(str(remote_resampler), trust_remote_code=True,
                                                          dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info     # every weight in the file has its place, none is missing
    assert type(a).__name__ == "VlmDistForConditionalGeneration" and a.can_generate()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_vision_tower_keeps_the_cache_dtype(tiny_export, tmp_path, real_photos):
    """Features in the dtype the training cache was built in: a bf16 tower stays bf16 in an fp32 model,
    and gives vlm-generate's features and logits."""
    from transformers import AutoModelForImageTextToText

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    cfg_path = export / "vlm_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), vision_dtype="bfloat16")))
    hf_dir = write_export(export, tmp_path / "hf")
    model = AutoModelForImageTextToText.from_pretrained(str(hf_dir), trust_remote_code=True, dtype=torch.float32)
    assert model.model.vision_tower.dtype == torch.bfloat16
    assert model.lm_head.weight.dtype == torch.float32 and model.dtype == torch.float32
    r = measure_parity(export, hf_dir, real_photos[:1], PROMPTS["one_photo"])
    assert r["prompt_equal"] and r["ours"] == r["theirs"]
    assert r["forward_max_abs"] < ATOL and r["generate_max_abs"] < ATOL


def test_jpeg_decoded_as_the_cache_did(tiny_export, tmp_path, real_photos):
    """An export whose cache decoded JPEGs in draft mode: the processor decodes a photo's file the same
    way, so its pixels are the tower's (and differ from a full decode)."""
    from transformers import AutoProcessor

    from vlm_dist.inference.export import load_export

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    cfg_path = export / "vlm_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), jpeg_draft_to=64)))
    hf_dir = write_export(export, tmp_path / "hf")
    _, _, tower, _ = load_export(export, "cpu", torch.float32)
    assert tower.draft_to == 64
    processor = AutoProcessor.from_pretrained(str(hf_dir), trust_remote_code=True)
    theirs = processor(text="<|image_pad|>", images=[real_photos[0]], return_tensors="pt")["pixel_values"]
    assert torch.equal(theirs, tower.preprocess([tower.decode(real_photos[0])]))
    tower.draft_to = None
    assert not torch.equal(theirs, tower.preprocess([tower.decode(real_photos[0])]))


def test_connector_code_is_ours(tiny_export):
    """The exported connector is vlm_dist's Connector, parameter for parameter and output for output."""
    from vlm_dist.inference.remote_code.modeling_vlm_dist import VlmDistConnector
    from vlm_dist.model.connector import Connector

    torch.manual_seed(0)
    for spec in (dict(kind="resampler", num_latents=3, depth=2, heads=4, resampler_dim=16),
                 dict(kind="mlp", use_layernorm=True), dict(kind="mlp", use_layernorm=False)):
        ours = Connector(vision_dim=32, llm_dim=24, **spec)
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        theirs = VlmDistConnector(**ours.config)
        theirs.load_state_dict(ours.state_dict(), strict=True)
        x = torch.randn(2, 16, 32)
        assert torch.equal(ours(x), theirs(x)), spec


def test_pooled_features_are_refused(tiny_export, tmp_path):
    """Features pooled 2x2 have no expression in the export: refused, naming the setting."""
    from vlm_dist.inference.export import ExportError

    export = tmp_path / "export"
    shutil.copytree(tiny_export, export)
    cfg_path = export / "vlm_config.json"
    cfg_path.write_text(json.dumps(dict(json.loads(cfg_path.read_text()), pool=2)))
    with pytest.raises(ExportError, match="pool=2"):
        write_export(export, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]     # nothing published, nothing left


def test_typed_control_tokens_stay_text(tiny_export, remote_resampler, real_photos):
    """With sanitize_control_tokens=True a user typing <|image_pad|> or <|im_end|> gets the text tokens
    vlm-generate gives (split_special_tokens), never an image slot or a turn end."""
    from transformers import AutoProcessor

    from vlm_dist.inference.export import load_export
    from vlm_dist.inference.generate import Generator

    vlm, tokenizer, tower, cfg = load_export(tiny_export, "cpu", torch.float32, with_vision=False)
    turns = [{"role": "user", "content": "<image>\nIs <|image_pad|> or <|im_end|> here?"}]
    processor = AutoProcessor.from_pretrained(str(remote_resampler), trust_remote_code=True)
    inputs = processor.apply_chat_template(hf_messages(turns, real_photos[:1]), add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt", sanitize_control_tokens=True)
    prompt, _ = Generator(vlm, tokenizer, cfg).prompt_ids(turns)
    assert inputs["input_ids"][0].tolist() == prompt
    assert int((inputs["input_ids"] == vlm.pad_ids["image"]).sum()) == cfg.num_media_tokens
