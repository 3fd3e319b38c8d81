"""Export round trip: generation from an export (and from its merged form) equals the training-time model.

    python -m pytest tests/test_export.py -q
"""
import json

import pytest
import torch
from PIL import Image

from vlm_dist.checkpoint import write_export
from vlm_dist.export import ExportError, load_export, merge_export, read_export_config
from vlm_dist.generate_cli import build_conversation, main as generate_main
from vlm_dist.inference import GenerationSettings, Generator
from vlm_dist.model.build import LoraSettings, build_vlm, load_llm, set_trainable
from vlm_dist.model.vision import VisionTower
from vlm_dist.prompt import PromptEncoder

N = 4  # visual tokens per image


def _images():
    return [Image.new("RGB", (40, 40), c) for c in ((220, 30, 30), (30, 60, 220))]


def _turns():
    return [{"role": "user", "content": "Image 1: <image>\nImage 2: <image>\nDescribe each image in order."}]


def _vlm_config(tiny_models, llm_mode):
    return {"llm": tiny_models["llm"], "vision": tiny_models["vision"], "feature_layer": -2, "pool": False,
            "template": "chatml", "num_media_tokens": N, "vision_dtype": "float32"}


@pytest.fixture(scope="module")
def trained(tiny_models, tokenizer, tmp_path_factory):
    """A 'training-time' LoRA VLM with non-trivial adapter and connector weights, and its export."""
    torch.manual_seed(0)
    llm = load_llm(tiny_models["llm"], "lora", dtype=torch.float32, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
    vlm = build_vlm(llm, tokenizer, vision_dim=32, num_patches=16,
                    connector=dict(num_latents=N, depth=1, heads=4), dtype=torch.float32)
    set_trainable(vlm, "lora")
    with torch.no_grad():   # LoRA B starts at zero: give the adapter a real effect
        for name, p in vlm.llm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    vlm.eval()
    out = tmp_path_factory.mktemp("export") / "export"
    write_export(vlm, out, _vlm_config(tiny_models, "lora"), "lora", is_main=True)
    return vlm, out


def _reference_ids(vlm, tokenizer, tiny_models, max_new_tokens=12):
    """Generation the way the training-time code sees it: its own tower, encoder and vlm.generate."""
    tower = VisionTower.from_pretrained(tiny_models["vision"], feature_layer=-2, dtype=torch.float32)
    feats = tower(tower.preprocess(_images()))
    ids, _ = PromptEncoder(tokenizer, "chatml", N).encode_prompt(_turns())
    media = {"image": {"features": feats, "counts": torch.tensor([2])}}
    out = vlm.generate(torch.tensor([ids]), media, max_new_tokens=max_new_tokens, eos_token_id=[],
                       pad_token_id=tokenizer.pad_token_id)
    return out[0].tolist()


def _export_ids(export_dir, max_new_tokens=12):
    vlm, tok, tower, cfg = load_export(export_dir, device="cpu", dtype=torch.float32)
    gen = Generator(vlm, tok, cfg, tower)
    gen.stop_ids = []   # compare every token, even past an accidental stop token
    return gen.generate_ids(_turns(), gen.encode_images(_images()), GenerationSettings(max_new_tokens)), gen


def test_export_generates_what_the_training_model_generates(trained, tokenizer, tiny_models):
    vlm, export_dir = trained
    want = _reference_ids(vlm, tokenizer, tiny_models)
    got, gen = _export_ids(export_dir)
    assert got == want and len(got) == 12
    # the adapter is really in the loaded model: without it the generation differs
    with gen.vlm.llm.disable_adapter():
        plain = gen.generate_ids(_turns(), gen.encode_images(_images()), GenerationSettings(12))
    assert plain != want


def test_merged_export_equals_unmerged(trained, tmp_path):
    _, export_dir = trained
    merged = merge_export(export_dir, tmp_path / "merged")
    cfg = read_export_config(merged)
    assert cfg.merged and cfg.llm == "llm" and (merged / "llm" / "config.json").exists()
    assert not (merged / "adapter").exists() and (merged / "llm" / "tokenizer_config.json").exists()
    got_unmerged, a = _export_ids(export_dir)
    got_merged, b = _export_ids(merged)
    assert got_merged == got_unmerged
    # same logits too, not only the same argmax
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    la = a.vlm.llm(input_ids=ids).logits
    lb = b.vlm.llm(input_ids=ids).logits
    torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
    # the merged directory is self-contained: it still loads after being moved
    moved = tmp_path / "moved"
    merged.rename(moved)
    assert _export_ids(moved)[0] == got_unmerged


def test_generate_cli_streams_the_reply(trained, tmp_path, capsys):
    _, export_dir = trained
    paths = []
    for i, img in enumerate(_images()):
        paths += ["--image", str(tmp_path / f"{i}.png")]
        img.save(tmp_path / f"{i}.png")
    rc = generate_main(["--model", str(export_dir), *paths, "--prompt", "Describe each image in order.",
                        "--max-new-tokens", "5", "--device", "cpu"])
    assert rc == 0
    assert capsys.readouterr().out.strip()   # something was streamed
    rc = generate_main(["--model", str(export_dir), "--image", paths[1], "--prompt", "<image> and <image>",
                        "--device", "cpu"])
    assert rc == 2 and "2 <image> placeholder(s) but 1 --image" in capsys.readouterr().err


def test_build_conversation_places_images():
    assert build_conversation("What is it?", None, 1)[0]["content"] == "<image>\nWhat is it?"
    two = build_conversation("Compare.", None, 2)[0]["content"]
    assert two == "Image 1: <image>\nImage 2: <image>\nCompare."
    chat = [{"role": "user", "content": "<image> hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "more?"}]
    assert build_conversation(None, chat, 1, system="be brief")[0] == {"role": "system", "content": "be brief"}
    with pytest.raises(ValueError, match="end with a user turn"):
        build_conversation(None, chat[:2], 1)


def test_missing_pieces_are_named(trained, tmp_path):
    _, export_dir = trained
    with pytest.raises(ExportError, match="no vlm_config.json"):
        read_export_config(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    cfg = json.loads((export_dir / "vlm_config.json").read_text())
    del cfg["template"]
    (broken / "vlm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="missing key.*template"):
        read_export_config(broken)
    cfg["template"] = "chatml"
    (broken / "vlm_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="no adapter/adapter_config.json"):
        load_export(broken)
