"""Packing samples into rows and collating rows into the batch the model consumes.

`pack_rows` puts samples into rows of at most `max_seq_len` tokens (best-fit
decreasing). `collate` turns the rows of one micro-batch into tensors:

    input_ids     (R, L) long   pad_id after each row's last sample, L = longest row
                                rounded up to a multiple of 8 (never past max_seq_len
                                unless a row is already longer)
    targets       (R, L) long   next-token targets shifted WITHIN each sample:
                                targets[r, t] = labels[t + 1] of the same sample; -100 at
                                each sample's last token, at padding, and in filler rows
    position_ids  (R, L) long   0..n-1 for every sample; the padding tail is its own 0..k-1
    media         {kind: {"features": (M, P, D), "counts": (R,) long}} per media kind
                                ("image" always; "video" when the batch or the lookups
                                have videos): one feature row per VIEW (an untiled image: 1;
                                a tiled image: thumbnail + tiles; a video: one per frame),
                                in slot order: rows in order, samples left to right, a
                                sample's items in block order, an item's views in order;
                                counts[r] = views of that kind in row r
    sample_ids    list[list[str]]  ids per row (a filler row lists its duplicated id)
    filler_rows   list[int]     rows that are zero-supervision duplicates (see sampler.py)
    num_tokens    int           real tokens (padding and filler rows excluded)
    num_supervised  long scalar (targets != -100).sum()
    supervised_index  (S,) long flat positions in targets.reshape(-1) where != -100
    cu_seqlens    (S'+1,) int32 offsets of every sample, and of every row's padding tail
                                (its own segment), in the flattened (R * L) token stream
    max_seqlen    int           the longest segment (a Python int: no host sync on the GPU)
    media[kind]["slots"]  (M * N,) long  flat positions of that kind's pad tokens, in slot
                                order; only for the kinds collate is given a pad id of

The model computes CE(logits[r, t], targets[r, t]) with no further shift. Samples of a
row must not attend to each other: the model hands cu_seqlens to the attention backend
explicitly (vlm_dist/model/attention.py) rather than letting transformers guess packing
from position ids, which its flash path does only at batch size 1. The image slots let
the splice use index_copy (backward: a gather, no sync) instead of masked_scatter.
A tiled image's or a video's block has N slots per view (contract.tiling, contract.video), so
views x N = slots per kind, which the model's check_media_slots verifies.

    python -m pytest tests/test_pack.py -q
"""
from __future__ import annotations

import bisect
from typing import Callable, Mapping, Protocol, Sequence

import torch

from vlm_dist.contract.media import IMAGE
from vlm_dist.contract.prompt import IGNORE


class PackableSample(Protocol):
    """What collate needs from an encoded sample (vlm_dist.contract.prompt.EncodedSample has it;
    its `media` {kind: keys} is read when present, else `image_keys`)."""
    id: str
    input_ids: Sequence[int]
    labels: Sequence[int]  # the token itself where supervised, -100 elsewhere (unshifted)

    @property
    def image_keys(self) -> Sequence[str]: ...


