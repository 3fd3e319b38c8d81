"""Stage-1 caption hygiene and synthetic multi-image captions (`vlm-convert stage1`).

Input: converted stage-1 records (one image, a user turn, the caption as the
assistant turn). Optional filters, each counted and every drop listed:
- caption length bounds in tokens (`--min-tokens/--max-tokens`, needs --tokenizer);
- spam / watermark phrases (`--spam-filter`, or your own list with --spam-phrases FILE);
- duplicate captions (`--dedup exact`: same text after lower-casing and dropping
  punctuation; `--dedup near`: also word/bigram Jaccard >= --near-threshold,
  found with MinHash-LSH and confirmed exactly). The first occurrence is kept.
Then, for `--multi-image-fraction F`, round(F x kept) synthetic records are
appended: 2 or 3 (`--multi-image-sizes`) kept records, drawn without repeats
from a seeded permutation, become
    user: "<image>\\n<image>\\nDescribe each image in order."
    assistant: "Image 1: <caption 1> Image 2: <caption 2>"
The source records stay in the output too. Same input + flags + seed -> same bytes.

    vlm-convert stage1 --input stage1.jsonl --out stage1.clean.jsonl --tokenizer Qwen/Qwen3-8B-Base \\
        --min-tokens 5 --max-tokens 60 --spam-filter --dedup near --multi-image-fraction 0.05
"""
from __future__ import annotations

import random
import re
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlm_dist.convert.formats.common import ConvertError
from vlm_dist.contract.records import IMAGE_PLACEHOLDER, read_lines, read_records, write_records
from vlm_dist.convert.side_files import write_side_files

DEFAULT_SPAM = (
    "watermark", "stock photo", "stock image", "stock footage", "download", "click", "shutterstock",
    "getty images", "gettyimages", "istock", "alamy", "dreamstime", "123rf", "depositphotos",
    "royalty free", "royalty-free", "free shipping", "buy now", "subscribe",
)
MULTI_IMAGE_PROMPT = "Describe each image in order."


class HygieneError(ConvertError):
    """A record that is not a stage-1 caption record, or a bad flag; names the record or flag."""


@dataclass
class CaptionFilters:
    min_tokens: int | None = None       # drop captions shorter than this (tokens)
    max_tokens: int | None = None       # drop captions longer than this (tokens)
    tokenizer: object | None = None     # a transformers tokenizer; required by the length bounds
    spam_phrases: tuple[str, ...] = ()  # case-insensitive whole-word phrases; empty disables
    dedup: str = "none"                 # none | exact | near
    near_threshold: float = 0.8         # word+bigram Jaccard at or above which captions are near-duplicates


@dataclass
class MultiImageAugment:
    fraction: float = 0.0               # synthetic records added = round(fraction x kept records)
    sizes: tuple[int, ...] = (2, 3)     # images per synthetic record, drawn uniformly
    prompt: str = MULTI_IMAGE_PROMPT
    seed: int = 0


@dataclass
class HygieneStats:
    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    synthetic: Counter = field(default_factory=Counter)   # images per record -> count

    def to_dict(self) -> dict:
        return {"read": self.read, "kept": self.kept, "dropped": sum(self.dropped.values()),
                "dropped_by_reason": dict(sorted(self.dropped.items())),
                "synthetic_multi_image": sum(self.synthetic.values()),
                "synthetic_by_images": {str(k): v for k, v in sorted(self.synthetic.items())}}

    def line(self) -> str:
        drops = ", ".join(f"{r} {n}" for r, n in sorted(self.dropped.items())) or "none"
        return (f"stage1: read {self.read}, kept {self.kept}, dropped {sum(self.dropped.values())} ({drops}); "
                f"synthetic multi-image records {sum(self.synthetic.values())}")


def caption_of(record: dict) -> str:
    """The caption of a stage-1 record; HygieneError unless it has one image and ends in one answer."""
    convs = record["conversations"]
    answers = [t for t in convs if t["role"] == "assistant"]
    if len(record.get("images", [])) != 1 or len(answers) != 1 or convs[-1]["role"] != "assistant":
        raise HygieneError(f"record {record['id']!r} is not a stage-1 caption record (one image, one "
                           "user turn, the caption last); stage1 hygiene only applies to caption data")
    return answers[0]["content"]


