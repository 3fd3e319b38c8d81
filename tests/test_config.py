"""The run config: YAML + typed overrides, errors that name the flag, the saved config.

    python -m pytest tests/test_config.py -q
"""
import dataclasses
import json
from pathlib import Path

import pytest

from vlm_dist.config import (DEFAULT_CONFIG, SECTIONS, Config, ConfigError, RecordSource, check_run_inputs,
                             config_help, field_docs, load_config, save_config)

STAGES = Path(__file__).resolve().parents[1] / "launch" / "configs"


def write_yaml(tmp_path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("stage", ["stage0_sanity", "stage1_align", "stage2_sft", "stage3_multi"])
def test_stage_configs_load(stage):
    cfg = load_config(STAGES / f"{stage}.yaml")
    assert cfg.train.output_dir == f"runs/{stage}"
    assert cfg.data.records and cfg.data.cache


def test_stage_defaults_follow_the_seeds():
    s1 = load_config(STAGES / "stage1_align.yaml")
    assert s1.model.llm_mode == "frozen" and s1.model.num_latents == 64 and s1.data.template == "plain"
    assert (s1.train.lr_connector, s1.train.weight_decay, s1.train.min_lr_ratio, s1.train.max_grad_norm) == \
        (1e-4, 0.01, 0.1, 1.0)
    assert 0.02 <= s1.train.warmup_ratio <= 0.05
    s2 = load_config(STAGES / "stage2_sft.yaml")
    assert s2.model.llm_mode == "lora" and s2.data.template == "chatml"
    assert (s2.lora.r, s2.lora.alpha, s2.lora.dropout) == (128, 256, 0.0)   # seed 003's 0.05 costs memory
    assert (s2.train.lr_connector, s2.train.lr_adapters) == (2e-5, 2e-4)
    assert s2.model.init_from == "runs/stage1_align/export"
    s3 = load_config(STAGES / "stage3_multi.yaml")
    assert s3.model.init_from == "runs/stage2_sft/export"


def test_no_config_means_stage1():
    assert DEFAULT_CONFIG == STAGES / "stage1_align.yaml"
    assert load_config(None) == load_config(STAGES / "stage1_align.yaml")


def test_overrides_are_typed():
    cfg = load_config(None, [
        "--train.max_steps=20", "--train.lr_connector=3e-5", "--data.pack=false",
        "--lora.target_modules=[q_proj,v_proj]", "--train.adam_betas=0.9,0.95",
        "--train.output_dir=007", "--model.init_from=null", "--data.cache", "/tmp/c",
        "--data.records=a.jsonl,b.jsonl", "--resume", "auto",
    ])
    assert cfg.train.max_steps == 20 and cfg.train.epochs is None   # the flag replaces the YAML's epochs
    assert cfg.train.lr_connector == 3e-5 and isinstance(cfg.train.lr_connector, float)
    assert cfg.data.pack is False
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.adam_betas == [0.9, 0.95]
    assert cfg.train.output_dir == "007"            # a string field keeps the text as typed
    assert cfg.model.init_from is None
    assert cfg.data.cache == "/tmp/c"
    assert cfg.data.records == [RecordSource("a.jsonl"), RecordSource("b.jsonl")]
    assert cfg.checkpoint.resume == "auto"


def test_yaml_floats_written_without_a_dot_are_numbers(tmp_path):
    # YAML 1.1 reads `1e-4` as a string; the typed loader must not.
    cfg = load_config(write_yaml(tmp_path, "train:\n  max_steps: 5\n  lr_connector: 1e-4\n"))
    assert cfg.train.lr_connector == 1e-4


def test_mixture_records(tmp_path):
    cfg = load_config(write_yaml(tmp_path, """
train: {max_steps: 5}
data:
  records:
    - {path: a.jsonl, weight: 0.7}
    - {path: b.jsonl, weight: 0.3}
"""))
    assert cfg.data.records == [RecordSource("a.jsonl", weight=0.7), RecordSource("b.jsonl", weight=0.3)]
    with pytest.raises(ConfigError, match="mixes weights and counts"):
        load_config(None, ["--data.records=[{path: a.jsonl, weight: 1}, {path: b.jsonl, count: 5}]"])
    with pytest.raises(ConfigError, match="unknown key 'wieght'"):
        load_config(None, ["--data.records=[{path: a.jsonl, wieght: 1}]"])


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["--train.lr=1e-4"])
    msg = str(e.value)
    assert "--train.lr" in msg and "train.lr_connector" in msg and "valid keys in train" in msg
    with pytest.raises(ConfigError, match=r"did you mean lora\.r\?"):
        load_config(None, ["--train.r=8"])
    with pytest.raises(ConfigError, match=r"unknown section 'trian' \(did you mean train\?\)"):
        load_config(None, ["--trian.max_steps=3"])
    bad = write_yaml(tmp_path, "train:\n  max_step: 5\n")
    with pytest.raises(ConfigError, match=r"run\.yaml.*unknown key train\.max_step.*did you mean train\.max_steps"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown section 'optimizer'"):
        load_config(write_yaml(tmp_path, "optimizer:\n  lr: 1\n"))


def test_wrong_type_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"--train\.max_steps=abc: expects an integer"):
        load_config(None, ["--train.max_steps=abc"])
    with pytest.raises(ConfigError, match=r"--data\.pack=maybe: expects true or false"):
        load_config(None, ["--data.pack=maybe"])
    with pytest.raises(ConfigError, match=r"--model\.llm_mode=qlroa: must be one of .*did you mean qlora"):
        load_config(None, ["--model.llm_mode=qlroa"])
    with pytest.raises(ConfigError, match=r"train\.micro_batch_size in .*run\.yaml: expects an integer"):
        load_config(write_yaml(tmp_path, "train:\n  micro_batch_size: 1.5\n"))
    with pytest.raises(ConfigError, match=r"--train\.max_steps needs a value"):
        load_config(None, ["--train.max_steps"])


