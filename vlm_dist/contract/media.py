"""Media kinds: what an image is to the tokenizer and the splice.

A kind names its placeholder in text, the record field holding its keys, and
the three tokens its block is made of. An item may fill several views' worth of pad slots
(a tiled image: thumbnail + tiles, contract.tiling; a video: one run per sampled frame,
contract.video): the collator hands the connector one feature row per view, in slot order. The tokenizer expands placeholders into
blocks, the collator gathers features per kind, the VLM runs one connector per
kind and writes its output into that kind's pad slots. Audio later is one more
`MediaKind` and one more connector, not a rewrite of the splice.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MediaKind:
    name: str          # key in batch["media"] and in the model's connectors
    placeholder: str   # literal text marker in conversations, e.g. "<image>"
    record_field: str  # record key listing this kind's items, e.g. "images"
    start_token: str   # opens a block
    pad_token: str     # one slot per projected feature token
    end_token: str     # closes a block


IMAGE = MediaKind("image", "<image>", "images", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
# A video's block shares Qwen's vision start/end (as Qwen2-VL's does); its slots are <|video_pad|>,
# one run of tokens_per_frame per sampled frame, each run after its timestamp as text
# (contract.video.video_block_ids). Both tokens are already in Qwen3's vocabulary.
VIDEO = MediaKind("video", "<video>", "videos", "<|vision_start|>", "<|video_pad|>", "<|vision_end|>")

MEDIA_KINDS: dict[str, MediaKind] = {IMAGE.name: IMAGE, VIDEO.name: VIDEO}


@dataclass(frozen=True)
class BlockIds:
    """Token ids of one kind's block in a given tokenizer, and its length."""
    start: int
    pad: int
    end: int
    num_tokens: int  # pad slots per item (the connector's output length)

    @property
    def length(self) -> int:
        return self.num_tokens + 2

    def block(self) -> list[int]:
        return [self.start] + [self.pad] * self.num_tokens + [self.end]


def token_id(tokenizer, token: str) -> int:
    """Id of a special token the tokenizer must already have (no vocabulary is ever added)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(tid) != token:
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no token {token!r}; "
            "vlm_dist uses Qwen3's existing special tokens and never resizes the vocabulary")
    return tid


def block_ids(tokenizer, kind: MediaKind, num_tokens: int) -> BlockIds:
    return BlockIds(token_id(tokenizer, kind.start_token), token_id(tokenizer, kind.pad_token),
                    token_id(tokenizer, kind.end_token), num_tokens)
