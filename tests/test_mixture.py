"""Stage mixtures: counts follow weights / sample counts, draws are deterministic and independent."""
from collections import Counter

import pytest

from vlm_dist.data.mixture import (MixtureError, MixtureSource, build_mixture, format_summary, hold_out,
                                   mixture_counts, sources_from_config)


def test_weights_share_the_total_exactly():
    src = [MixtureSource("a", 1000, weight=0.7), MixtureSource("b", 50, weight=0.2),
           MixtureSource("c", 10, weight=0.1)]
    assert mixture_counts(src, total=999) == {"a": 699, "b": 200, "c": 100}
    order, summary = build_mixture(src, seed=0, total=999)
    assert len(order) == 999 and Counter(n for n, _ in order) == {"a": 699, "b": 200, "c": 100}
    assert summary["datasets"]["b"] == {"size": 50, "drawn": 200, "unique": 50, "epochs": 4.0, "share": 0.2002}


def test_samples_are_exact_and_weights_get_the_rest():
    src = [MixtureSource("golden", 7, count=20), MixtureSource("big", 100, weight=1.0)]
    order, _ = build_mixture(src, seed=3, total=120)
    per = Counter(n for n, _ in order)
    assert per == {"golden": 20, "big": 100}
    # 20 draws of 7 records: every record twice, 6 distinct ones a third time
    reps = Counter(i for n, i in order if n == "golden")
    assert sorted(reps.values()) == [2] + [3] * 6
    assert sorted(i for n, i in order if n == "big") == list(range(100))


def test_without_total_weights_rebalance_the_natural_size():
    src = [MixtureSource("a", 90, weight=1), MixtureSource("b", 10, weight=1)]
    assert mixture_counts(src) == {"a": 50, "b": 50}


def test_deterministic_for_a_seed_and_independent_per_dataset():
    src = [MixtureSource("a", 1000, weight=1), MixtureSource("b", 1000, count=300)]
    o1, s1 = build_mixture(src, seed=5, total=800)
    o2, s2 = build_mixture(src, seed=5, total=800)
    assert o1 == o2 and s1 == s2
    assert build_mixture(src, seed=6, total=800)[0] != o1
    # re-weighting "a" does not change which records of "b" are drawn
    src2 = [MixtureSource("a", 1000, weight=1), MixtureSource("b", 1000, count=300)]
    o3, _ = build_mixture(src2, seed=5, total=1200)
    assert sorted(i for n, i in o1 if n == "b") == sorted(i for n, i in o3 if n == "b")
    # the draw is interleaved, not dataset after dataset
    assert {n for n, _ in o1[:50]} == {"a", "b"}
    # indices stay in range
    assert all(0 <= i < 1000 for _, i in o1)


@pytest.mark.parametrize("src,total,match", [
    ([MixtureSource("a", 10)], None, "exactly one of weight or count"),
    ([MixtureSource("a", 10, weight=1, count=3)], None, "exactly one of weight or count"),
    ([MixtureSource("a", 0, weight=1)], None, "'a': size 0"),
    ([MixtureSource("a", 10, weight=-1)], None, "weight -1"),
    ([MixtureSource("a", 10, count=5)], 3, "less than the fixed sample counts"),
    ([MixtureSource("a", 10, count=5)], 9, "no dataset has a weight"),
    ([MixtureSource("a", 10, weight=1), MixtureSource("a", 5, weight=1)], None, "unique"),
])
def test_bad_configs_name_the_dataset(src, total, match):
    with pytest.raises(MixtureError, match=match):
        build_mixture(src, seed=0, total=total)


def test_summary_line_for_the_log():
    _, summary = build_mixture([MixtureSource("mix665k", 100, weight=3), MixtureSource("mantis", 50, weight=1)],
                               seed=0, total=200)
    text = format_summary(summary)
    assert "mix665k: drew 150 of 100 (75.0% of the mix, 1.50 epochs, 100 distinct)" in text
    assert "mantis: drew 50 of 50" in text


def test_sources_from_config_entries():
    from vlm_dist.config import RecordSource
    entries = [RecordSource("a.jsonl"), RecordSource("b.jsonl")]
    src = sources_from_config(entries, {"a.jsonl": 10, "b.jsonl": 5})
    order, summary = build_mixture(src, seed=0)
    assert Counter(n for n, _ in order) == {"a.jsonl": 10, "b.jsonl": 5}
    src = sources_from_config([RecordSource("a.jsonl", weight=1.0), RecordSource("b.jsonl", weight=3.0)],
                              {"a.jsonl": 10, "b.jsonl": 30})
    assert mixture_counts(src) == {"a.jsonl": 10, "b.jsonl": 30}
    with pytest.raises(MixtureError, match="'c.jsonl': no record count"):
        sources_from_config([RecordSource("c.jsonl")], {})


def _split_and_draw(ids, fraction, seed):
    """hold_out, then an upsampled mixture (3 epochs of a, 2 of b) drawn from the training side only."""
    held, train = hold_out(ids, fraction, seed)
    order, _ = build_mixture([MixtureSource("a", len(train["a"]), count=3 * len(train["a"])),
                              MixtureSource("b", len(train["b"]), count=2 * len(train["b"]))], seed)
    trained = [ids[n][train[n][i]] for n, i in order]
    held_ids = [ids[n][i] for n in ids for i in held[n]]
    return held_ids, trained


def test_hold_out_is_split_before_the_mixture_repeats_records():
    # b repeats ids of a (and one of its own): an id stays on one side whatever file holds it
    ids = {"a": [f"a{i}" for i in range(200)], "b": [f"b{i}" for i in range(50)] + ["a7", "a8", "b3"]}
    held_ids, trained = _split_and_draw(ids, 0.1, seed=0)
    assert len(held_ids) == len(set(held_ids)) == 20 + 5     # floor(10%) of each file's distinct ids, no repeats
    assert not set(held_ids) & set(trained)                  # nothing held out is ever trained on
    assert Counter(trained).most_common(1)[0][1] >= 3        # while the mixture does upsample
    assert _split_and_draw(ids, 0.1, seed=0) == (held_ids, trained)
    assert _split_and_draw(ids, 0.1, seed=1)[0] != held_ids


def test_hold_out_takes_at_least_one_record_and_never_a_whole_dataset():
    held, train = hold_out({"a": ["x", "y"], "b": ["z", "w", "v"]}, 0.01, seed=0)
    assert (len(held["a"]), len(held["b"])) == (0, 1) and len(train["a"]) == 2 and len(train["b"]) == 2
    held, train = hold_out({"a": ["x", "y"]}, 0.0, seed=0)
    assert len(held["a"]) == 0 and train["a"].tolist() == [0, 1]
    with pytest.raises(MixtureError, match="'a': all of its 1 record"):
        hold_out({"a": ["x"]}, 0.5, seed=0)   # the one record would be held out