def pack_rows(lengths: Sequence[int], indices: Sequence[int], max_seq_len: int) -> list[list[int]]:
    """Best-fit decreasing: pack `indices` (into `lengths`) into rows of <= max_seq_len tokens.

    Deterministic: longest first (ties by position in `indices`); each sample goes to
    the fullest row it still fits in (ties: the older row); rows come back in the
    order they were opened.
    """
    order = sorted(range(len(indices)), key=lambda i: (-lengths[indices[i]], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free tokens, row number), sorted
    for i in order:
        idx = indices[i]
        n = lengths[idx]
        if n > max_seq_len:
            raise ValueError(f"sample {idx} has {n} tokens, more than max_seq_len={max_seq_len}; "
                             "encode with the same max_seq_len as the loader")
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            rows.append([idx])
            bisect.insort(free, (max_seq_len - n, len(rows) - 1))
        else:
            room, row = free.pop(at)
            rows[row].append(idx)
            bisect.insort(free, (room - n, row))
    return rows


def count_targets(labels: Sequence[int]) -> int:
    """Next-token targets a sample yields in collate: supervised labels after its first token."""
    return sum(1 for x in labels[1:] if x != IGNORE)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def media_of(sample) -> dict[str, Sequence[str]]:
    """A sample's media keys per kind, in block order: its `media` dict (EncodedSample), or just
    its `image_keys` (a sample type that knows only images)."""
    media = getattr(sample, "media", None)
    if isinstance(media, dict):
        return media
    return {IMAGE.name: sample.image_keys} if sample.image_keys else {}


def collate(samples: Sequence[Sequence[PackableSample]],
            features_lookup: Callable[[str], torch.Tensor] | Mapping[str, Callable[[str], torch.Tensor]],
            pad_id: int, max_seq_len: int, *, feature_shape: tuple[int, int] | None = None,
            feature_dtype: torch.dtype | None = None, filler_rows: Sequence[int] = (),
            pad_to_multiple: int = 8, pin_memory: bool = False, image_pad_id: int | None = None,
            pad_ids: Mapping[str, int] | None = None) -> dict:
    """Collate rows of samples (`samples[r]` = the samples of row r, left to right).

    features_lookup: key -> (P, D) (one view) or (V, P, D) (a tiled image's thumbnail and tiles,
    a video's frames), one callable for every kind or {kind: callable} (e.g. {"image":
    cache.views, "video": cache.views}; an untiled config reads images' view 0: cache[key]).
    The batch gets a media entry for "image" always, and for every other kind that the mapping
    names or that a sample has. feature_shape=(P, D) is needed only to shape an image-less
    batch's empty features (and is checked against every feature when given). Rows listed in
    filler_rows get no supervision. pad_ids {kind: pad token id} (image_pad_id: the image's
    alone): each of those kinds' slots are listed.
    """
    if not samples or any(len(row) == 0 for row in samples):
        raise ValueError(f"collate needs at least one row and no empty row; got row sizes "
                         f"{[len(r) for r in samples]}")
    fillers = set(filler_rows)
    if not fillers <= set(range(len(samples))):
        raise ValueError(f"filler_rows {sorted(fillers)} out of range for {len(samples)} rows")
    pads = dict(pad_ids or {})
    if image_pad_id is not None:
        pads.setdefault(IMAGE.name, image_pad_id)
    per_kind = isinstance(features_lookup, Mapping)
    kinds = [IMAGE.name] + ([k for k in features_lookup if k != IMAGE.name] if per_kind else [])
    row_lens = [sum(len(s.input_ids) for s in row) for row in samples]
    longest = max(row_lens)
    width = max(min(_round_up(longest, pad_to_multiple), max_seq_len), longest)

    n_rows = len(samples)
    input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
    targets = torch.full((n_rows, width), IGNORE, dtype=torch.long)
    position_ids = torch.empty((n_rows, width), dtype=torch.long)
    counts: dict[str, torch.Tensor] = {}
    features: dict[str, list[torch.Tensor]] = {}
    sample_ids: list[list[str]] = []
    num_tokens = 0
    seg_lens: list[int] = []  # samples and padding tails, row-major: the varlen boundaries
    for r, row in enumerate(samples):
        t = 0
        for s in row:
            n = len(s.input_ids)
            if n == 0 or len(s.labels) != n:
                raise ValueError(f"sample {s.id!r}: {n} input ids and {len(s.labels)} labels "
                                 "(need the same, non-zero count)")
            ids = torch.as_tensor(s.input_ids, dtype=torch.long)
            labels = torch.as_tensor(s.labels, dtype=torch.long)
            if not torch.all((labels == ids) | (labels == IGNORE)):
                bad = int(torch.nonzero((labels != ids) & (labels != IGNORE))[0])
                raise ValueError(f"sample {s.id!r}: label {int(labels[bad])} at position {bad} is "
                                 f"neither the token {int(ids[bad])} nor {IGNORE} (labels must be "
                                 "unshifted: the token itself where supervised)")
            input_ids[r, t:t + n] = ids
            position_ids[r, t:t + n] = torch.arange(n)
            if r not in fillers:
                targets[r, t:t + n - 1] = labels[1:]
                num_tokens += n
            for kind, keys in media_of(s).items():
                if not keys:
                    continue
                if kind not in kinds:
                    if per_kind:
                        raise ValueError(f"sample {s.id!r} has {kind} items but collate was given no "
                                         f"{kind} lookup (features_lookup has {sorted(features_lookup)})")
                    kinds.append(kind)
                lookup = features_lookup[kind] if per_kind else features_lookup
                for key in keys:
                    feat = lookup(key)
                    if feat.dim() == 2:
                        feat = feat.unsqueeze(0)                           # one view
                    if feat.dim() != 3 or (feature_shape is not None
                                           and tuple(feat.shape[1:]) != tuple(feature_shape)):
                        raise ValueError(f"sample {s.id!r}: features of {kind} {key!r} have shape "
                                         f"{tuple(feat.shape)}, expected (P, D) or (views, P, D) with "
                                         f"(P, D) = {tuple(feature_shape) if feature_shape else '?'}")
                    features.setdefault(kind, []).append(feat)
                    counts.setdefault(kind, torch.zeros(n_rows, dtype=torch.long))[r] += feat.shape[0]
            seg_lens.append(n)
            t += n
        position_ids[r, t:] = torch.arange(width - t)
        if t < width:
            seg_lens.append(width - t)
        sample_ids.append([s.id for s in row])

    media = {}
    for kind in kinds:
        if features.get(kind):
            feats = torch.cat(features[kind])                              # (views, P, D)
        else:
            if feature_shape is None:
                raise ValueError(f"this batch has no {kind}, and collate was given no feature_shape=(P, D) "
                                 f"to shape its empty (0, P, D) features; pass the cache's feature shape")
            feats = torch.empty((0, *feature_shape), dtype=feature_dtype or torch.float32)
        media[kind] = {"features": feats, "counts": counts.get(kind, torch.zeros(n_rows, dtype=torch.long))}
        if kind in pads:
            media[kind]["slots"] = (input_ids.reshape(-1) == pads[kind]).nonzero().squeeze(1)
    batch = {
        "input_ids": input_ids,
        "targets": targets,
        "position_ids": position_ids,
        "media": media,
        "cu_seqlens": torch.tensor([0] + seg_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32),
        "max_seqlen": max(seg_lens),
        "sample_ids": sample_ids,
        "filler_rows": sorted(fillers),
        "num_tokens": num_tokens,
        "num_supervised": (targets != IGNORE).sum(),
        # flat positions of targets != -100, computed here in the worker so the trainer can
        # gather hidden states at supervised positions without a host-device sync
        "supervised_index": (targets.reshape(-1) != IGNORE).nonzero().squeeze(1),
    }
    return pin(batch) if pin_memory else batch


def pin(batch):
    """Pin every tensor in a (nested) batch; other values pass through."""
    if isinstance(batch, torch.Tensor):
        return batch.pin_memory()
    if isinstance(batch, dict):
        return {k: pin(v) for k, v in batch.items()}
    return batch
