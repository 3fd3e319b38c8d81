"""The benchmark (launch/benchmark.py, vlm_dist.benchmark) on the tiny CPU configuration: the report has
its fields and its arithmetic adds up.

    python -m pytest tests/test_benchmark.py -q
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_dist.benchmark import cli as bench

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "benchmark.py"


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    """Where the benchmark builds its tiny models: once for the module."""
    return tmp_path_factory.mktemp("bench_work")


def test_train_report_fields_and_mfu_arithmetic(tmp_path, work_dir):
    out = tmp_path / "bench.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--steps", "1", "--warmup", "1", "--out", str(out),
         "--work-dir", str(work_dir), "--data.max_seq_len=256", "--train.micro_batch_size=2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tokens/s/GPU" in proc.stdout and "MFU vs measured matmul peak" in proc.stdout
    r = json.loads(out.read_text())

    for key in ("tokens_per_s_per_gpu", "samples_per_s", "samples_per_s_per_gpu", "step_time_s", "mfu",
                "mfu_measured", "hfu_measured", "peak_flops_spec", "peak_flops_measured", "peak_memory_gb",
                "loader_stall_pct", "packing_efficiency", "flops_per_step", "flops_per_token",
                "flops_breakdown_per_token", "gpu_hours_558k", "setup", "environment"):
        assert key in r, key
    assert r["setup"]["engine"] == "deepspeed" and r["setup"]["zero_stage"] == 2
    assert r["setup"]["pack"] is True and r["setup"]["llm_mode"] == "frozen"
    assert r["environment"]["device"] == "cpu" and r["environment"]["date"]
    # the CPU has no data-sheet peak: no MFU against it, and none made up
    assert r["peak_flops_spec"] is None and r["mfu"] is None
    # MFU = FLOPs per step / step time / peak, by hand
    assert r["mfu_measured"] == pytest.approx(r["flops_per_step"] / r["step_time_s"] / r["peak_flops_measured"],
                                              rel=1e-9)
    assert r["hfu_measured"] == pytest.approx(
        r["hardware_flops_per_step"] / r["step_time_s"] / r["peak_flops_measured"], rel=1e-9)
    assert r["tokens_per_s_per_gpu"] == pytest.approx(r["tokens_per_step"] / r["step_time_s"], rel=1e-9)
    assert r["flops_per_step"] == pytest.approx(r["flops_per_token"] * r["tokens_per_step"], rel=1e-9)
    assert sum(v for k, v in r["flops_breakdown_per_token"].items() if k != "recompute") == \
        pytest.approx(r["flops_per_token"], rel=1e-9)
    # stage-1 shaped samples: one 66-token image block each, ~110 tokens, the caption supervised
    assert r["images_per_sample"] == 1.0
    assert 80 < r["mean_sample_tokens"] < 160 and 0.1 < r["supervised_fraction"] < 0.5
    assert 0 < r["packing_efficiency"] <= 1 and 0 <= r["loader_stall_pct"] <= 100
    assert r["peak_memory_gb"] > 0


@pytest.fixture(scope="module")
def small_configs(tmp_path_factory):
    """The shipped Qwen3-8B-Base / so400m config.json files, shrunk: the full-size code path in seconds."""
    d = tmp_path_factory.mktemp("configs")
    llm = json.loads((REPO / "launch" / "model_configs" / "qwen3-8b-base.json").read_text())
    llm.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=1, head_dim=16)
    vision = json.loads((REPO / "launch" / "model_configs" / "siglip-so400m-patch14-384.json").read_text())
    vision["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, image_size=56)       # 4 x 4 patches of 14 px
    (d / "llm.json").write_text(json.dumps(llm))
    (d / "vision.json").write_text(json.dumps(vision))
    return ["--llm-config", str(d / "llm.json"), "--vision-config", str(d / "vision.json")]


def test_full_size_path_on_random_weights(tmp_path, small_configs):
    """Random-weight checkpoints from config.json, Qwen3's real special-token ids (vocabulary 151,936),
    training's model build and step, with a plain-torch engine."""
    out = tmp_path / "bench.json"
    assert bench.main(["--engine", "torch", "--steps", "1", "--warmup", "0", "--work-dir", str(tmp_path / "w"),
                       "--out", str(out), "--data.max_seq_len=256", "--train.micro_batch_size=1",
                       "--model.num_latents=8", *small_configs]) == 0
    r = json.loads(out.read_text())
    assert r["tiny"] is False and r["setup"]["engine"] == "torch" and r["setup"]["image_tokens"] == 8
    assert r["setup"]["connector"]["vision_dim"] == 32 and r["setup"]["connector"]["llm_dim"] == 32
    assert r["tokens_per_s_per_gpu"] > 0
    # lm_head at supervised positions: 4 x 32 x 151,936 per supervised token, the biggest part here
    assert r["flops_breakdown_per_token"]["lm_head"] == pytest.approx(4 * 32 * 151_936 * r["supervised_fraction"])
    # the LLM's random weights were made in memory: only its config.json went to disk, and the
    # vision tower (training reads cached features) needed no weights either
    assert sorted(p.name for p in (tmp_path / "w" / "llm-config").iterdir()) == ["config.json"]
    assert sorted(p.name for p in (tmp_path / "w" / "vision-config").iterdir()) == ["config.json"]
    assert not list((tmp_path / "w").rglob("*.safetensors"))


