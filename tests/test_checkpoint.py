"""Checkpoint publication and resume selection (no DeepSpeed needed)."""
import pytest

from vlm_dist.checkpoint import (MARKER, CheckpointError, complete_checkpoints, load_rank_state, publish,
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
    from vlm_dist.checkpoint import set_rng_state
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), a)
    with pytest.raises(CheckpointError, match="rank 0"):
        load_rank_state(tmp_path, 0)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_write_export_reloads_with_identical_outputs(tiny_models, tokenizer, tmp_path, mode):
    """The trainer's export (adapter/ or llm/ + connector) loads in one call and computes the same loss."""
    import torch

    from vlm_dist.checkpoint import write_export
    from vlm_dist.export import load_export
    from vlm_dist.model.build import LoraSettings, build_vlm, load_llm, set_trainable
    from vlm_dist.prompt import IGNORE, PromptEncoder

    torch.manual_seed(0)
    llm = load_llm(tiny_models["llm"], mode, torch.float32, lora=LoraSettings(r=4, alpha=8, dropout=0.0))
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
