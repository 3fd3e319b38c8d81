"""Packing and collate: row packing, shifted targets at boundaries, positions, media order,
fillers, the DataLoader wiring, the samples' boundaries and image slots (a packed row's loss
equal to each sample's loss alone is in test_attention.py)."""
from dataclasses import dataclass, field

import pytest
import torch

from vlm_dist.data import IGNORE, MicroBatch, build_loader, collate, pack_rows

P, D = 4, 3


@dataclass
class S:
    id: str
    input_ids: list
    labels: list
    image_keys: list = field(default_factory=list)


def sample(sid, ids, supervised_from=0, images=()):
    labels = [t if i >= supervised_from else IGNORE for i, t in enumerate(ids)]
    return S(sid, list(ids), labels, list(images))


def lookup_of(*keys):
    return {k: torch.full((P, D), float(j)) for j, k in enumerate(keys)}.__getitem__


def test_pack_rows_fits_every_sample_once_and_is_deterministic():
    lengths = [7, 3, 9, 1, 5, 5, 2, 10, 4]
    rows = pack_rows(lengths, list(range(9)), 10)
    assert sorted(i for r in rows for i in r) == list(range(9))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows)
    assert len(rows) == 5  # 46 tokens: best fit reaches the lower bound
    assert rows == pack_rows(lengths, list(range(9)), 10)
    with pytest.raises(ValueError, match="sample 2 has 9 tokens"):
        pack_rows(lengths, [0, 2], 8)


def test_targets_shift_within_each_sample_and_stop_at_boundaries():
    a = sample("a", [11, 12, 13, 14], supervised_from=2)    # supervised: 13, 14
    b = sample("b", [21, 22, 23], supervised_from=1)        # supervised: 22, 23
    c = sample("c", [31, 32], supervised_from=0)
    batch = collate([[a, b], [c]], lookup_of(), pad_id=0, max_seq_len=16, feature_shape=(P, D))
    x = IGNORE
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 21, 22, 23, 0],
                                           [31, 32, 0, 0, 0, 0, 0, 0]]
    assert batch["targets"].tolist() == [[x, 13, 14, x, 22, 23, x, x],
                                         [32, x, x, x, x, x, x, x]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0],
                                              [0, 1, 0, 1, 2, 3, 4, 5]]
    assert batch["num_tokens"] == 9
    assert int(batch["num_supervised"]) == 5
    assert batch["supervised_index"].tolist() == [1, 2, 4, 5, 8]
    assert batch["sample_ids"] == [["a", "b"], ["c"]]
    # the boundaries the attention backend gets: a, b, row 0's pad tail, c, row 1's pad tail
    assert batch["cu_seqlens"].dtype == torch.int32
    assert batch["cu_seqlens"].tolist() == [0, 4, 7, 8, 10, 16]
    assert batch["max_seqlen"] == 6 and isinstance(batch["max_seqlen"], int)


def test_image_slots_are_flat_positions_in_slot_order():
    pad = 99
    a = sample("a", [1, pad, pad, 2, pad, pad], images=["k1", "k2"])
    b = sample("b", [3, pad, pad], images=["k3"])
    batch = collate([[a], [b]], lookup_of("k1", "k2", "k3"), 0, 8, feature_shape=(P, D), image_pad_id=pad)
    assert batch["media"]["image"]["slots"].tolist() == [1, 2, 4, 5, 9, 10]  # row 1 starts at 8
    assert "slots" not in collate([[a]], lookup_of("k1", "k2"), 0, 8)["media"]["image"]


def test_width_rounds_to_multiple_of_8_but_not_past_max_seq_len():
    def width(n, max_seq_len):
        return collate([[sample("a", [1] * n)]], lookup_of(), 0, max_seq_len,
                       feature_shape=(P, D))["input_ids"].shape[1]
    assert width(9, 64) == 16 and width(16, 64) == 16 and width(9, 12) == 12 and width(9, 9) == 9


def test_media_in_slot_order_with_counts_per_row():
    a = sample("a", [1] * 5, images=["k1", "k2"])
    b = sample("b", [1] * 4)
    c = sample("c", [1] * 3, images=["k3"])
    d = sample("d", [1] * 6, images=["k4", "k1"])
    lookup = lookup_of("k1", "k2", "k3", "k4")  # features of k_j are filled with j - 1
    batch = collate([[a, b, c], [d]], lookup, 0, 32, feature_shape=(P, D))
    feats = batch["media"]["image"]["features"]
    assert feats.shape == (5, P, D)
    assert feats[:, 0, 0].tolist() == [0.0, 1.0, 2.0, 3.0, 0.0]  # k1 k2 k3 | k4 k1
    assert batch["media"]["image"]["counts"].tolist() == [3, 2]


def test_text_only_batch_has_empty_features_of_known_shape():
    batch = collate([[sample("a", [1, 2, 3])]], lookup_of(), 0, 8, feature_shape=(P, D),
                    feature_dtype=torch.bfloat16)
    feats = batch["media"]["image"]["features"]
    assert feats.shape == (0, P, D) and feats.dtype == torch.bfloat16
    assert batch["media"]["image"]["counts"].tolist() == [0]
    with pytest.raises(ValueError, match="feature_shape"):
        collate([[sample("a", [1, 2, 3])]], lookup_of(), 0, 8)


def test_filler_rows_carry_no_supervision_and_no_tokens():
    a, b = sample("a", [1, 2, 3]), sample("b", [4, 5])
    batch = collate([[a], [b]], lookup_of(), 0, 8, feature_shape=(P, D), filler_rows=[1])
    assert (batch["targets"][1] == IGNORE).all() and (batch["targets"][0] != IGNORE).sum() == 2
    assert batch["num_tokens"] == 3 and batch["filler_rows"] == [1]


def test_bad_samples_are_named():
    with pytest.raises(ValueError, match="sample 'x'.*label 7 at position 1"):
        collate([[S("x", [1, 2, 3], [1, 7, 3])]], lookup_of(), 0, 8, feature_shape=(P, D))
    with pytest.raises(ValueError, match="sample 'y'"):
        collate([[S("y", [1, 2], [1])]], lookup_of(), 0, 8, feature_shape=(P, D))
    with pytest.raises(ValueError, match="image 'k1' have shape"):
        collate([[sample("z", [1], images=["k1"])]], {"k1": torch.zeros(2, 2)}.__getitem__, 0, 8,
                feature_shape=(P, D))


def test_loader_with_workers_yields_collated_micro_batches_in_order():
    samples = [sample(f"s{i}", list(range(1, 2 + i % 7)), images=[f"k{i}"] * (i % 3)) for i in range(24)]
    lookup = lookup_of(*[f"k{i}" for i in range(24)])
    mbs = [MicroBatch(((i, i + 1), (i + 2,))) for i in range(0, 24, 3)]
    mbs[-1] = MicroBatch(mbs[-1].rows, filler_rows=(1,))
    loader = build_loader(mbs, samples, lookup, pad_id=0, max_seq_len=16, feature_shape=(P, D),
                          num_workers=2, prefetch_factor=2, pin_memory=True)
    got = list(loader)
    assert len(got) == len(mbs)
    for mb, batch in zip(mbs, got):
        want = collate([[samples[j] for j in row] for row in mb.rows], lookup, 0, 16,
                       feature_shape=(P, D), filler_rows=mb.filler_rows)
        assert batch["sample_ids"] == want["sample_ids"]
        for key in ("input_ids", "targets", "position_ids"):
            assert torch.equal(batch[key], want[key])
        assert torch.equal(batch["media"]["image"]["features"], want["media"]["image"]["features"])
