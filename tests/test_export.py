"""Export round trip: generation from an export (and from its merged form) equals the training-time model.

    python -m pytest tests/test_export.py -q
"""
import json

import pytest
import torch
from PIL import Image

from vlm_dist.training.checkpoint import write_export
from vlm_dist.inference.export import ExportError, load_export, merge_export, read_export_config
from vlm_dist.inference.generate_cli import build_conversation, main as generate_main
from vlm_dist.inference.generate import GenerationSettings, Generator
from vlm_dist.config import LoraConfig
from vlm_dist.model.build import build_vlm, load_llm, set_trainable
from vlm_dist.model.vision import VisionTower
from vlm_dist.contract.prompt import PromptEncoder

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
    llm = load_llm(tiny_models["llm"], "lora", dtype=torch.float32, lora=LoraConfig(r=4, alpha=8, dropout=0.0))
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


# -- merge never deletes what it did not make; broken files are named ----------------------------
def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def run_layout(trained, tmp_path):
    """A training run as launch/train.py leaves it: config.yaml, checkpoints/step_N/export, export/."""
    import shutil
    _, export_dir = trained
    run = tmp_path / "run"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "config.yaml").write_text("train: {}\n")
    (run / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    shutil.copytree(export_dir, run / "checkpoints" / "step_00000002" / "export")
    shutil.copytree(export_dir, run / "export")
    return run


@pytest.mark.parametrize("target,why", [
    (".", "contains .*export .*the export it reads"),
    ("export", "is .*export .*the export it reads"),
    ("export/adapter", "lies inside .*export .*the export it reads"),
    ("merged", "lies inside .*run .*training run"),
    ("checkpoints", "lies inside .*run .*training run"),
])
def test_merge_refuses_an_output_in_the_run(run_layout, target, why):
    before = _files(run_layout)
    with pytest.raises(ExportError, match=why):
        merge_export(run_layout / "export", run_layout / target)
    assert _files(run_layout) == before


def test_merge_from_a_checkpoint_export_refuses_its_run(run_layout):
    before = _files(run_layout)
    src = run_layout / "checkpoints" / "step_00000002" / "export"
    with pytest.raises(ExportError, match="contains .*step_00000002/export"):
        merge_export(src, run_layout / "checkpoints")
    with pytest.raises(ExportError, match=f"merged lies inside {run_layout} .that export's training run"):
        merge_export(src, run_layout / "merged")
    assert _files(run_layout) == before


def test_merge_refuses_a_non_empty_directory_it_did_not_make(run_layout, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=f"{other} is a non-empty directory that is not an earlier merge"):
        merge_export(run_layout / "export", other)
    assert (other / "notes.txt").read_text() == "keep me" and _files(other) == ["notes.txt"]


def test_merge_into_a_new_path_and_again_over_its_own_output(run_layout, tmp_path):
    out = tmp_path / "merged" / "sft"
    merge_export(run_layout / "export", out)
    assert read_export_config(out).merged
    first = (out / "llm" / "config.json").stat().st_ino
    merge_export(run_layout / "export", out)           # an earlier merge output: replaced
    assert read_export_config(out).merged and (out / "llm" / "config.json").stat().st_ino != first
    assert [p.name for p in (tmp_path / "merged").iterdir()] == ["sft"]   # no temp dir left beside it


def test_merge_cli_refuses_the_run_dir_with_one_line(run_layout, capsys):
    from vlm_dist.inference.export import main
    assert main(["merge", str(run_layout / "export"), str(run_layout)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlm-export: error: merge output") and len(err.strip().splitlines()) == 1
    assert (run_layout / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt").exists()


BROKEN = {   # what is damaged -> how
    "connector.safetensors": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "adapter/adapter_model.safetensors": lambda p: p.write_bytes(p.read_bytes()[:100]),
    "vlm_config.json": lambda p: p.write_text("{not json"),
}


def broken_copy(export_dir, dest, name):
    import shutil
    shutil.copytree(export_dir, dest)
    BROKEN[name](dest / name)
    return dest


def _cli(module, *args):
    import os
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=300)


def assert_names_the_file(proc, path):
    """Exit 2, no traceback, and one stderr line that names the broken file."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert len([line for line in proc.stderr.splitlines() if str(path) in line]) == 1, proc.stderr[-3000:]


@pytest.mark.parametrize("name", list(BROKEN))
def test_a_broken_export_file_is_named(trained, tmp_path, name):
    _, export_dir = trained
    broken = broken_copy(export_dir, tmp_path / "broken", name)
    reason = "not valid JSON" if name.endswith(".json") else "truncated or not a safetensors file"
    with pytest.raises(ExportError, match=f"{broken / name}: {reason}"):
        merge_export(broken, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    _images()[0].save(tmp_path / "a.png")
    proc = _cli("vlm_dist.inference.generate_cli", "--model", broken, "--image", tmp_path / "a.png", "--prompt", "What?",
                "--max-new-tokens", "2", "--device", "cpu")
    assert_names_the_file(proc, broken / name)
    (tmp_path / "text.jsonl").write_text(json.dumps({"id": "t", "images": [], "conversations": [
        {"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}]}) + "\n")
    proc = _cli("vlm_dist.inference.eval_cli", "--model", broken, "--out", tmp_path / "eval", "--text",
                tmp_path / "text.jsonl", "--device", "cpu")
    assert_names_the_file(proc, broken / name)
    assert not (tmp_path / "eval").exists()


def test_publishing_refuses_a_broken_build_and_keeps_the_old_export(trained, tmp_path):
    from vlm_dist.training.checkpoint import publish_export
    _, export_dir = trained
    broken = broken_copy(export_dir, tmp_path / "broken", "connector.safetensors")
    out = tmp_path / "export"
    publish_export(export_dir, out)
    before = {f: (out / f).read_bytes() for f in _files(out) if (out / f).is_file()}
    with pytest.raises(ExportError, match="connector.safetensors: truncated"):
        publish_export(broken, out)
    assert {f: (out / f).read_bytes() for f in _files(out) if (out / f).is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "export"]   # no temp dir left


# -- sampling ----------------------------------------------------------------------------------
def test_seeded_sampling_repeats_and_leaves_the_global_rng_alone(trained):
    _, export_dir = trained
    vlm, tok, tower, cfg = load_export(export_dir, device="cpu", dtype=torch.float32)
    gen = Generator(vlm, tok, cfg, tower)
    gen.stop_ids = []
    feats = gen.encode_images(_images())
    torch.manual_seed(123)
    state = torch.get_rng_state()

    def sample(seed):
        return gen.generate_ids(_turns(), feats, GenerationSettings(8, do_sample=True, seed=seed))

    first = sample(7)
    assert sample(7) == first and len(first) == 8
    assert torch.equal(torch.get_rng_state(), state)
    # it really samples: across seeds the replies differ, and differ from greedy decoding
    replies = {tuple(sample(s)) for s in range(5)} | {tuple(gen.generate_ids(_turns(), feats, GenerationSettings(8)))}
    assert len(replies) > 1


def test_seeded_sampling_applies_the_llms_top_k():
    """Transformers' own sampling applies generation_config.top_k; the seeded sampler must too."""
    from vlm_dist.inference.generate import SeededSampling
    scores = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    ids = torch.zeros(4, 1, dtype=torch.long)
    for seed in range(5):   # top_k=1: only the most likely token survives, whatever the draw
        out = SeededSampling(1.0, 1.0, seed, torch.device("cpu"), top_k=1)(ids, scores)
        assert torch.equal(out.argmax(-1), scores.argmax(-1))
    drawn = {int(SeededSampling(5.0, 1.0, s, torch.device("cpu"), top_k=3)(ids, scores)[0].argmax()) for s in range(40)}
    assert drawn <= set(scores[0].topk(3).indices.tolist()) and len(drawn) > 1
