"""Evaluation: answer parsing and accounting (pure functions), and the model-driven runs behind vlm-eval.

Answer keys live in contract records (vlm_dist.contract.records) as an extra top-level field:
    which-image probes   "answer": 1-based position of the image that shows the asked thing
    NLVR2-style pairs    "answer": true | false  (or "true"/"false"/"yes"/"no")
    multiple choice      "answer": "B"  (optional "choices": [option texts], A first)
    POPE yes/no probes   "answer": "yes" | "no", "pope_setting": "random" | "popular" | "adversarial"
Captions and ordered descriptions use the last assistant turn as the reference.

Grounding probes are re-asked with the images rotated (`rotated_probes`): each
record is asked k times, the answer image once in every position, so accuracy
per position exposes a model that favours the latest image.

POPE (Li et al. 2023, object hallucination): "Is there a X in the image?" asked for the
objects present (yes) and as many absent ones (no), the absent ones drawn three ways
(`pope_negatives`); a reply is read by its first word (`parse_yes_no`), and accuracy,
precision, recall, F1 and the yes-ratio are reported per setting (`score_pope`).

Distributed: `shard` splits the records by rank; `gather` all_gathers results
when torch.distributed is initialised (one process: a no-op).

    python -m pytest tests/test_eval.py -q
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Callable, Sequence

import torch

from vlm_dist.contract.prompt import PromptEncoder, SampleError

# -- text normalisation and parsing ----------------------------------------------------------
ORDINALS = {"first": 1, "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7,
            "eighth": 8, "ninth": 9, "tenth": 10, "last": -1}
NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
                "nine": 9, "ten": 10}
TRUE_WORDS, FALSE_WORDS = ("true", "yes", "correct"), ("false", "no", "incorrect", "wrong")


def normalize_text(text: str) -> str:
    """Lowercase, punctuation -> spaces, single spaces: 'A red circle.' -> 'a red circle'."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def parse_image_choice(text: str, num_images: int) -> int | None:
    """1-based image position named in an answer ('Image 2.', '2', 'the second image'), else None."""
    words = normalize_text(text).split()
    for i, w in enumerate(words):
        if w == "image" and i + 1 < len(words):
            n = _number(words[i + 1])
            if n is not None:
                return n if 1 <= n <= num_images else None
    for w in words:
        n = ORDINALS.get(w, None)
        if n is None and w.isdigit():
            n = int(w)
        if n is None:
            n = NUMBER_WORDS.get(w)
        if n is not None:
            n = num_images if n == -1 else n
            return n if 1 <= n <= num_images else None
    return None


def _number(w: str) -> int | None:
    if w.isdigit():
        return int(w)
    return NUMBER_WORDS.get(w)


def parse_bool(text: str) -> bool | None:
    """First true/yes or false/no word in an answer, else None."""
    for w in normalize_text(text).split():
        if w in TRUE_WORDS:
            return True
        if w in FALSE_WORDS:
            return False
    return None