def test_cache_builder_mode(tmp_path, small_configs, capsys):
    out = tmp_path / "cache.json"
    assert bench.main(["--mode", "cache", "--engine", "torch", "--steps", "1", "--warmup", "1",
                       "--cache-batch", "2", "--work-dir", str(tmp_path / "w"), "--out", str(out),
                       *small_configs]) == 0
    r = json.loads(out.read_text())
    assert r["images_per_s"] > 0 and r["hours_558k"] == pytest.approx(558_128 / r["images_per_s"] / 3600)
    assert r["setup"]["patches"] == 16 and r["setup"]["layers_run"] == 1    # feature layer -2 of 2
    assert r["mfu_measured"] == pytest.approx(r["flops_per_step"] / r["step_time_s"] / r["peak_flops_measured"])
    assert not (tmp_path / "w" / "llm-config").exists()                     # the cache builder needs no LLM
    assert (tmp_path / "w" / "vision-random" / "model.safetensors").exists()  # VisionTower loads from disk
    assert "images/s" in capsys.readouterr().out


def test_lengths_from_a_records_file(tmp_path, work_dir, tiny_models):
    from vlm_dist.contract.records import write_records
    records = tmp_path / "records.jsonl"
    write_records(records, [
        {"id": f"r{i}", "images": [f"k{i}a", f"k{i}b"][:1 + i % 2],
         "conversations": [{"role": "user", "content": "<image>" * (1 + i % 2) + "\nWhat is shown?"},
                           {"role": "assistant", "content": "A red circle on the left. " * (1 + i % 3)}]}
        for i in range(6)])
    out = tmp_path / "bench.json"
    assert bench.main(["--tiny", "--engine", "torch", "--steps", "1", "--warmup", "0", "--work-dir", str(work_dir),
                       "--records", str(records), "--tokenizer", tiny_models["tokenizer"], "--out", str(out),
                       "--model.num_latents=4", "--data.max_seq_len=128"]) == 0
    r = json.loads(out.read_text())
    assert r["setup"]["lengths"] == str(records)
    assert 1.0 <= r["images_per_sample"] <= 2.0 and r["tokens_per_step"] > 0


