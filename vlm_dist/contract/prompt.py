"""Records -> token ids and labels: templates, media blocks, supervision, truncation.

Two templates:
- "plain" (stage-1 alignment on a base model): each user/system turn is its
  text with media blocks, then "\\n"; each assistant turn is the caption followed
  by <|endoftext|>. Only the assistant text and its <|endoftext|> are supervised.
- "chatml" (SFT): Qwen3's `<|im_start|>{role}\\n{content}<|im_end|>\\n` turns.
  Only assistant content and its closing <|im_end|> are supervised.

Every `<image>` becomes `<|vision_start|> + N x <|image_pad|> + <|vision_end|>`, or, for a
tiled image (its `Tiling` given in `layouts`), the thumbnail's and every tile's N slots with
"\n" row separators (contract.tiling.tile_block_ids). Every `<video>` becomes its frames'
timestamps and N x <|video_pad|> each (contract.video.video_block_ids): a video's layout
(its sampled frames' times, which the feature cache records) is required. `layouts` gives
each kind's per-item layouts in placeholder order: {"image": [Tiling | None, ...],
"video": [VideoLayout, ...]}, or their dicts as the cache stores them.
Text is tokenized with `split_special_tokens=True`, so a user typing
"<|image_pad|>" or "<|im_end|>" gets ordinary text tokens, never a slot or a
control token. Control and block tokens are inserted as ids, never parsed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from vlm_dist.errors import UserError
from vlm_dist.contract.media import IMAGE, MEDIA_KINDS, VIDEO, BlockIds, block_ids, token_id
from vlm_dist.contract.records import validate_record
from vlm_dist.contract.tiling import Tiling, tile_block_ids
from vlm_dist.contract.video import VideoLayout, video_block_ids

IGNORE = -100
TEMPLATES = ("plain", "chatml")


class SampleError(UserError, ValueError):
    """A record that cannot become a training sample; `reason` is a short countable key."""

    def __init__(self, record_id: str, reason: str, detail: str):
        super().__init__(f"record {record_id!r}: {detail}")
        self.record_id, self.reason = record_id, reason


@dataclass
class EncodedSample:
    id: str
    input_ids: list[int]
    labels: list[int]                      # the token where supervised, IGNORE elsewhere (unshifted)
    media: dict[str, list[str]] = field(default_factory=dict)  # kind -> keys, in block order
    truncated: bool = False

    @property
    def image_keys(self) -> list[str]:
        return self.media.get(IMAGE.name, [])

    @property
    def video_keys(self) -> list[str]:
        return self.media.get(VIDEO.name, [])

    @property
    def num_supervised(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)

    def __len__(self) -> int:
        return len(self.input_ids)


def parse_layout(kind: str, layout):
    """A layout as the cache stores it (a dict, or None) -> Tiling / VideoLayout / None."""
    if layout is None or isinstance(layout, (Tiling, VideoLayout)):
        return layout
    if kind == VIDEO.name:
        return VideoLayout.from_dict(layout)
    return Tiling.from_dict(layout)


class PromptEncoder:
    """Turns records into EncodedSamples for one tokenizer, template and block size.

    `num_media_tokens`: pad slots per view (image: per thumbnail or tile; video: per frame),
    one int for every kind or {kind: int}."""

    def __init__(self, tokenizer, template: str = "plain", num_media_tokens: int | dict = 64):
        if template not in TEMPLATES:
            raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
        self.tokenizer, self.template = tokenizer, template
        sizes = {name: num_media_tokens for name in MEDIA_KINDS} if not isinstance(num_media_tokens, dict) \
            else {name: num_media_tokens.get(name, num_media_tokens.get(IMAGE.name, 64)) for name in MEDIA_KINDS}
        self.blocks: dict[str, BlockIds] = {
            name: block_ids(tokenizer, kind, sizes[name]) for name, kind in MEDIA_KINDS.items()}
        self._placeholder_kind = {k.placeholder: k.name for k in MEDIA_KINDS.values()}
        self._split = re.compile("(" + "|".join(re.escape(p) for p in self._placeholder_kind) + ")")
        self.eos = token_id(tokenizer, "<|endoftext|>")
        self.im_start = token_id(tokenizer, "<|im_start|>")
        self.im_end = token_id(tokenizer, "<|im_end|>")
        self.newline = self._text("\n")

    # -- pieces -------------------------------------------------------------
    def _text(self, text: str) -> list[int]:
        if not text:
            return []
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def block(self, kind: str, layout=None) -> list[int]:
        """The ids of one item's block: `layout` a Tiling (image; None: untiled) or a VideoLayout."""
        layout = parse_layout(kind, layout)
        b = self.blocks[kind]
        if kind == VIDEO.name:
            if layout is None:
                raise ValueError("a <video> block needs the video's layout (its sampled frames' "
                                 "timestamps): pass layouts={'video': [...]}")
            return video_block_ids(self.tokenizer, layout.timestamps, b.num_tokens)
        if layout is None or layout.num_tiles == 0:
            return b.block()
        return tile_block_ids(self.tokenizer, layout.rows, layout.cols, b.num_tokens)

    def _content(self, text: str, layouts: dict, kinds: list[str]) -> list[int]:
        """Text with placeholders -> ids with blocks; appends the media kinds met to `kinds`."""
        ids = []
        for piece in self._split.split(text):
            kind = self._placeholder_kind.get(piece)
            if kind is not None:
                k = kinds.count(kind)            # this is the k-th item of its kind
                items = layouts.get(kind) or []
                ids += self.block(kind, items[k] if k < len(items) else None)
                kinds.append(kind)
            else:
                ids += self._text(piece)
        return ids

    def _turns(self, conversations, add_generation_prompt: bool, layouts: dict | None = None):
        """Yield (ids, supervised) segments and collect media kinds in order."""
        segments, kinds = [], []
        for turn in conversations:
            role, content = turn["role"], turn["content"]
            ids = self._content(content, layouts or {}, kinds)
            sup = role == "assistant"
            if self.template == "plain":
                if sup:
                    segments += [(ids, True), ([self.eos], True)]
                else:
                    segments += [(ids + self.newline, False)]
            else:
                segments += [([self.im_start] + self._text(f"{role}\n"), False), (ids, sup),
                             ([self.im_end], sup), (self.newline, False)]
        if add_generation_prompt and self.template == "chatml":
            segments.append(([self.im_start] + self._text("assistant\n"), False))
        return segments, kinds

    # -- public -------------------------------------------------------------
    def encode(self, record: dict, max_seq_len: int | None = None, truncate: bool = False,
               validate: bool = True, layouts: dict | None = None) -> EncodedSample:
        """Encode a training record. Raises SampleError (reason: too_long, no_supervision).

        `layouts`: per kind, each item's layout in the record's order (module docstring)."""
        if validate:
            validate_record(record)
        segments, kinds = self._turns(record["conversations"], add_generation_prompt=False,
                                      layouts=layouts)
        input_ids, labels = [], []
        for ids, sup in segments:
            input_ids += ids
            labels += ids if sup else [IGNORE] * len(ids)
        media = {name: list(record.get(kind.record_field, [])) for name, kind in MEDIA_KINDS.items()
                 if record.get(kind.record_field)}
        sample = EncodedSample(record["id"], input_ids, labels, media)
        if max_seq_len is not None and len(input_ids) > max_seq_len:
            if not truncate:
                raise SampleError(record["id"], "too_long",
                                  f"{len(input_ids)} tokens exceed max_seq_len={max_seq_len}")
            self._truncate(sample, kinds, max_seq_len)
        if sample.num_supervised == 0:
            raise SampleError(record["id"], "no_supervision",
                              "no supervised token (after truncation)" if sample.truncated
                              else "no supervised token")
        return sample

    def encode_prompt(self, conversations: list[dict], layouts: dict | None = None
                      ) -> tuple[list[int], dict[str, int]]:
        """Encode a generation prompt (no assistant reply yet); returns ids and the number of
        items (placeholders) per kind."""
        segments, kinds = self._turns(conversations, add_generation_prompt=True, layouts=layouts)
        ids = [t for seg, _ in segments for t in seg]
        return ids, {name: kinds.count(name) for name in MEDIA_KINDS}

    def _truncate(self, sample: EncodedSample, kinds: list[str], max_len: int) -> None:
        """Cut to max_len, moving the cut before any media block it would split."""
        cut = max_len
        starts = {b.start for b in self.blocks.values()}   # kinds may share start/end tokens
        ends = {b.end for b in self.blocks.values()}
        # walk back from the cut: if we are inside a block, cut at its start
        for i in range(min(cut, len(sample.input_ids)) - 1, -1, -1):
            tok = sample.input_ids[i]
            if tok in ends:
                break
            if tok in starts:
                cut = i
                break
        # block starts are only ever inserted as ids (text cannot make them): the n-th start
        # opens the n-th block, whose kind _turns recorded
        kept_kinds = kinds[:sum(1 for t in sample.input_ids[:cut] if t in starts)]
        for name in list(sample.media):
            sample.media[name] = sample.media[name][:kept_kinds.count(name)]
            if not sample.media[name]:
                del sample.media[name]
        sample.input_ids, sample.labels = sample.input_ids[:cut], sample.labels[:cut]
        sample.truncated = True

    def count_slots(self, input_ids) -> dict[str, int]:
        """Views per kind the ids have slots for (tiled images: thumbnail + tiles; videos: frames)."""
        return {name: sum(1 for t in input_ids if t == b.pad) // b.num_tokens
                for name, b in self.blocks.items()}


def encode_record(record: dict, tokenizer, template: str = "plain", image_tokens: int = 64,
                  max_seq_len: int | None = None, truncate: bool = False) -> EncodedSample:
    """One-off convenience; build a PromptEncoder once when encoding many records."""
    return PromptEncoder(tokenizer, template, image_tokens).encode(record, max_seq_len, truncate)
