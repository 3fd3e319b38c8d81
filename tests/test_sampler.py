"""Length-grouped distributed sampler: permutation, equal steps, balance, grouping, resume."""
from collections import Counter

import numpy as np
import pytest
import torch

from vlm_dist.data import BatchStream, LengthGroupedSampler


def make(lengths, modalities, ws, rank=0, **kw):
    kw.setdefault("max_seq_len", 64)
    kw.setdefault("rows_per_micro", 2)
    return LengthGroupedSampler(lengths, modalities, world_size=ws, rank=rank, **kw)


def random_data(n, seed=0, lo=1, hi=64):
    rng = np.random.default_rng(seed)
    return rng.integers(lo, hi + 1, n).tolist(), rng.integers(0, 3, n).tolist()


def check_epoch(s: LengthGroupedSampler, epoch=0):
    """Every structural promise of one epoch's plan; returns the plan."""
    plan = s.plan(epoch)
    n, ws = s.num_samples, s.world_size
    assert plan and all(len(step) == ws for step in plan)
    seen = Counter()
    for step in plan:
        for mb in step:
            assert 1 <= len(mb.rows) <= s.rows_per_micro, "no empty or oversized micro-batch"
            assert all(sum(s.lengths[i] for i in row) <= s.max_seq_len for row in mb.rows)
            if s.max_tokens_per_micro is not None:
                longest = max(sum(s.lengths[i] for i in row) for row in mb.rows)
                assert len(mb.rows) * longest <= s.max_tokens_per_micro
            if not s.packing:
                assert all(len(row) == 1 for row in mb.rows)
            for r in mb.filler_rows:
                assert len(mb.rows[r]) == 1
            seen.update(mb.indices)
    assert seen == Counter(range(n)), "an epoch's union over ranks is exactly a permutation"
    return plan


AWKWARD = [(1, 2), (2, 2), (3, 2), (5, 4), (7, 3), (13, 8), (100, 3), (257, 8), (1001, 7)]


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("n,ws", AWKWARD)
def test_permutation_and_equal_nonempty_steps_for_awkward_sizes(n, ws, packing):
    lengths, mods = random_data(n, seed=n)
    for rows_per_micro in (1, 3):
        s = make(lengths, mods, ws, packing=packing, rows_per_micro=rows_per_micro)
        plan = check_epoch(s)
        # each rank's own view has the same number of micro-batches
        per_rank = [len(make(lengths, mods, ws, rank=r, packing=packing,
                             rows_per_micro=rows_per_micro).micro_batches(0)) for r in range(ws)]
        assert per_rank == [len(plan)] * ws


def test_many_small_random_configurations():
    rng = np.random.default_rng(11)
    for trial in range(100):
        n, ws = int(rng.integers(1, 40)), int(rng.integers(1, 9))
        lengths, mods = random_data(n, seed=trial, hi=int(rng.integers(1, 65)))
        budget = [None, 64, 100][trial % 3]
        s = make(lengths, mods, ws, packing=bool(trial % 2), rows_per_micro=int(rng.integers(1, 4)),
                 max_tokens_per_micro=budget, seed=trial, mega_chunk_steps=int(rng.integers(1, 4)))
        check_epoch(s, epoch=trial)
        assert s.stats(trial)["filler_rows"] < ws


@pytest.mark.parametrize("n,ws", AWKWARD)
def test_token_budget_caps_rows_times_longest(n, ws):
    lengths, mods = random_data(n, seed=n + 1)
    check_epoch(make(lengths, mods, ws, packing=False, rows_per_micro=16, max_tokens_per_micro=128))


def test_one_sample_two_ranks_gets_one_filler_duplicate():
    s = make([10], [1], ws=2)
    (step,) = s.plan(0)
    assert sorted(len(mb.filler_rows) for mb in step) == [0, 1]
    assert [mb.rows for mb in step] == [((0,),), ((0,),)]
    assert s.stats(0)["filler_rows"] == 1


@pytest.mark.parametrize("packing", [True, False])
def test_fillers_only_when_fewer_samples_than_ranks(packing):
    """With >= 2 rows per micro-batch the tail is re-cut instead: no duplicate unless n < world."""
    for n, ws in AWKWARD:
        lengths, mods = random_data(n, seed=n)
        s = make(lengths, mods, ws, packing=packing, rows_per_micro=2)
        fillers = s.stats(0)["filler_rows"]
        assert fillers == max(0, ws - n), (n, ws)