def answer_bool(value) -> bool:
    """An NLVR2 answer key as a bool (true/false, "True", "yes", 1/0); anything else raises."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and parse_bool(value) is not None and len(value.split()) == 1:
        return parse_bool(value)
    raise ValueError(f"not a true/false answer key: {value!r}")


def parse_option(text: str, num_options: int, choices: Sequence[str] | None = None) -> str | None:
    """The option letter an answer picks ('B', '(b)', 'Answer: C', or an option's exact text)."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:num_options]
    stripped = text.strip()
    if choices:   # the option's own text wins ("a blue square" is not option "a")
        norm = normalize_text(stripped)
        hits = [letters[i] for i, c in enumerate(choices) if normalize_text(c) and normalize_text(c) == norm]
        if len(hits) == 1:
            return hits[0]
    # "(b) ...", "B. ...", "B", "b)" -- but a lowercase letter followed by a space is a word
    m = re.match(r"^\(([A-Za-z])\)|^([A-Z])(?:[.:)\s]|$)|^([a-z])(?:[.:)]|$)", stripped)
    if m:
        letter = next(g for g in m.groups() if g).upper()
        if letter in letters:
            return letter
    m = re.search(r"(?:answer|option)\s*(?:is|:)?\s*\(?([A-Za-z])\)?(?:[.:)\s]|$)", stripped, re.IGNORECASE)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    return None


# -- accounting ------------------------------------------------------------------------------
def score_choices(predictions: Sequence[int | None], answers: Sequence[int],
                  num_images: Sequence[int]) -> dict:
    """Which-image accounting: accuracy overall, per answer position and per image count.

    `last_image_rate` is how often the model named the last image; with balanced
    positions an unbiased model names it 1/k of the time (`last_image_chance`).
    """
    if not len(predictions) == len(answers) == len(num_images):
        raise ValueError(f"{len(predictions)} predictions, {len(answers)} answers, {len(num_images)} counts")
    per_pos: dict[int, list[int]] = {}
    per_k: dict[int, list[int]] = {}
    per_k_pos: dict[str, list[int]] = {}
    picked = Counter()
    last = 0
    for p, a, k in zip(predictions, answers, num_images):
        ok = int(p == a)
        for table, key in ((per_pos, a), (per_k, k), (per_k_pos, f"{k}:{a}")):
            table.setdefault(key, [0, 0])
            table[key][0] += ok
            table[key][1] += 1
        picked["none" if p is None else p] += 1
        last += int(p == k)
    n = len(answers)

    def acc(table):
        return {str(k): {"accuracy": c / t, "correct": c, "n": t} for k, (c, t) in sorted(table.items())}
    return {
        "accuracy": sum(int(p == a) for p, a in zip(predictions, answers)) / n if n else float("nan"),
        "n": n,
        "unparsed": picked.get("none", 0),
        "per_position": acc(per_pos),
        "per_num_images": acc(per_k),
        "per_num_images_position": acc(per_k_pos),
        "predicted_position": {str(k): v for k, v in sorted(picked.items(), key=lambda kv: str(kv[0]))},
        "last_image_rate": last / n if n else float("nan"),
        "last_image_chance": sum(1 / k for k in num_images) / n if n else float("nan"),
    }


def score_binary(predictions: Sequence[bool | None], answers: Sequence[bool]) -> dict:
    """NLVR2-style accounting: accuracy overall and per true/false answer (chance 0.5 when balanced)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    per = {True: [0, 0], False: [0, 0]}
    for p, a in zip(predictions, answers):
        per[a][0] += int(p == a)
        per[a][1] += 1
    n = len(answers)
    return {"accuracy": sum(int(p == a) for p, a in zip(predictions, answers)) / n if n else float("nan"),
            "n": n, "unparsed": sum(p is None for p in predictions),
            "per_answer": {str(k).lower(): {"accuracy": c / t if t else float("nan"), "n": t}
                           for k, (c, t) in per.items()}}


def score_mc(predictions: Sequence[str | None], answers: Sequence[str]) -> dict:
    """Multiple-choice accounting: accuracy, unparsed answers, and the distribution of picks."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    n = len(answers)
    return {"accuracy": sum(int(p == a.upper()) for p, a in zip(predictions, answers)) / n if n else float("nan"),
            "n": n, "unparsed": sum(p is None for p in predictions),
            "picked": dict(sorted(Counter("none" if p is None else p for p in predictions).items()))}


def split_ordered(text: str) -> dict[int, str]:
    """'Image 1: a red circle. Image 2: ...' -> {1: 'a red circle', 2: ...} (normalised)."""
    parts = re.split(r"\bimage\s+(\d+)\s*:", text, flags=re.IGNORECASE)
    return {int(parts[i]): normalize_text(parts[i + 1]) for i in range(1, len(parts) - 1, 2)}


def score_ordered_descriptions(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Describe-each-image-in-order: exact match of each image's description, per position."""
    per: dict[int, list[int]] = {}
    whole = 0
    for p, r in zip(predictions, references):
        pp, rr = split_ordered(p), split_ordered(r)
        whole += int(pp == rr)
        for pos, ref in rr.items():
            per.setdefault(pos, [0, 0])
            per[pos][0] += int(pp.get(pos) == ref)
            per[pos][1] += 1
    n = len(references)
    return {"accuracy": whole / n if n else float("nan"), "n": n,
            "per_position": {str(k): {"accuracy": c / t, "n": t} for k, (c, t) in sorted(per.items())}}


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """Exact match, BLEU-1..4 and CIDEr-D (pycocoevalcap; inputs normalised, no Java needed)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError as e:
        raise ImportError("caption metrics need pycocoevalcap: pip install pycocoevalcap") from e
    if set(predictions) != set(references):
        raise ValueError("caption predictions and references cover different ids")
    if not predictions:
        return {"n": 0}
    res = {k: [normalize_text(v) or "empty"] for k, v in predictions.items()}
    gts = {k: [normalize_text(r) for r in refs] for k, refs in references.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    exact = sum(res[k][0] in gts[k] for k in res) / len(res)
    return {"accuracy": exact, "n": len(res), **{f"bleu_{i + 1}": float(b) for i, b in enumerate(bleu)},
            "cider": float(cider)}


def perplexity(loss_sum: float, tokens: int) -> float:
    return math.exp(loss_sum / tokens) if tokens else float("nan")


# -- probes ----------------------------------------------------------------------------------
def permute_probe(record: dict, order: Sequence[int], suffix: str = "") -> dict:
    """The record with images reordered: new image j is old image order[j]; the answer follows its image.

    Per-image lists of the same length ("scenes") are reordered too; the text is unchanged
    (its k-th <image> now shows the new k-th image).
    """
    k = len(record["images"])
    if sorted(order) != list(range(k)):
        raise ValueError(f"record {record['id']!r}: {list(order)} is not a permutation of its {k} images")
    out = dict(record, id=record["id"] + suffix, images=[record["images"][i] for i in order])
    for key, value in record.items():
        if key not in ("images", "conversations") and isinstance(value, list) and len(value) == k:
            out[key] = [value[i] for i in order]
    if "answer" in record:
        out["answer"] = list(order).index(int(record["answer"]) - 1) + 1
    return out


def rotated_probes(records: Sequence[dict]) -> list[dict]:
    """Every probe asked k times, images rotated so its answer sits once in every position."""
    out = []
    for r in records:
        k = len(r["images"])
        if k < 2:
            raise ValueError(f"probe {r['id']!r} has {k} image(s); a which-image probe needs at least 2")
        for shift in range(k):
            out.append(permute_probe(r, [(i + shift) % k for i in range(k)], suffix=f"@rot{shift}"))
    return out


# -- distribution ----------------------------------------------------------------------------
def shard(items: Sequence, rank: int, world_size: int) -> list:
    """This rank's share (round robin); the union over ranks is every item exactly once."""
    return list(items[rank::world_size])


def gather(obj) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (just [obj] without torch.distributed)."""
    import torch.distributed as tdist
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def gather_lists(items: list) -> list:
    return [x for part in gather(items) for x in part]


# -- model-driven runs -----------------------------------------------------------------------
# record -> (M, P, D) features of its images, or (media, layouts) as Generator.encode_media gives
# them (a tiled or video export: each item's views and layout, as training built them)
FeatureFn = Callable[[dict], "torch.Tensor | tuple[dict, dict] | None"]


@torch.no_grad()
def loss_sums(vlm, tokenizer, template: str, num_media_tokens: int | dict, records: Sequence[dict],
              feature_lookup, feature_shape=(1, 1), batch_size: int = 8, max_seq_len: int | None = None,
              layouts: Callable[[dict], dict | None] | None = None) -> dict:
    """Summed next-token loss over supervised tokens of `records` (this rank's share).

    `feature_lookup`: reference -> (P, D) image features, or {kind: reference -> (V, P, D)} views
    (a tiled or video export), as data.pack.collate takes them; `layouts`: record -> its items'
    layouts (PromptEncoder.encode's), so the blocks are training's.
    Returns {"loss_sum", "tokens", "samples", "skipped": {reason: [ids]}}. Samples that
    cannot be encoded (too long, nothing supervised) are listed, never silently dropped.
    """
    from vlm_dist.data.pack import collate
    enc = PromptEncoder(tokenizer, template, num_media_tokens)
    samples, skipped = [], {}
    for r in records:
        try:
            samples.append(enc.encode(r, max_seq_len=max_seq_len, layouts=layouts(r) if layouts else None))
        except SampleError as e:
            skipped.setdefault(e.reason, []).append(r["id"])
    device = next(vlm.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss_sum, tokens = 0.0, 0
    for i in range(0, len(samples), batch_size):
        rows = [[s] for s in samples[i:i + batch_size]]
        batch = collate(rows, feature_lookup or _no_images, pad, max(len(s) for s in samples[i:i + batch_size]),
                        feature_shape=tuple(feature_shape), pad_to_multiple=1)
        media = {kind: {"features": m["features"].to(device), "counts": m["counts"]}
                 for kind, m in batch["media"].items()}
        out = vlm(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                  targets=batch["targets"].to(device), sample_ids=batch["sample_ids"], media=media)
        loss_sum += float(out["loss_sum"])
        tokens += int(out["num_supervised"])
    return {"loss_sum": loss_sum, "tokens": tokens, "samples": len(samples), "skipped": skipped}


def _no_images(key: str):
    raise ValueError(f"record refers to image {key!r} but no feature source was given "
                     "(pass --cache or --image-root)")


def merge_loss(parts: Sequence[dict]) -> dict:
    """Sum per-rank loss_sums results; loss and perplexity per supervised token."""
    loss_sum = sum(p["loss_sum"] for p in parts)
    tokens = sum(p["tokens"] for p in parts)
    skipped: dict[str, list] = {}
    for p in parts:
        for reason, ids in p["skipped"].items():
            skipped.setdefault(reason, []).extend(ids)
    return {"loss": loss_sum / tokens if tokens else float("nan"), "perplexity": perplexity(loss_sum, tokens),
            "tokens": tokens, "samples": sum(p["samples"] for p in parts),
            "skipped": {k: {"count": len(v), "ids": v[:20]} for k, v in skipped.items()}}


def generate_replies(generator, records: Sequence[dict], features: FeatureFn, settings) -> list[str]:
    """The model's reply to each record's prompt (the conversation before its last assistant turn)."""
    from vlm_dist.inference.generate import prompt_turns
    replies = []
    for r in records:
        feats = features(r)
        feats, layouts = feats if isinstance(feats, tuple) else (feats, None)
        replies.append(generator.generate(prompt_turns(r["conversations"]), feats, settings, layouts=layouts))
    return replies


# -- POPE: yes/no object probes ---------------------------------------------------------------
POPE_SETTINGS = ("random", "popular", "adversarial")
POPE_QUESTION = "Is there a {object} in the image?"


def parse_yes_no(text: str) -> str | None:
    """POPE's reading of a reply: "yes" or "no" when it starts with that word (any case), else None."""
    words = normalize_text(text).split()
    return words[0] if words and words[0] in ("yes", "no") else None


def pope_metrics(predictions: Sequence[str | None], answers: Sequence[str]) -> dict:
    """POPE accounting for one setting, "yes" the positive class.

    A reply is read by its first word, punctuation stripped ("Yes." is yes). An unparsed reply counts
    as not-yes: wrong for either answer, a false negative when the answer is yes. lmms-eval's pope
    task differs: it compares the whole lowered reply with "yes"/"no" (so "Yes." is neither) and
    leaves replies that are neither out of its recall, so the two do not agree on chatty replies.
    Precision is 0 when nothing
    was answered yes, F1 0 when precision and recall are both 0.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if any(a not in ("yes", "no") for a in answers):
        raise ValueError(f"POPE answers must be 'yes' or 'no', got {sorted(set(answers) - {'yes', 'no'})}")
    tp = sum(p == "yes" and a == "yes" for p, a in zip(predictions, answers))
    fp = sum(p == "yes" and a == "no" for p, a in zip(predictions, answers))
    fn = sum(p != "yes" and a == "yes" for p, a in zip(predictions, answers))
    n = len(answers)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": sum(p == a for p, a in zip(predictions, answers)) / n if n else float("nan"),
            "precision": precision, "recall": recall,
            "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
            "yes_ratio": sum(p == "yes" for p in predictions) / n if n else float("nan"),
            "n": n, "unparsed": sum(p is None for p in predictions)}


def score_pope(predictions: Sequence[str | None], answers: Sequence[str], settings: Sequence[str]) -> dict:
    """POPE metrics per setting, and their mean over the settings present (as LLaVA-1.5 reports POPE)."""
    if not len(predictions) == len(answers) == len(settings):
        raise ValueError(f"{len(predictions)} predictions, {len(answers)} answers, {len(settings)} settings")
    unknown = sorted(set(settings) - set(POPE_SETTINGS))
    if unknown:
        raise ValueError(f"unknown POPE setting(s) {unknown}; expected one of {list(POPE_SETTINGS)}")
    out: dict = {}
    for s in POPE_SETTINGS:
        idx = [i for i, x in enumerate(settings) if x == s]
        if idx:
            out[s] = pope_metrics([predictions[i] for i in idx], [answers[i] for i in idx])
    present = [out[s] for s in POPE_SETTINGS if s in out]
    for key in ("accuracy", "precision", "recall", "f1", "yes_ratio"):
        out[key] = sum(m[key] for m in present) / len(present) if present else float("nan")
    out["n"] = len(answers)
    return out


def pope_negatives(present: set[str], objects: Sequence[str], setting: str, k: int, rng,
                   frequency: dict[str, float], cooccurrence: Callable[[str, str], float]) -> list[str]:
    """k objects absent from an image, chosen as POPE's setting says.

    random:      uniformly among the absent objects;
    popular:     the absent objects most frequent in the dataset (`frequency`);
    adversarial: the absent objects that co-occur most with the present ones
                 (sum of `cooccurrence(absent, present)`).
    Ties are broken at random (rng), so equal ranks do not always favour one object.
    """
    absent = [o for o in objects if o not in present]
    if len(absent) < k:
        raise ValueError(f"only {len(absent)} absent objects for {k} negatives (present: {sorted(present)})")
    if setting == "random":
        return rng.sample(absent, k)
    if setting == "popular":
        score = {o: frequency.get(o, 0) for o in absent}
    elif setting == "adversarial":
        score = {o: sum(cooccurrence(o, p) for p in present) for o in absent}
    else:
        raise ValueError(f"unknown POPE setting {setting!r}; expected one of {list(POPE_SETTINGS)}")
    tiebreak = {o: rng.random() for o in absent}
    return sorted(absent, key=lambda o: (-score[o], tiebreak[o]))[:k]
