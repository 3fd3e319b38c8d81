"""Checkpoint publication and resume selection (no DeepSpeed needed)."""
import errno
import os

import pytest

from vlm_dist.training.checkpoint import (MARKER, CheckpointError, complete_checkpoints, load_rank_state, publish,
                                 resolve_resume, save_rank_state, tag_for)


def fake_save(root, step, complete=True, keep=3):
    d = root / tag_for(step)
    d.mkdir(parents=True)
    (d / "mp_rank_00_model_states.pt").write_bytes(b"x")
    save_rank_state(d, 0, {"step": step})
    if complete:
        publish(root, d, {"step": step}, keep_last=keep)
    return d


def test_auto_resume_picks_newest_complete_never_an_interrupted_save(tmp_path):
    assert resolve_resume("auto", tmp_path) is None          # nothing yet: fresh run
    assert resolve_resume(None, tmp_path) is None
    fake_save(tmp_path, 10)
    fake_save(tmp_path, 20)
    interrupted = fake_save(tmp_path, 30, complete=False)     # killed mid-save: no marker
    assert not (interrupted / MARKER).exists()
    assert resolve_resume("auto", tmp_path).name == tag_for(20)
    # even if `latest` points at something incomplete, auto falls back to a complete one
    (tmp_path / "latest").write_text(tag_for(30))
    assert resolve_resume("auto", tmp_path).name == tag_for(20)


def test_explicit_missing_or_incomplete_checkpoint_is_an_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "step_00000099"), tmp_path)
    d = fake_save(tmp_path, 5, complete=False)
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(d), tmp_path)


def test_keep_last_prunes_old_and_stale_partial_saves(tmp_path):
    fake_save(tmp_path, 1, complete=False)
    for s in (2, 3, 4, 5):
        fake_save(tmp_path, s, keep=2)
    assert [p.name for p in complete_checkpoints(tmp_path)] == [tag_for(4), tag_for(5)]
    assert not (tmp_path / tag_for(1)).exists()
    assert (tmp_path / "latest").read_text() == tag_for(5)


def test_rank_state_round_trip_and_missing_rank(tmp_path):
    import torch
    torch.manual_seed(3)
    save_rank_state(tmp_path, 1, {"step": 7, "sampler": {"epoch": 0, "step": 14}})
    a = torch.rand(3)
    state = load_rank_state(tmp_path, 1)
    assert state["trainer"]["sampler"]["step"] == 14
    from vlm_dist.training.checkpoint import set_rng_state
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), a)
    with pytest.raises(CheckpointError, match="rank 0"):
        load_rank_state(tmp_path, 0)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_write_export_reloads_with_identical_outputs(tiny_models, tokenizer, tmp_path, mode):
    """The trainer's export (adapter/ or llm/ + connector) loads in one call and computes the same loss."""
    import torch

    from vlm_dist.training.checkpoint import write_export
    from vlm_dist.inference.export import load_export
    from vlm_dist.config import LoraConfig
    from vlm_dist.model.build import build_vlm, load_llm, set_trainable
    from vlm_dist.contract.prompt import IGNORE, PromptEncoder

    torch.manual_seed(0)
    llm = load_llm(tiny_models["llm"], mode, torch.float32, lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    vlm = build_vlm(llm, tokenizer, 32, 16, dict(num_latents=4, depth=1, heads=4), torch.float32)
    set_trainable(vlm, mode)
    with torch.no_grad():  # move every trainable weight away from its initial value
        for p in vlm.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    cfg = {"llm": tiny_models["llm"], "vision": tiny_models["vision"], "feature_layer": -2, "pool": 1,
           "vision_dtype": "float32", "template": "plain", "num_media_tokens": 4, "dtype": "float32"}
    write_export(vlm, tmp_path / "export", cfg, mode, is_main=True, tokenizer=tokenizer)
    fresh, _, _, _ = load_export(tmp_path / "export", device="cpu", dtype=torch.float32, with_vision=False)
    s = PromptEncoder(tokenizer, "plain", 4).encode({"id": "a", "images": ["k"], "conversations": [
        {"role": "user", "content": "<image> Describe."}, {"role": "assistant", "content": "a red circle"}]})
    ids, lab = torch.tensor([s.input_ids]), torch.tensor([s.labels])
    tgt = torch.full_like(lab, IGNORE)
    tgt[:, :-1] = lab[:, 1:]
    media = {"image": {"features": torch.randn(1, 16, 32), "counts": torch.tensor([1])}}
    pos = torch.arange(ids.shape[1])[None]
    vlm.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids, pos, tgt, media)["loss_sum"], vlm(ids, pos, tgt, media)["loss_sum"])


def test_resume_on_another_world_size_is_refused_before_loading(tmp_path):
    d = tmp_path / tag_for(3)
    d.mkdir()
    publish(tmp_path, d, {"step": 3, "world_size": 2}, keep_last=3)
    assert resolve_resume("auto", tmp_path, world_size=2) == d
    with pytest.raises(CheckpointError, match="saved by 2 ranks; this run has 4"):
        resolve_resume("auto", tmp_path, world_size=4)