def test_one_row_per_micro_without_packing_pads_only_the_last_step():
    # 7 unsplittable samples, 3 ranks, 1 row each: the last step must carry 2 fillers
    s = make([5] * 7, [0] * 7, ws=3, packing=False, rows_per_micro=1)
    plan = check_epoch(s)
    assert len(plan) == 3 and s.stats(0)["filler_rows"] == 2


@pytest.mark.parametrize("packing", [True, False])
def test_tokens_balanced_across_ranks(packing):
    lengths, mods = random_data(4000, seed=1, lo=8, hi=512)
    s = make(lengths, mods, ws=8, packing=packing, max_seq_len=1024, rows_per_micro=4)
    check_epoch(s)
    assert s.stats(0)["rank_balance"] > 0.97


def test_same_modality_and_similar_length_share_steps():
    lengths, mods = random_data(6000, seed=2, lo=8, hi=1000)
    s = make(lengths, mods, ws=4, packing=False, max_seq_len=1024, rows_per_micro=8)
    plan = check_epoch(s)
    stats = s.stats(0)
    assert stats["mixed_modality_steps"] <= 3, stats          # only around the epoch's tail
    assert stats["pad_efficiency"] > 0.9, stats                # random batches would waste ~half
    mixed_mb = sum(len({mods[i] for i in mb.indices}) > 1 for step in plan for mb in step)
    assert mixed_mb <= 3 * s.world_size
    # steps are not in length order: an optimizer step does not see a run of long ones
    longest = [max(lengths[i] for mb in step for i in mb.indices) for step in plan]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


@pytest.mark.parametrize("modality", [0, 1, 2])
@pytest.mark.parametrize("packing", [True, False])
def test_single_modality_data_is_fine(modality, packing):
    lengths, _ = random_data(300, seed=3)
    s = make(lengths, [modality] * 300, ws=4, packing=packing)
    check_epoch(s)
    assert s.stats(0)["mixed_modality_steps"] == 0


def test_deterministic_for_seed_and_epoch():
    lengths, mods = random_data(500, seed=4)
    a, b = make(lengths, mods, 4, seed=7), make(lengths, mods, 4, seed=7)
    assert a.plan(0) == b.plan(0) and a.plan(3) == b.plan(3)
    assert a.plan(0) != a.plan(1), "a new epoch reshuffles"
    assert a.plan(0) != make(lengths, mods, 4, seed=8).plan(0), "another seed, another order"


def test_packing_fills_rows():
    lengths, mods = random_data(3000, seed=5, lo=20, hi=200)
    s = make(lengths, mods, ws=4, packing=True, max_seq_len=2048, rows_per_micro=2)
    check_epoch(s)
    assert s.stats(0)["pad_efficiency"] > 0.95


# ---- resume ------------------------------------------------------------------------------

class Sample:
    def __init__(self, i, n, n_images):
        self.id = f"s{i}"
        self.input_ids = [(i + t) % 50 + 1 for t in range(n)]
        self.labels = list(self.input_ids)
        self.image_keys = [f"img{i}_{k}" for k in range(n_images)]


def stream_for(samples, lengths, mods, rank, **kw):
    s = make(lengths, mods, ws=2, rank=rank, packing=True, max_seq_len=64, rows_per_micro=2, seed=3)
    feats = {k: torch.full((4, 3), float(j)) for j, smp in enumerate(samples) for k in smp.image_keys}
    return s, BatchStream(s, samples, feats.__getitem__, pad_id=0, max_seq_len=64, feature_shape=(4, 3),
                          num_workers=0, pin_memory=False, **kw)