def normalize_caption(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _spam_pattern(phrases) -> re.Pattern | None:
    phrases = [p.strip() for p in phrases if p.strip()]
    if not phrases:
        return None
    return re.compile(r"(?<!\w)(" + "|".join(re.escape(p) for p in phrases) + r")(?!\w)", re.IGNORECASE)


def token_lengths(captions: list[str], tokenizer, chunk: int = 1024) -> list[int]:
    out = []
    for i in range(0, len(captions), chunk):
        ids = tokenizer(captions[i:i + chunk], add_special_tokens=False)["input_ids"]
        out += [len(x) for x in ids]
    return out


class NearDuplicates:
    """MinHash-LSH over word and bigram shingles; `seen(text)` is True for a near-duplicate."""

    PRIME = (1 << 31) - 1

    def __init__(self, threshold: float = 0.8, num_perm: int = 32, bands: int = 8, seed: int = 1):
        assert num_perm % bands == 0
        self.threshold, self.bands, self.rows = threshold, bands, num_perm // bands
        rng = np.random.default_rng(seed)
        self.a = rng.integers(1, self.PRIME, size=(num_perm, 1), dtype=np.uint64)
        self.b = rng.integers(0, self.PRIME, size=(num_perm, 1), dtype=np.uint64)
        self.buckets: dict[tuple[int, bytes], list[int]] = {}
        self.kept: list[np.ndarray] = []   # sorted unique shingle hashes of each kept caption

    def _shingles(self, norm: str) -> np.ndarray:
        words = norm.split()
        grams = set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}
        hashes = [zlib.crc32(g.encode()) % self.PRIME for g in grams]   # deterministic, unlike hash()
        return np.unique(np.asarray(hashes or [0], dtype=np.uint64))

    def check_and_add(self, norm: str) -> int | None:
        """Index (among kept captions) of a near-duplicate of `norm`, else None after adding it."""
        sh = self._shingles(norm)
        sig = ((self.a * sh[None, :] + self.b) % self.PRIME).min(axis=1)  # (num_perm,)
        keys = [(i, sig[i * self.rows:(i + 1) * self.rows].tobytes()) for i in range(self.bands)]
        candidates = sorted({j for k in keys for j in self.buckets.get(k, ())})
        for j in candidates:
            other = self.kept[j]
            inter = len(np.intersect1d(sh, other, assume_unique=True))
            if inter / (len(sh) + len(other) - inter) >= self.threshold:
                return j
        n = len(self.kept)
        self.kept.append(sh)
        for k in keys:
            self.buckets.setdefault(k, []).append(n)
        return None


def filter_captions(records: list[dict], filters: CaptionFilters, stats: HygieneStats) -> tuple[list[dict], list[dict]]:
    """Apply the caption filters in order (length, spam, duplicates); return kept and dropped."""
    captions = [caption_of(r) for r in records]
    lengths = None
    if filters.min_tokens is not None or filters.max_tokens is not None:
        if filters.tokenizer is None:
            raise HygieneError("--min-tokens/--max-tokens need --tokenizer")
        lengths = token_lengths(captions, filters.tokenizer)
    spam = _spam_pattern(filters.spam_phrases)
    if filters.dedup not in ("none", "exact", "near"):
        raise HygieneError(f"--dedup {filters.dedup!r}: expected none, exact or near")
    exact: dict[str, str] = {}
    near = NearDuplicates(filters.near_threshold) if filters.dedup == "near" else None
    near_ids: list[str] = []
    kept, dropped = [], []

    def drop(rec, reason, detail):
        stats.dropped[reason] += 1
        dropped.append({"id": rec["id"], "reason": reason, "detail": detail})

    for i, (rec, cap) in enumerate(zip(records, captions)):
        if lengths is not None and filters.min_tokens is not None and lengths[i] < filters.min_tokens:
            drop(rec, "caption too short", f"{lengths[i]} tokens < {filters.min_tokens}")
            continue
        if lengths is not None and filters.max_tokens is not None and lengths[i] > filters.max_tokens:
            drop(rec, "caption too long", f"{lengths[i]} tokens > {filters.max_tokens}")
            continue
        m = spam.search(cap) if spam else None
        if m:
            drop(rec, "spam phrase", f"contains {m.group(0)!r}")
            continue
        if filters.dedup != "none":
            norm = normalize_caption(cap)
            if norm in exact:
                drop(rec, "duplicate caption", f"same caption as {exact[norm]!r}")
                continue
            if near is not None:
                j = near.check_and_add(norm)
                if j is not None:
                    drop(rec, "near-duplicate caption", f"near {near_ids[j]!r}")
                    continue
                near_ids.append(rec["id"])
            exact[norm] = rec["id"]
        kept.append(rec)
    return kept, dropped


def _sentence(caption: str) -> str:
    caption = caption.strip()
    return caption if caption[-1:] in ".!?" else caption + "."