def test_auto_takes_the_newest_complete_checkpoint_whatever_latest_says(tmp_path):
    root = tmp_path / "checkpoints"
    fake_save(root, 10)
    fake_save(root, 20)
    (root / "latest").write_text(tag_for(10))   # lagging: a crash between marker and rename
    assert resolve_resume("auto", root).name == tag_for(20)
    outside = fake_save(tmp_path / "elsewhere", 99)
    for junk in (b"\xff\xfe\x00garbage", b"../elsewhere/" + tag_for(99).encode(), str(outside).encode()):
        (root / "latest").write_bytes(junk)
        assert resolve_resume("auto", root).name == tag_for(20)
    # a step_* symlink to a complete checkpoint elsewhere is not one of ours
    (root / tag_for(30)).symlink_to(outside, target_is_directory=True)
    assert resolve_resume("auto", root).name == tag_for(20)
    assert [p.name for p in complete_checkpoints(root)] == [tag_for(10), tag_for(20)]


def test_resaving_a_step_withdraws_its_marker_first(tmp_path):
    from vlm_dist.training.checkpoint import withdraw

    fake_save(tmp_path, 4)
    d = fake_save(tmp_path, 8)
    withdraw(d)                          # a resumed run is about to write step 8 again
    assert not (d / MARKER).exists()
    assert resolve_resume("auto", tmp_path).name == tag_for(4)
    publish(tmp_path, d, {"step": 8}, keep_last=3)
    assert resolve_resume("auto", tmp_path) == d
    withdraw(tmp_path / tag_for(12))     # a new step: nothing to withdraw


def test_a_nan_stop_save_is_complete_but_never_the_resume_target(tmp_path):
    from vlm_dist.training.checkpoint import nan_tag_for

    fake_save(tmp_path, 4)
    d = tmp_path / nan_tag_for(6)
    d.mkdir()
    publish(tmp_path, d, {"step": 6, "nan_run": 2}, keep_last=3)
    assert (d / MARKER).exists()
    assert (tmp_path / "latest").read_text() == tag_for(4)
    assert resolve_resume("auto", tmp_path).name == tag_for(4)
    assert resolve_resume(str(d), tmp_path) == d      # an explicit, deliberate resume is allowed


class _RunsCode:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (str(self.target),))


def test_a_rank_file_holding_a_pickled_callable_is_refused_unrun(tmp_path):
    import torch

    pwned = tmp_path / "pwned"
    torch.save({"rng": {}, "trainer": {"step": 1, "hook": _RunsCode(pwned)}}, tmp_path / "rank_00000.pt")
    with pytest.raises(CheckpointError, match=r"rank_00000\.pt: refused") as e:
        load_rank_state(tmp_path, 0)
    assert e.value.rank_local
    assert not pwned.exists()
    (tmp_path / "rank_00001.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"rank_00001\.pt: unreadable"):
        load_rank_state(tmp_path, 1)


def test_every_rng_round_trips_exactly_through_a_rank_file(tmp_path):
    import random

    import numpy as np
    import torch

    from vlm_dist.training.checkpoint import set_rng_state

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.standard_normal()          # leaves a cached gaussian in numpy's state
    save_rank_state(tmp_path, 0, {"step": 5, "sampler": {"epoch": 1, "step": 9, "data_digest": "ab"}})
    want = random.random(), np.random.standard_normal(3), torch.rand(3)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    state = load_rank_state(tmp_path, 0)
    set_rng_state(state["rng"])
    assert random.random() == want[0]
    assert np.array_equal(np.random.standard_normal(3), want[1])
    assert torch.equal(torch.rand(3), want[2])
    assert state["trainer"] == {"step": 5, "sampler": {"epoch": 1, "step": 9, "data_digest": "ab"}}


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("basic_ios::clear: iostream error")])
def test_a_full_disk_at_save_names_the_checkpoint_and_the_space(tmp_path, monkeypatch, error):
    import shutil
    from collections import namedtuple

    from vlm_dist.training.checkpoint import disk_errors

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 0))
    with pytest.raises(CheckpointError, match=r"step_00000004: no space left on device \(0 bytes free\)"):
        with disk_errors(tmp_path / tag_for(4)):
            raise error


def test_an_unrelated_save_error_is_not_called_a_full_disk(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from vlm_dist.training.checkpoint import disk_errors

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="something else"):
        with disk_errors(tmp_path / tag_for(4)):
            raise RuntimeError("something else")


@pytest.mark.parametrize("saved_mode, has_adapter, want", [
    ("lora", False, "error"), ("qlora", False, "error"),   # trained with adapters, adapter/ lost
    ("lora", True, "adapter"),                             # continue the adapter
    ("frozen", False, None),                               # stage 1 export: a fresh adapter is right
])
def test_a_lora_stage_never_silently_drops_an_exports_adapter(tmp_path, saved_mode, has_adapter, want):
    import json

    from vlm_dist.training.checkpoint import init_adapter

    export = tmp_path / "export"
    export.mkdir()
    (export / "vlm_config.json").write_text(json.dumps({"llm_mode": saved_mode}))
    if has_adapter:
        (export / "adapter").mkdir()
    if want == "error":
        with pytest.raises(CheckpointError, match=rf"llm_mode={saved_mode} but has no adapter/ \({export}/adapter"):
            init_adapter(str(export), "lora")
    else:
        assert init_adapter(str(export), "qlora") == (str(export / "adapter") if want else None)
    assert init_adapter(str(export), "frozen") is None   # a frozen/full stage never loads an adapter
    assert init_adapter(None, "lora") is None