def test_resume_continues_with_exactly_the_same_batches():
    lengths, _ = random_data(90, seed=6, lo=4, hi=40)
    n_images = [i % 3 for i in range(90)]
    mods = n_images  # 0, 1, 2 images -> modality 0, 1, 2
    samples = [Sample(i, n, k) for i, (n, k) in enumerate(zip(lengths, n_images))]
    s0, _ = stream_for(samples, lengths, mods, 0)
    per_epoch = s0.steps_per_epoch(0)
    total = 2 * per_epoch + 5  # cross two epoch boundaries
    for rank in (0, 1):
        _, full = stream_for(samples, lengths, mods, rank)
        reference = []
        for batch in full:
            reference.append((batch["epoch"], batch["step"], batch["sample_ids"]))
            if len(reference) == total:
                break
        for cut in (0, 3, per_epoch - 1, per_epoch, per_epoch + 2):
            s1, first = stream_for(samples, lengths, mods, rank)
            got = []
            for batch in first if cut else ():
                got.append((batch["epoch"], batch["step"], batch["sample_ids"]))
                if len(got) == cut:
                    break
            state = s1.state_dict()
            s2, resumed = stream_for(samples, lengths, mods, rank)
            s2.load_state_dict(state)
            for batch in resumed:
                if len(got) == total:
                    break
                got.append((batch["epoch"], batch["step"], batch["sample_ids"]))
            assert got == reference, f"rank {rank} resumed after {cut} batches"


def test_state_from_other_data_or_world_is_refused():
    lengths, mods = random_data(50, seed=7)
    state = make(lengths, mods, 2).state_dict()
    assert set(state) == {"epoch", "step", "seed", "world_size", "num_samples", "data_digest", "capacity"}
    with pytest.raises(ValueError, match="world_size"):
        make(lengths, mods, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="data_digest"):
        make(lengths[::-1], mods, 2).load_state_dict(state)
    with pytest.raises(ValueError, match="capacity"):
        make(lengths, mods, 2, rows_per_micro=3).load_state_dict(state)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="sample 1 has 100 tokens"):
        make([3, 100], [0, 0], 2)
    with pytest.raises(ValueError, match="empty"):
        make([], [], 2)
    with pytest.raises(ValueError, match="modality 5"):
        make([3, 4], [0, 5], 2)
    with pytest.raises(ValueError, match="rank 2"):
        make([3], [0], 2, rank=2)
    with pytest.raises(ValueError, match="max_tokens_per_micro"):
        make([3], [0], 2, max_tokens_per_micro=10)


def test_global_num_supervised_is_known_without_communication():
    rng = np.random.default_rng(8)
    samples = []
    for i in range(60):
        s = Sample(i, int(rng.integers(2, 30)), i % 3)
        s.labels = [-100 if t < int(rng.integers(0, 5)) else x for t, x in enumerate(s.input_ids)]
        samples.append(s)
    feats = {k: torch.zeros(4, 3) for smp in samples for k in smp.image_keys}
    per_rank = []
    for rank in (0, 1):
        sampler = LengthGroupedSampler.from_samples(samples, world_size=2, rank=rank, max_seq_len=64,
                                                    rows_per_micro=2, seed=1)
        stream = BatchStream(sampler, samples, feats.__getitem__, pad_id=0, max_seq_len=64,
                             feature_shape=(4, 3), num_workers=0, pin_memory=False, max_epochs=1)
        per_rank.append([(int(b["num_supervised"]), b["global_num_supervised"], b["max_num_supervised"])
                         for b in stream])
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    for (n0, g0, m0), (n1, g1, m1) in zip(*per_rank):
        assert g0 == g1 == n0 + n1
        assert m0 == m1 == max(n0, n1)   # every rank runs the same lm_head chunks, no all-reduce


def test_device_copy_runs_one_batch_ahead_and_the_position_names_the_next_batch_to_train():
    """The CUDA path's order (vlm_dist.data.loader._one_ahead): batch k+1's copy is queued before
    batch k is handed out, yet the saved position counts only batches handed out."""
    from vlm_dist.data.loader import _one_ahead

    lengths, _ = random_data(40, seed=9, lo=4, hi=40)
    samples = [Sample(i, n, 0) for i, n in enumerate(lengths)]
    s, stream = stream_for(samples, lengths, [0] * 40, 0, max_epochs=2)
    events, positions = [], []

    def start(item):
        batch, position = item
        events.append(("copy", batch["epoch"], batch["step"]))
        return item

    def finish(item):
        batch, position = item
        s.set_position(*position)
        events.append(("hand out", batch["epoch"], batch["step"]))
        return batch

    for batch in _one_ahead(stream._planned(), start, finish):
        positions.append(((batch["epoch"], batch["step"]), (s.epoch, s.step)))
    keys = [(e, st) for e in range(2) for st in range(s.steps_per_epoch(e))]
    want = [("copy", *keys[0])]
    for k, key in enumerate(keys):
        want += ([("copy", *keys[k + 1])] if k + 1 < len(keys) else []) + [("hand out", *key)]
    assert events == want
    # resuming from the state saved after batch k trains batch k+1 next, although k+1 was fetched
    assert [p for _, p in positions] == [(e, st + 1) for e, st in keys]


