"""Dataset mixtures: which records of which dataset a stage trains on, deterministic for a seed.

A stage lists its datasets, each with either an exact sample count or a weight:

    sources = [MixtureSource("mix665k", size=665_298, weight=0.7),
               MixtureSource("mantis_nlvr2", size=86_373, weight=0.3),
               MixtureSource("golden", size=200, count=1_000)]
    order, summary = build_mixture(sources, seed=0, total=500_000)

- `count=n` draws exactly n records from that dataset.
- weights share what is left: `total - sum(counts)` when `total` is given,
  otherwise the summed sizes of the weighted datasets (so weights re-balance
  the natural size). Counts are apportioned by largest remainder, so they add
  up exactly.
- n draws from a dataset of size s: every record floor(n/s) times, plus
  n mod s distinct records from a permutation seeded by (seed, dataset name);
  so adding or re-weighting one dataset never changes another's draw.
- The result is shuffled with the seed: a list of (dataset name, record index).

`summary` says what was drawn from each dataset (for the run log); a pure
function, no I/O. `format_summary(summary)` renders it as one line per dataset.

A held-out eval split is taken before the draw, among each dataset's distinct
records (`hold_out`), so an upsampled record can never be on both sides:

    held, train = hold_out({"mix665k": ids_a, "golden": ids_b}, fraction=0.01, seed=0)

    python -m pytest tests/test_mixture.py -q
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from vlm_dist.errors import UserError


class MixtureError(UserError, ValueError):
    """A mixture config that cannot be drawn; names the dataset and the field."""


@dataclass(frozen=True)
class MixtureSource:
    name: str                    # dataset name, as in the stage config and the logs
    size: int                    # records available (after conversion and the supervision check)
    weight: float | None = None  # share of the weighted part of the mixture
    count: int | None = None     # exact number of draws (exclusive with weight)


def _validate(sources: list[MixtureSource]) -> None:
    if not sources:
        raise MixtureError("a mixture needs at least one dataset")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise MixtureError(f"dataset names must be unique, got {names}")
    for s in sources:
        if (s.weight is None) == (s.count is None):
            raise MixtureError(f"dataset {s.name!r}: give exactly one of weight or count")
        if s.size <= 0:
            raise MixtureError(f"dataset {s.name!r}: size {s.size} (no records to draw from)")
        if s.weight is not None and not (math.isfinite(s.weight) and s.weight >= 0):
            raise MixtureError(f"dataset {s.name!r}: weight {s.weight} must be a finite number >= 0")
        if s.count is not None and s.count < 0:
            raise MixtureError(f"dataset {s.name!r}: count {s.count} must be >= 0")


def mixture_counts(sources: list[MixtureSource], total: int | None = None) -> dict[str, int]:
    """How many records to draw from each dataset (see the module docstring)."""
    _validate(sources)
    fixed = {s.name: int(s.count) for s in sources if s.count is not None}
    weighted = [s for s in sources if s.weight is not None]
    if total is None:
        budget = sum(s.size for s in weighted)
    else:
        budget = total - sum(fixed.values())
        if budget < 0:
            raise MixtureError(f"total {total} is less than the fixed sample counts {sum(fixed.values())}")
        if budget > 0 and not weighted:
            raise MixtureError(f"total {total} leaves {budget} draws but no dataset has a weight")
    wsum = sum(s.weight for s in weighted)
    if weighted and budget > 0 and wsum <= 0:
        raise MixtureError("the weights of the weighted datasets sum to 0")
    counts = dict(fixed)
    if weighted:
        exact = [budget * s.weight / wsum if wsum > 0 else 0.0 for s in weighted]
        floors = [math.floor(x) for x in exact]
        left = budget - sum(floors)
        # largest remainder; ties go to the earlier-listed dataset
        by_rem = sorted(range(len(weighted)), key=lambda i: (-(exact[i] - floors[i]), i))
        for i in by_rem[:left]:
            floors[i] += 1
        counts.update({s.name: n for s, n in zip(weighted, floors)})
    return {s.name: counts[s.name] for s in sources}


def _draw(size: int, count: int, seed: int, name: str) -> np.ndarray:
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    passes, rest = divmod(count, size)
    return np.concatenate([np.tile(np.arange(size), passes), rng.permutation(size)[:rest]]).astype(np.int64)


def build_mixture(sources: list[MixtureSource], seed: int, total: int | None = None,
                  shuffle: bool = True) -> tuple[list[tuple[str, int]], dict]:
    """The drawn (dataset name, record index) list, shuffled with `seed`, and a summary dict.

    summary = {"seed", "total", "datasets": {name: {"size", "drawn", "unique", "epochs", "share"}}}
    """
    counts = mixture_counts(sources, total)
    names, indices, summary = [], [], {}
    drawn_total = sum(counts.values())
    for k, s in enumerate(sources):
        idx = _draw(s.size, counts[s.name], seed, s.name)
        names.append(np.full(len(idx), k, dtype=np.int64))
        indices.append(idx)
        summary[s.name] = {"size": s.size, "drawn": int(len(idx)), "unique": int(min(len(idx), s.size)),
                           "epochs": round(len(idx) / s.size, 4),
                           "share": round(len(idx) / drawn_total, 4) if drawn_total else 0.0}
    which, where = np.concatenate(names), np.concatenate(indices)
    if shuffle:
        perm = np.random.default_rng([seed, 0x6D6978]).permutation(len(which))
        which, where = which[perm], where[perm]
    order = [(sources[k].name, int(i)) for k, i in zip(which.tolist(), where.tolist())]
    return order, {"seed": seed, "total": drawn_total, "datasets": summary}


def hold_out(ids: dict[str, list[str]], fraction: float, seed: int) -> tuple[dict[str, np.ndarray],
                                                                             dict[str, np.ndarray]]:
    """Split each dataset's records (positions into ids[name]) into (held-out, training), before any draw.

    floor(fraction x distinct ids) ids of each dataset are held out (at least one id in
    all when fraction > 0), from a permutation seeded by (seed, dataset name). Every
    record carrying a held-out id, in any dataset, leaves the training side, and the
    held-out side has one record per id (its first), so no id is on both sides and
    the eval set has no repeats. Sorted positions; the same for the same seed.
    """
    names = list(ids)
    if fraction <= 0:
        return ({n: np.zeros(0, dtype=np.int64) for n in names},
                {n: np.arange(len(ids[n]), dtype=np.int64) for n in names})
    distinct = {n: list(dict.fromkeys(ids[n])) for n in names}
    counts = {n: int(len(distinct[n]) * fraction) for n in names}
    if names and not any(counts.values()):
        counts[max(names, key=lambda n: len(distinct[n]))] = 1   # names order breaks ties
    held_ids: set[str] = set()
    for n in names:
        pick = np.random.default_rng([seed, zlib.crc32(n.encode()), 0xE7A1]).permutation(len(distinct[n]))
        held_ids.update(distinct[n][i] for i in pick[:counts[n]])
    held, train, seen = {}, {}, set()
    for n in names:
        held_pos = []
        for i, rid in enumerate(ids[n]):
            if rid in held_ids and rid not in seen:
                seen.add(rid)
                held_pos.append(i)
        held[n] = np.asarray(held_pos, dtype=np.int64)
        train[n] = np.asarray([i for i, rid in enumerate(ids[n]) if rid not in held_ids], dtype=np.int64)
        if len(ids[n]) and not len(train[n]):
            raise MixtureError(f"dataset {n!r}: all of its {len(ids[n])} record(s) would be held out for eval "
                               f"(eval fraction {fraction}); lower the fraction or give it more records")
    return held, train


def sources_from_config(entries, sizes: dict[str, int]) -> list[MixtureSource]:
    """MixtureSources from config entries with .path/.weight/.count (vlm_dist.config.RecordSource).

    `sizes[path]` is the number of usable records in that file. An entry with
    neither weight nor count contributes every record once (count = size).
    The dataset name is the path, as the config spells it.
    """
    out = []
    for e in entries:
        if e.path not in sizes:
            raise MixtureError(f"dataset {e.path!r}: no record count given for it")
        weight, count = e.weight, e.count
        if weight is None and count is None:
            count = sizes[e.path]
        out.append(MixtureSource(e.path, sizes[e.path], weight=weight, count=count))
    return out


def format_summary(summary: dict) -> str:
    """One line per dataset for the run log."""
    lines = [f"mixture (seed {summary['seed']}): {summary['total']} samples"]
    for name, d in summary["datasets"].items():
        lines.append(f"  {name}: drew {d['drawn']} of {d['size']} ({d['share']:.1%} of the mix, "
                     f"{d['epochs']:.2f} epochs, {d['unique']} distinct)")
    return "\n".join(lines)