def _frozen_export(path):
    """The smallest export check_export accepts: connector weights + configs (llm_mode frozen)."""
    import json

    import torch
    from safetensors.torch import save_file
    path.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(path / "connector.safetensors"))
    (path / "connector_config.json").write_text("{}")
    (path / "vlm_config.json").write_text(json.dumps({
        "llm": "base", "vision": "siglip", "feature_layer": -2, "template": "plain", "llm_mode": "frozen",
        "num_media_tokens": 4}))
    return path


def test_publish_export_replaces_only_an_export(tmp_path):
    from vlm_dist.training.checkpoint import publish_export
    from vlm_dist.inference.export import ExportError
    src = _frozen_export(tmp_path / "checkpoints" / "step_00000001" / "export")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=f"{mine} exists and is not an export"):
        publish_export(src, mine)
    assert (mine / "notes.txt").read_text() == "keep me" and [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = tmp_path / "export"
    publish_export(src, out)
    (src / "connector_config.json").write_text('{"image": {}}')
    publish_export(src, out)                                   # an export: replaced by the new one
    assert (out / "connector_config.json").read_text() == '{"image": {}}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "export", "mine"]   # no temp left


def test_deepspeeds_own_files_are_loaded_weights_only(tmp_path):
    """load_engine_state routes every file engine.load_checkpoint reads through torch.load(weights_only=True):
    DeepSpeed's ZeRO state (with its loss scaler, stage enum, fragment addresses) loads; a pickle does not run."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from vlm_dist.training.checkpoint import load_engine_state

    class Engine:   # the one call engine.load_checkpoint makes per file
        checkpoint_engine = TorchCheckpointEngine()

        def load_checkpoint(self, load_dir, tag):
            self.loaded = self.checkpoint_engine.load(os.path.join(load_dir, tag, "optim_states.pt"), map_location="cpu")

    engine, d = Engine(), tmp_path / tag_for(2)
    d.mkdir()
    zero_state = {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                  "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}], "fp32": torch.ones(4)}
    engine.checkpoint_engine.save(zero_state, str(d / "optim_states.pt"))
    load_engine_state(engine, d)
    assert engine.loaded["zero_stage"] is ZeroStageEnum.gradients and engine.loaded["loss_scaler"].cur_scale == 1.0
    assert type(engine.checkpoint_engine) is TorchCheckpointEngine   # restored after the load
    pwned = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _RunsCode(pwned)}, d / "optim_states.pt")
    with pytest.raises(CheckpointError, match=r"optim_states\.pt: refused"):
        load_engine_state(engine, d)
    assert not pwned.exists()


def test_a_fresh_run_never_overwrites_a_runs_checkpoints(tmp_path):
    """Without --resume, an output dir that holds complete checkpoints is refused (the fresh run would
    re-save step_1, step_2, ... over them); an interrupted save alone is not a run to protect."""
    (tmp_path / tag_for(3)).mkdir()
    assert resolve_resume(None, tmp_path) is None
    publish(tmp_path, tmp_path / tag_for(3), {"step": 3}, keep_last=2)
    with pytest.raises(CheckpointError, match="step_00000003.*--resume auto"):
        resolve_resume(None, tmp_path)
    assert resolve_resume("auto", tmp_path).name == tag_for(3)


def test_pruning_never_removes_the_checkpoint_just_published(tmp_path):
    """An explicit resume from step 100 while step 200 (a first attempt) exists: saving step 110
    with keep_last=1 prunes step 100, keeps 110 (just published) and leaves 200 alone."""
    for step in (100, 200):
        (tmp_path / tag_for(step)).mkdir()
        publish(tmp_path, tmp_path / tag_for(step), {"step": step}, keep_last=5)
    (tmp_path / tag_for(110)).mkdir()
    publish(tmp_path, tmp_path / tag_for(110), {"step": 110}, keep_last=1)
    assert [p.name for p in complete_checkpoints(tmp_path)] == [tag_for(110), tag_for(200)]
    assert (tmp_path / "latest").read_text() == tag_for(110)


@pytest.mark.parametrize("keep_last", [0, 1, 2, 3, 5])
def test_keep_last_keeps_exactly_that_many_of_a_straight_run(tmp_path, keep_last):
    for step in range(10, 50, 10):
        (tmp_path / tag_for(step)).mkdir()
        publish(tmp_path, tmp_path / tag_for(step), {"step": step}, keep_last=keep_last)
    kept = [p.name for p in complete_checkpoints(tmp_path)]
    want = [tag_for(s) for s in range(10, 50, 10)]
    assert kept == (want if keep_last == 0 else want[-keep_last:])