def test_bad_flags_are_named(tmp_path):
    from vlm_dist.config import ConfigError
    with pytest.raises(ConfigError, match="llm_mode"):
        bench.main(["--tiny", "--engine", "torch", "--model.llm_mode=lorra", "--work-dir", str(tmp_path)])
    with pytest.raises(SystemExit):
        bench.parse_args(["--stepz", "3"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--records", "x.jsonl"])     # lengths from records need their tokenizer


def test_full_size_llm_is_built_from_its_config_without_a_checkpoint(tmp_path):
    """The full-size LLM's weights are made from config.json (meta-device shapes, random values made
    where they will live) and handed to from_pretrained as they are: every key of the model, norm gains
    1, linears N(0, initializer_range), and the loaded model holds those very tensors (no copy)."""
    import torch
    from transformers import AutoConfig

    from vlm_dist.benchmark.workload import random_llm_weights
    from vlm_dist.model.build import load_llm

    llm = json.loads((REPO / "launch" / "model_configs" / "qwen3-8b-base.json").read_text())
    llm.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16)
    (tmp_path / "config.json").write_text(json.dumps(llm))
    weights = random_llm_weights(AutoConfig.from_pretrained(tmp_path), torch.bfloat16, torch.device("cpu"))
    assert weights["model.norm.weight"].eq(1).all() and weights["lm_head.weight"].shape == (151_936, 64)
    assert weights["model.layers.1.mlp.up_proj.weight"].float().std().item() == pytest.approx(0.02, rel=0.05)
    model = load_llm(str(tmp_path), "frozen", torch.bfloat16, "sdpa", weights=weights)
    state = model.state_dict()
    assert set(state) == set(weights)
    assert all(state[k].data_ptr() == w.data_ptr() for k, w in weights.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]       # nothing was written


def test_cache_pipeline_with_a_stand_in_encoder_writes_every_image(tmp_path):
    """The builder's pipeline (decode, 8-bit pixels, writer, SHA-256, fsync) around a free encoder."""
    from vlm_dist.benchmark.measure import measure_cache_pipeline
    r = measure_cache_pipeline(tmp_path, num_images=6, shard_size=4, batch_size=2, workers=0, image_size=8,
                               photo_size=(40, 30), feature_shape=(4, 8))
    s = r["setup"]
    assert s["encoded"] == 6 and s["failed"] == 0
    assert s["bytes"] > 6 * 4 * 8 * 2                       # bf16 features of every image, plus Arrow framing
    assert r["images_per_s"] == pytest.approx(6 / r["seconds"])
    assert r["input_wait_seconds"] >= 0 and r["output_wait_seconds"] >= 0
    assert not (tmp_path / "cache-pipeline").exists()       # the timed cache is removed


def test_loader_over_a_cache_on_disk(tmp_path):
    from vlm_dist.benchmark.measure import measure_loader, write_random_cache
    from vlm_dist.cache.reader import verify_cache
    keys = write_random_cache(tmp_path / "c", num_images=24, shard_size=4, feature_shape=(4, 8))
    assert len(keys) == 24 and verify_cache(tmp_path / "c") == []
    r = measure_loader(tmp_path / "c", batches=3, micro_batch_size=2, num_workers=0)
    assert r["setup"]["shards"] == 6 and r["setup"]["max_open_shards"] == 6
    assert r["samples_per_s"] == pytest.approx(r["batches_per_s"] * 2)   # one image per sample, full rows


# -- tiled images and video (issue 18) --------------------------------------------------------------

def test_tiled_and_video_workloads_have_the_real_blocks(tokenizer):
    """The workloads' samples are laid out by the contract's own block builders: a 2x2-tiled image is
    5 views of T slots, a video Tf slots per sampled frame, and the lengths are those blocks'."""
    import random

    import torch

    from vlm_dist.benchmark.workload import FeatureBank, MediaBlocks, builtin_shapes, make_samples, views_of
    from vlm_dist.contract.media import IMAGE, block_ids
    from vlm_dist.contract.tiling import block_length
    from vlm_dist.contract.video import FrameSampling, video_block_ids

    rng = random.Random(0)
    tiled = builtin_shapes("tiled", 3, rng)
    video = builtin_shapes("video", 3, rng, video_sampling=FrameSampling(num_frames=4, max_fps=1.0))
    assert all(s.grid == (2, 2) and s.image_views == 5 and s.video_frames == 0 for s in tiled)
    assert all(s.images == 0 and 1 <= s.video_frames <= 4 for s in video)
    block, eos = block_ids(tokenizer, IMAGE, 3), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    samples = make_samples(tiled + video, block, eos, 100, 0, MediaBlocks(tokenizer, 3, 2))
    image_pad, video_pad = (tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>"))
    for shape, s in zip(tiled, samples[:3]):
        assert s.input_ids.count(image_pad) == 5 * 3 and len(s.video_keys) == 0
        assert len(s) == block_length(3, 2, 2) + shape.prompt + shape.answer
    for shape, s in zip(video, samples[3:]):
        assert s.input_ids.count(video_pad) == 2 * shape.video_frames and s.video_keys == [s.video_keys[0]]
        assert len(s) == len(video_block_ids(tokenizer, shape.frame_times, 2)) + shape.prompt + shape.answer
    views = views_of(tiled + video)
    bank = FeatureBank((4, 8), torch.float32, num_views=views)
    assert bank.views(samples[0].image_keys[0]).shape == (5, 4, 8)
    assert bank.views(samples[3].video_keys[0]).shape == (video[0].video_frames, 4, 8)
    assert torch.equal(bank.views(samples[0].image_keys[0])[0], bank[samples[0].image_keys[0]])   # view 0
    with pytest.raises(ValueError, match="MediaBlocks"):
        make_samples(tiled, block, eos, 100, 0)


@pytest.mark.parametrize("lengths", ["tiled", "video"])
def test_tiled_and_video_workloads_train_and_count_views(tmp_path, work_dir, lengths):
    """A tiled or video run trains on the CPU, and its FLOPs count the connector once per view:
    the image connector 5x per tiled image, the video connector once per frame."""
    from vlm_dist.training import flops as F

    out = tmp_path / "bench.json"
    video = ["--model.video.num_frames=4", "--model.video.tokens_per_frame=2"] if lengths == "video" else []
    assert bench.main(["--tiny", "--engine", "torch", "--steps", "1", "--warmup", "0", "--work-dir", str(work_dir),
                       "--lengths", lengths, "--out", str(out), "--model.num_latents=4", "--data.max_seq_len=512",
                       *video]) == 0
    r = json.loads(out.read_text())
    s = r["setup"]
    assert s["lengths"] == lengths and r["tokens_per_step"] > 0
    conn = s["connector"] if lengths == "tiled" else s["video_connector"]
    views = r["image_views_per_sample"] if lengths == "tiled" else r["video_frames_per_sample"]
    if lengths == "tiled":
        assert (r["images_per_sample"], r["image_views_per_sample"], r["video_frames_per_sample"]) == (1.0, 5.0, 0.0)
    else:
        assert s["video_tokens"] == 2 and conn["num_latents"] == 2
        assert r["image_views_per_sample"] == 0.0 and 1.0 <= r["video_frames_per_sample"] <= 4.0
    per_view = F.connector_flops_per_image(conn, _patches(work_dir))["linear"]
    connector_per_step = r["flops_breakdown_per_token"]["connector"] * r["tokens_per_step"]
    assert connector_per_step == pytest.approx(per_view * views * r["samples_per_step"], rel=1e-9)


def _patches(work_dir) -> int:
    """Patches per view of the benchmark's tiny vision tower."""
    from transformers import AutoConfig

    from vlm_dist.training.flops import num_patches
    return num_patches(AutoConfig.from_pretrained(work_dir / "tiny" / "siglip-tiny").vision_config)


def test_full_size_stand_in_tokenizes_media_text_like_qwen(tokenizer, tmp_path, small_configs):
    """The full-size run has no tokenizer, only Qwen3's ids: the "\\n" of tiled blocks and the frame
    timestamps are one byte-level token per character, with the ids the Qwen-style tiny tokenizer
    (byte-level BPE, digits split) gives; and a full-size video run trains on them."""
    from vlm_dist.benchmark.workload import Qwen3SpecialIds
    from vlm_dist.contract.video import TIMESTAMP_FORMAT

    stand_in = Qwen3SpecialIds()
    for text in ["\n"] + [TIMESTAMP_FORMAT.format(t) for t in (0.0, 0.25, 7.5, 12.5, 59.9, 123.4)]:
        assert stand_in(text)["input_ids"] == tokenizer(text, add_special_tokens=False,
                                                        split_special_tokens=True)["input_ids"], text
    with pytest.raises(ValueError, match="media-block text"):
        stand_in("hello")
    out = tmp_path / "bench.json"
    assert bench.main(["--engine", "torch", "--steps", "1", "--warmup", "0", "--work-dir", str(tmp_path / "w"),
                       "--out", str(out), "--data.max_seq_len=1024", "--train.micro_batch_size=1",
                       "--model.num_latents=8", "--lengths", "video", *small_configs]) == 0
    r = json.loads(out.read_text())
    assert r["tiny"] is False and r["setup"]["video_tokens"] == 16      # model.video's default tokens_per_frame
    assert 1.0 <= r["video_frames_per_sample"] <= 8.0 and r["tokens_per_s_per_gpu"] > 0
