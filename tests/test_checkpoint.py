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