@pytest.mark.parametrize("overrides, match", [
    (["--train.max_steps=5", "--train.epochs=2"], "exclude each other"),
    (["--train.max_steps=null", "--train.epochs=null"], "no length: add --train.max_steps=N or --train.epochs=N"),
    (["--train.micro_batch_size=0"], r"--train\.micro_batch_size=0: must be >= 1"),
    (["--train.grad_accum=0"], r"--train\.grad_accum=0"),
    (["--model.llm_mode=qlora", "--lora.r=null"], r"llm_mode=qlora needs a LoRA rank"),
    (["--model.llm_mode=lora", "--lora.target_modules=[]"], "needs --lora.target_modules"),
    (["--model.llm_mode=qlora", "--model.dtype=float32"], "computes in 16 bits"),
    (["--model.connector=mlp", "--model.num_latents=32"], "exclude each other"),
    (["--model.num_latents=0"], "at least 1 latent"),
    (["--train.micro_batch_tokens=100"], r"must be >= --data\.max_seq_len"),
    (["--train.warmup_ratio=1.5"], r"--train\.warmup_ratio=1\.5"),
    (["--data.eval_fraction=1"], r"--data\.eval_fraction"),
    (["--checkpoint.keep_last=0"], r"--checkpoint\.keep_last=0"),
    (["--train.max_steps=1", "--train.max_steps=2"], "given twice"),
    (["--model.gradient_checkpointing=true", "--model.checkpoint_fraction=0"],
     r"--model\.checkpoint_fraction=0\.0: must be in \(0, 1\]"),
    (["--model.gradient_checkpointing=true", "--model.checkpoint_fraction=1.5"], r"--model\.checkpoint_fraction=1\.5"),
    (["--model.gradient_checkpointing=false", "--model.checkpoint_fraction=0.5"],
     r"--model\.checkpoint_fraction=0\.5 needs --model\.gradient_checkpointing=true"),
    (["--model.kernels=triton"], r"--model\.kernels=triton: must be one of"),
])
def test_invalid_combinations(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_a_flag_replaces_a_conflicting_yaml_value_but_one_layer_cannot_hold_both(tmp_path):
    cfg = load_config(None, ["--model.connector=mlp"])   # stage 1 YAML has num_latents: 64
    assert cfg.model.connector == "mlp" and cfg.model.num_latents is None
    cfg = load_config(STAGES / "stage0_sanity.yaml", ["--train.epochs=2"])   # YAML has max_steps: 300
    assert cfg.train.epochs == 2 and cfg.train.max_steps is None
    both = write_yaml(tmp_path, "train:\n  max_steps: 5\n  epochs: 1\n")
    with pytest.raises(ConfigError, match=r"train\.max_steps=5 and train\.epochs=1 exclude each other"):
        load_config(both)
    mlp = write_yaml(tmp_path, "train: {max_steps: 5}\nmodel:\n  connector: mlp\n  num_latents: 64\n")
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(mlp)
    mlp_only = write_yaml(tmp_path, "train: {max_steps: 5}\nmodel:\n  connector: mlp\n")
    assert load_config(mlp_only).model.num_latents is None   # the default 64 yields to the YAML
    with pytest.raises(ConfigError, match="exclude each other"):   # the connector type never flips silently
        load_config(mlp_only, ["--model.num_latents=32"])


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(STAGES / "stage2_sft.yaml", [
        "--train.max_steps=7", "--model.llm_mode=qlora", "--train.lr_adapters=1e-4",
        "--data.records=[{path: a.jsonl, count: 10}, {path: b.jsonl, count: 3}]", "--data.cache=/x",
        "--lora.target_modules=q_proj,v_proj", "--checkpoint.resume=/ckpt/step_5",
    ])
    out = tmp_path / "run" / "config.yaml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    save_config(again, tmp_path / "again.yaml")
    assert (tmp_path / "again.yaml").read_text() == out.read_text()
    assert list((tmp_path / "run").iterdir()) == [out]   # no temp file left behind


# --------------------------------------------------------------------------- tiles and video

def test_tiling_and_video_load_from_yaml_flags_and_single_keys_and_reload(tmp_path):
    from vlm_dist.config.media import frame_sampling, tiling_spec
    cfg = load_config(write_yaml(tmp_path, """
train: {max_steps: 5}
model:
  num_latents: 16
  tiling: {token_budget: 200, grids: [[2, 2], [1, 2]]}
"""), ["--model.video.num_frames=4", "--model.video.max_fps=null", "--model.tiling.resample=bilinear"])
    t, v = cfg.model.tiling, cfg.model.video
    assert (t.token_budget, t.grids, t.resample, t.tokens_per_tile) == (200, [[2, 2], [1, 2]], "bilinear", None)
    assert (v.num_frames, v.max_fps, v.tokens_per_frame, v.token_budget) == (4, None, 16, None)   # defaults kept
    spec = tiling_spec(cfg.model, tile_size=384, tokens_per_tile=16)
    assert (spec.tile_size, spec.tokens_per_tile, spec.grids, spec.token_budget) == (384, 16, ((1, 2), (2, 2)), 200)
    assert frame_sampling(cfg.model).num_frames == 4 and frame_sampling(cfg.model).max_fps is None
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == cfg
    off = load_config(tmp_path / "saved.yaml", ["--model.tiling=null", "--model.video=null"])
    assert off.model.tiling is None and off.model.video is None
    assert tiling_spec(off.model, 384, 16) is None and frame_sampling(off.model) is None
    whole = load_config(None, ["--model.video={num_frames: 2, tokens_per_frame: 8}"])
    assert (whole.model.video.num_frames, whole.model.video.tokens_per_frame, whole.model.video.max_fps) == (2, 8, 2.0)


@pytest.mark.parametrize("overrides, match", [
    (["--model.tiling={tokens_per_tile: 16}"],
     r"--model\.tiling\.tokens_per_tile=16: every view .* 64 \(model\.num_latents\)"),
    (["--model.tiling={token_budget: 10}"], r"--model\.tiling\.token_budget: 10 is below one untiled block \(66"),
    (["--model.tiling={grids: [[0, 2]]}"], r"--model\.tiling\.grids: rows and cols must be >= 1"),
    (["--model.tiling={grids: [2, 2]}"], r"--model\.tiling\.grids.*expects a list"),
    (["--model.tiling={resample: cubic}"], r"--model\.tiling\.resample: must be one of .*got 'cubic' \(did you mean bicubic"),
    (["--model.tiling={budget: 100}"], r"--model\.tiling=\{budget: 100\}: unknown key 'budget' \(did you mean token_budget\?\)"),
    (["--model.tiling.budget=100"], r"unknown key model\.tiling\.budget \(did you mean model\.tiling\.token_budget\?\)"),
    (["--model.llm.x=1"], r"model\.llm has no keys of its own"),
    (["--model.tiling=yes"], r"--model\.tiling=yes: expects a mapping"),
    (["--model.video.num_frames=0"], r"--model\.video\.num_frames=0: num_frames must be a positive integer"),
    (["--model.video.max_fps=-1"], r"--model\.video\.max_fps=-1\.0: max_fps must be a positive number"),
    (["--model.video.tokens_per_frame=0"], r"--model\.video\.tokens_per_frame=0: must be >= 1"),
    (["--model.video={num_frames: 8, tokens_per_frame: 16, token_budget: 100}"],
     r"--model\.video\.token_budget=100: 8 frames x \(16 slots \+ up to 5 timestamp tokens \+ 1 separator\) "
     r"\+ 1 = 177 tokens"),
])
def test_tiling_and_video_mistakes_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_tiling_checks_against_the_tower_and_the_mlp_connector():
    from vlm_dist.config.media import tiling_spec
    cfg = load_config(None, ["--model.connector=mlp", "--model.tiling={tokens_per_tile: 16, tile_size: 224}"])
    assert tiling_spec(cfg.model, tile_size=224, tokens_per_tile=16).tokens_per_tile == 16
    with pytest.raises(ConfigError, match=r"tokens_per_tile=16: .* 729 \(the patch count"):
        tiling_spec(cfg.model, tile_size=224, tokens_per_tile=729)
    with pytest.raises(ConfigError, match=r"--model\.tiling\.tile_size=224: .* input side, 384 px"):
        tiling_spec(cfg.model, tile_size=384, tokens_per_tile=16)
    with pytest.raises(ConfigError, match="NaFlex"):
        tiling_spec(load_config(None, ["--model.tiling={}"]).model, tile_size=None, tokens_per_tile=64)


def test_the_video_token_budget_bounds_the_real_block(tokenizer):
    """The load-time bound is never below a real block: 8 frames of a 99-second clip."""
    from vlm_dist.config.media import video_block_bound
    from vlm_dist.contract.video import video_block_ids
    times = [99.9 * (i + 0.5) / 8 for i in range(8)]
    assert len(video_block_ids(tokenizer, times, 16)) <= video_block_bound(8, 16)


def test_every_field_is_documented_and_listed_in_help():
    text = config_help()
    for section, cls in SECTIONS.items():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{section}.{f.name} has no docstring"
            assert f"--{section}.{f.name}=" in text
    from vlm_dist.config.schema import TilingConfig, VideoConfig
    for name, cls in (("tiling", TilingConfig), ("video", VideoConfig)):
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"model.{name}.{f.name} has no docstring"
            assert f"--model.{name}.{f.name}=" in text
    assert set(field_docs(RecordSource)) == {"path", "weight", "count"}


def _model_dir(root: Path, name: str) -> str:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": name}))
    return str(d)


def test_check_run_inputs_names_the_flag_to_add(tmp_path):
    cfg = load_config(None, ["--model.llm=nobody-xyz/not-a-model", f"--model.vision={tmp_path / 'missing'}",
                             "--data.records=[]", "--data.cache=null", "--model.init_from=/no/such/export"])
    with pytest.raises(ConfigError) as e:
        check_run_inputs(cfg)
    msg = str(e.value)
    assert "--model.llm=nobody-xyz/not-a-model is not a local directory and not in the Hugging Face cache" in msg
    assert "hf download nobody-xyz/not-a-model" in msg
    assert f"--model.vision={tmp_path / 'missing'} does not exist: add --model.vision=PATH" in msg
    assert "no records: add --data.records=PATH.jsonl" in msg
    assert "no feature cache: add --data.cache=DIR" in msg
    assert "--model.init_from=/no/such/export does not exist" in msg


def test_check_run_inputs_passes_when_everything_is_there(tmp_path):
    records = tmp_path / "r.jsonl"
    records.write_text("")
    (tmp_path / "cache").mkdir()
    cfg = load_config(None, [f"--model.llm={_model_dir(tmp_path, 'llm')}",
                             f"--model.vision={_model_dir(tmp_path, 'vision')}",
                             f"--data.records={records}", f"--data.cache={tmp_path / 'cache'}"])
    check_run_inputs(cfg)
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg.model.llm = str(empty)
    with pytest.raises(ConfigError, match="has no config.json"):
        check_run_inputs(cfg)
    cfg.model.llm = _model_dir(tmp_path, "llm2")
    cfg.data.records = [RecordSource(str(tmp_path / "gone.jsonl"))]
    with pytest.raises(ConfigError, match=r"gone\.jsonl does not exist: add --data\.records=PATH\.jsonl"):
        check_run_inputs(cfg)


def test_config_defaults_construct():
    cfg = Config()
    assert cfg.model.llm == "Qwen/Qwen3-8B-Base" and cfg.model.vision == "google/siglip-so400m-patch14-384"
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# --------------------------------------------------------------------------- resume: what may change

def _record(*flags, records_sha=("a" * 64,)):
    """A run record as a checkpoint stores it (vlm_dist.training.run_record), without hashing files."""
    from vlm_dist.config import config_to_dict
    length = [] if any(f.startswith("--train.max_steps") for f in flags) else ["--train.max_steps=100"]
    cfg = load_config(None, [*length, *flags])
    return json.loads(json.dumps({"config": config_to_dict(cfg),
                                  "data": {"data.records": list(records_sha), "data.cache": "c" * 64}}))


def test_resume_refuses_a_changed_learning_rate_naming_the_key_and_both_values():
    from vlm_dist.training.run_record import resume_changes
    refused, _ = resume_changes(_record("--train.lr_connector=1e-4"),
                                _record("--train.lr_connector=3e-4", "--train.weight_decay=0.1"))
    assert refused == ["train.lr_connector: 0.0001 -> 0.0003", "train.weight_decay: 0.01 -> 0.1"]


def test_resume_refuses_records_of_other_content_even_with_the_same_paths():
    from vlm_dist.training.run_record import resume_changes
    refused, _ = resume_changes(_record(), _record(records_sha=("b" * 64,)))
    assert len(refused) == 1 and refused[0].startswith("data.records: content changed (sha256 [aaaaaaaaaaaa]")


def test_resume_accepts_a_longer_run_and_harmless_keys_and_logs_them():
    from vlm_dist.training.run_record import resume_changes
    refused, accepted = resume_changes(
        _record(), _record("--train.max_steps=200", "--train.log_every=1", "--data.num_workers=0",
                           "--checkpoint.every=5", "--resume=auto"))
    assert refused == []
    assert [line.split(":")[0] for line in accepted] == [
        "data.num_workers", "train.max_steps", "train.log_every", "checkpoint.every", "checkpoint.resume"]
    refused, _ = resume_changes(_record(), _record("--train.max_steps=50"))
    assert refused == ["train.max_steps: 100 -> 50"], "a shorter run changes the schedule"


def test_resume_accepts_a_change_the_user_names_explicitly():
    from vlm_dist.training.run_record import resume_changes
    new = _record("--train.lr_connector=3e-4", "--checkpoint.allow_changed=train.lr_connector,data.records",
                  records_sha=("b" * 64,))
    refused, accepted = resume_changes(_record(), new, ["train.lr_connector", "data.records"])
    assert refused == []
    assert any(a.startswith("train.lr_connector: 0.0001 -> 0.0003 (allowed") for a in accepted)
    assert any(a.startswith("data.records: content changed") for a in accepted)


@pytest.mark.parametrize("key,hint", [("train.lr_conector", "did you mean train.lr_connector"),
                                      ("lr_connector", "did you mean train.lr_connector"),
                                      ("nosuch.key", "section.key")])
def test_allow_changed_naming_an_unknown_key_is_an_error_naming_it(key, hint):
    with pytest.raises(ConfigError, match=f"--checkpoint.allow_changed: '{key}' is not a config key") as e:
        load_config(None, [f"--checkpoint.allow_changed=train.seed,{key}"])
    assert hint in str(e.value)


def test_stage_recipes_fit_the_hardware():
    """The shipped recipes: LoRA without dropout (each dropped input is one more saved activation),
    a fraction of the layers recomputing in the LoRA stages, fused kernels picked up where they run,
    and ZeRO-2 (not ZeRO-3) named by every stage's launch line."""
    for stage in ("stage2_sft", "stage3_multi"):
        cfg = load_config(STAGES / f"{stage}.yaml")
        assert cfg.lora.dropout == 0.0, stage
        assert cfg.model.gradient_checkpointing and 0 < cfg.model.checkpoint_fraction < 1, stage
    for stage in ("stage1_align", "stage2_sft", "stage3_multi"):
        assert load_config(STAGES / f"{stage}.yaml").model.kernels == "auto", stage
        launch_lines = [l for l in (STAGES / f"{stage}.yaml").read_text().splitlines() if "--deepspeed" in l]
        assert launch_lines and all("ds_configs/zero2.json" in l for l in launch_lines), stage
    assert Config().lora.dropout == 0.0 and Config().model.checkpoint_fraction == 1.0