def synthesize_multi_image(records: list[dict], aug: MultiImageAugment, stats: HygieneStats) -> list[dict]:
    """round(fraction x len(records)) synthetic multi-image caption records, deterministic for the seed."""
    if not 0.0 <= aug.fraction < 1.0:
        raise HygieneError(f"--multi-image-fraction {aug.fraction}: expected 0 <= F < 1")
    if not aug.sizes or min(aug.sizes) < 2:
        raise HygieneError(f"--multi-image-sizes {aug.sizes}: each size must be >= 2")
    count = round(aug.fraction * len(records))
    if count == 0:
        return []
    if len(records) < max(aug.sizes):
        raise HygieneError(f"{len(records)} records cannot form synthetic records of {max(aug.sizes)} images")
    rng = random.Random(aug.seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    pos, out = 0, []
    for j in range(count):
        k = rng.choice(aug.sizes)
        if pos + k > len(order):
            rng.shuffle(order)
            pos = 0
        members = [records[i] for i in order[pos:pos + k]]
        pos += k
        answer = " ".join(f"Image {n}: {_sentence(caption_of(r))}" for n, r in enumerate(members, 1))
        out.append({
            "id": f"multi{j}:" + "+".join(r["id"] for r in members),
            "images": [r["images"][0] for r in members],
            "conversations": [{"role": "user", "content": (IMAGE_PLACEHOLDER + "\n") * k + aug.prompt},
                              {"role": "assistant", "content": answer}],
        })
        stats.synthetic[k] += 1
    return out


def rewrite_prompt(record: dict, prompt: str) -> dict:
    """Replace the user turn with '<image>\\n' + prompt (one template for every record)."""
    convs = [dict(t) for t in record["conversations"]]
    for t in convs:
        if t["role"] == "user":
            t["content"] = IMAGE_PLACEHOLDER + "\n" + prompt
    return {**record, "conversations": convs}


def stage1(records: list[dict], filters: CaptionFilters, aug: MultiImageAugment,
           prompt: str | None = None) -> tuple[list[dict], list[dict], HygieneStats]:
    """Filters, then the optional prompt rewrite, then synthetic multi-image records appended."""
    stats = HygieneStats(read=len(records))
    kept, dropped = filter_captions(records, filters, stats)
    if prompt:
        kept = [rewrite_prompt(r, prompt) for r in kept]
    out = kept + synthesize_multi_image(kept, aug, stats)
    stats.kept = len(kept)
    return out, dropped, stats


# -- command line -------------------------------------------------------------
def add_parser(sub):
    p = sub.add_parser("stage1", help="stage-1 caption filters and synthetic multi-image captions",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, type=Path, help="converted stage-1 records (JSONL)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for the token-length bounds")
    p.add_argument("--min-tokens", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--spam-filter", action="store_true", help="drop captions with the built-in spam phrases")
    p.add_argument("--spam-phrases", type=Path, default=None, help="file of phrases, one a line (implies the filter)")
    p.add_argument("--dedup", choices=("none", "exact", "near"), default="none")
    p.add_argument("--near-threshold", type=float, default=0.8)
    p.add_argument("--prompt", default=None,
                   help="rewrite every user turn to '<image>\\n' + PROMPT (e.g. 'Describe the image in one sentence.')")
    p.add_argument("--multi-image-fraction", type=float, default=0.0)
    p.add_argument("--multi-image-sizes", default="2,3", help="images per synthetic record, e.g. 2 or 2,3")
    p.add_argument("--multi-image-prompt", default=MULTI_IMAGE_PROMPT)
    p.add_argument("--seed", type=int, default=0)
    return p


def run_cli(args) -> int:
    tokenizer = None
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    phrases: tuple[str, ...] = ()
    if args.spam_phrases:
        phrases = tuple(line.strip() for _, line in read_lines(args.spam_phrases))
    elif args.spam_filter:
        phrases = DEFAULT_SPAM
    try:
        sizes = tuple(int(s) for s in args.multi_image_sizes.split(","))
    except ValueError:
        raise HygieneError(f"--multi-image-sizes {args.multi_image_sizes!r}: expected integers like 2,3") from None
    filters = CaptionFilters(args.min_tokens, args.max_tokens, tokenizer, phrases, args.dedup, args.near_threshold)
    aug = MultiImageAugment(args.multi_image_fraction, sizes, args.multi_image_prompt, args.seed)
    records = list(read_records(args.input))
    out, dropped, stats = stage1(records, filters, aug, args.prompt)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_records(args.out, out)
    summary = {**stats.to_dict(), "input": str(args.input), "out": str(args.out),
               "flags": {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())
                         if k not in ("run",)}}
    dropped_path, stats_path = write_side_files(args.out, summary, dropped)
    print(stats.line())
    print(f"wrote {args.out} ({len(out)} records); dropped list {dropped_path}; counts {stats_path}")
    return 0