def test_on_the_cpu_batches_stay_on_the_host_as_without_a_device():
    lengths, _ = random_data(30, seed=10, lo=4, hi=40)
    samples = [Sample(i, n, 0) for i, n in enumerate(lengths)]
    _, plain = stream_for(samples, lengths, [0] * 30, 1, max_epochs=1)
    s, on_cpu = stream_for(samples, lengths, [0] * 30, 1, max_epochs=1, device="cpu")
    got, want = list(on_cpu), list(plain)
    assert len(got) == len(want) == s.steps_per_epoch(0)
    for a, b in zip(got, want):
        assert a["input_ids"].device.type == "cpu" and torch.equal(a["input_ids"], b["input_ids"])
    assert (s.epoch, s.step) == (1, 0)


# ---- epochs and gradient accumulation ----------------------------------------------------

def test_packed_epochs_differ_and_total_steps_end_exactly_at_the_last_epochs_end():
    """train.epochs=N: the optimizer steps are summed over each epoch's own plan, every epoch is a
    whole number of optimizer steps, and after them the stream stands at the end of epoch N."""
    lengths, _ = random_data(120, seed=12, lo=4, hi=60)
    n_images = [i % 3 for i in range(120)]
    samples = [Sample(i, n, k) for i, (n, k) in enumerate(zip(lengths, n_images))]
    feats = {k: torch.zeros(4, 3) for smp in samples for k in smp.image_keys}
    epochs, accum = 3, 2
    for rank in (0, 1):
        # small mega-chunks (as on a large dataset): which samples share a packed row changes per epoch
        s = make(lengths, n_images, 2, rank=rank, packing=True, max_seq_len=64, rows_per_micro=1,
                 seed=3, grad_accum=accum, mega_chunk_steps=2)
        micro = [s.steps_per_epoch(e) for e in range(epochs + 1)]
        assert len(set(micro)) > 1, "packing: epochs differ in length (epoch 0 alone is not the answer)"
        assert all(m % accum == 0 for m in micro), "every epoch is a whole number of optimizer steps"
        for e in range(epochs):
            check_epoch(s, e)   # still exactly a permutation per epoch
        total = s.optimizer_steps(epochs)
        assert total == sum(micro[:epochs]) // accum != epochs * (micro[0] // accum)
        stream = iter(BatchStream(s, samples, feats.__getitem__, pad_id=0, max_seq_len=64,
                                  feature_shape=(4, 3), num_workers=0, pin_memory=False))
        seen = [(b["epoch"], b["step"]) for b in (next(stream) for _ in range(total * accum))]
        assert seen[-1] == (epochs - 1, micro[epochs - 1] - 1), "the last step ends epoch N exactly"
        nxt = next(stream)
        assert (nxt["epoch"], nxt["step"]) == (epochs, 0)


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("n,ws,rows,accum", [(6, 2, 3, 2), (4, 2, 1, 3), (1, 2, 1, 4), (37, 3, 2, 5)])
def test_grad_accum_rounds_an_epoch_up_by_splitting_steps_or_filler_steps(n, ws, rows, accum, packing):
    lengths, mods = random_data(n, seed=n, lo=2, hi=30)
    s = make(lengths, mods, ws, packing=packing, rows_per_micro=rows, grad_accum=accum)
    plan = check_epoch(s)
    assert len(plan) % accum == 0 and s.optimizer_steps(1) == len(plan) // accum
    plain = make(lengths, mods, ws, packing=packing, rows_per_micro=rows).plan(0)
    extra = len(plan) - len(plain)
    assert 0 <= extra < accum
    fillers = sum(len(mb.filler_rows) for step in plan for mb in step)
    plain_fillers = sum(len(mb.filler_rows) for step in plain for mb in step)
    if n >= 2 * ws * accum and not (not packing and rows == 1):
        assert fillers == plain_fillers, "enough samples: steps are split, no filler step is added"
