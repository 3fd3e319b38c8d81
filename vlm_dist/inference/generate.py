"""From images, videos and a conversation to generated text: features, prompt, generate, decode.

    vlm, tokenizer, tower, cfg = load_export("runs/sft/export")
    gen = Generator(vlm, tokenizer, cfg, tower)
    text = gen.generate(conversations, gen.encode_images([img1, img2]), GenerationSettings())
    media, layouts = gen.encode_media(images=[img1], videos=[gen.decode_video("clip.mp4")])
    text = gen.generate(conversations, media, GenerationSettings(), layouts=layouts)

Features come either online (`encode_media` / `encode_images`: the export's vision tower, its
image processor, its dtype and pooling, as `vlm-cache build` encodes them) or
from a feature cache (`cached_features`). A tiled export's images are tiled as its training
cache tiled them (`vision.image_views` with cfg.tiling_spec: thumbnail, then tiles row-major)
and a video's frames are sampled with cfg.video_sampling (`decode_video`); `encode_media`
returns each item's layout (Tiling / VideoLayout), and the prompt built with those layouts
has exactly the block training built for the same record (PromptEncoder.block).
`encode_images` is the untiled path: one view per image (what an untiled export reads). The prompt is the conversation up to
the reply to generate, in the export's template, ending with the assistant
prefix for chatml. Generation stops at <|im_end|> or <|endoftext|>.
Used by vlm-generate and vlm-eval; vlm-serve calls `generate_batch` (several prompts given as
token ids, left-padded into one greedy batch, with a caller's streamer and stopping criteria).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from vlm_dist.contract.prompt import PromptEncoder
from vlm_dist.errors import UserError
from vlm_dist.model.vlm import unwrap_llm

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    """Longest reply in tokens."""
    do_sample: bool = False
    """False: greedy; True: sample with temperature and top_p."""
    temperature: float = 1.0
    """Sampling temperature (sampling only)."""
    top_p: float = 1.0
    """Nucleus sampling mass (sampling only)."""
    seed: int | None = None
    """Seed for sampling (None: a fresh random one); torch's global RNG is never touched."""


class SeededSampling:
    """Temperature + top-k + top-p sampling from a private torch.Generator, as a transformers logits processor.

    Transformers samples from torch's global RNG, so seeding it there would reseed the caller's
    training or evaluation. This draws the token itself and leaves only it finite, so greedy
    decoding (do_sample=False) emits exactly the sampled token. `top_k` is the LLM's own
    generation_config.top_k (Qwen3 ships 20; transformers' default 50), as transformers' sampling applies it.
    """

    def __init__(self, temperature: float, top_p: float, seed: int | None, device: torch.device,
                 top_k: int | None = None):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
        warpers = [TemperatureLogitsWarper(temperature)]
        if top_k:
            warpers.append(TopKLogitsWarper(top_k))
        self.warp = LogitsProcessorList(warpers + [TopPLogitsWarper(top_p)])
        self.rng = torch.Generator(device=device)
        if seed is None:
            self.rng.seed()
        else:
            self.rng.manual_seed(seed)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(self.warp(input_ids, scores.float()), dim=-1)          # (B, V); fp32: 1/T cannot overflow
        picked = torch.multinomial(probs, num_samples=1, generator=self.rng)       # (B, 1)
        return torch.full_like(scores, float("-inf")).scatter_(-1, picked, 0.0)


def prompt_turns(conversations: list[dict]) -> list[dict]:
    """The turns before the last assistant turn (a record's reference answer is dropped)."""
    last = max((i for i, t in enumerate(conversations) if t["role"] == "assistant"), default=None)
    return list(conversations if last is None else conversations[:last])


class MediaUnsupported(UserError, ValueError):
    """Media this export was not trained for (a video for a model without a video connector)."""


def media_batch(rows: Sequence, device) -> dict | None:
    """Per-row features -> the VLM's `media` ({kind: {"features", "counts"}}), rows in order.

    A row is None (no media), an (M, P, D) tensor (untiled image views, one per image) or a
    {kind: (V, P, D) tensor} / encode_media's {kind: {"features", "counts"}} dict."""
    per_kind: dict[str, list] = {}
    for row, item in enumerate(rows):
        if item is None:
            continue
        if isinstance(item, torch.Tensor):
            item = {"image": item}
        for kind, feats in item.items():
            feats = feats["features"] if isinstance(feats, dict) else feats
            per_kind.setdefault(kind, [None] * len(rows))[row] = feats
    media = {}
    for kind, feats in per_kind.items():
        present = [f for f in feats if f is not None and f.shape[0]]
        if not present:
            continue
        media[kind] = {"features": torch.cat(present).to(device),
                       "counts": torch.tensor([0 if f is None else f.shape[0] for f in feats], device=device)}
    return media or None


class Generator:
    """One loaded model (from load_export) turned into text-in, text-out generation."""

    def __init__(self, vlm, tokenizer, cfg, tower=None):
        self.vlm, self.tokenizer, self.cfg, self.tower = vlm, tokenizer, cfg, tower
        self.encoder = PromptEncoder(tokenizer, cfg.template, self.media_tokens)
        self.tiling = cfg.tiling_spec                  # TilingSpec | None: images tiled as in training
        self.video_sampling = cfg.video_sampling       # FrameSampling | None: frames sampled as in training
        self.stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[-1]

    @property
    def media_tokens(self) -> dict[str, int]:
        """Pad slots per view of each kind this model has a connector for."""
        return dict(self.vlm.num_tokens)

    @property
    def device(self) -> torch.device:
        return next(self.vlm.parameters()).device

    def _need_tower(self):
        if self.tower is None:
            raise ValueError("this Generator has no vision tower; load the export with with_vision=True")
        return self.tower

    def encode_images(self, images: Sequence) -> torch.Tensor:
        """RGB PIL images -> (M, P, D) features, exactly as the cache computes them: one untiled
        view per image (for a tiled export use `encode_media`, which tiles and gives the layouts)."""
        tower = self._need_tower()
        if not images:
            return torch.empty(0, *tower.feature_shape(self.cfg.pool), dtype=tower.dtype)
        return tower(tower.preprocess(list(images)), pool=self.cfg.pool)

    # -- tiles and videos --------------------------------------------------------------------
    def decode_video(self, source, name: str | None = None, max_bytes: int | None = None,
                     max_pixels: int | None = None):
        """A video path or bytes -> contract.video.Video, its frames sampled as the training cache
        sampled them (cfg.video_sampling); MediaUnsupported for a model without video."""
        if self.video_sampling is None or "video" not in self.vlm.num_tokens:
            raise MediaUnsupported(f"{name or 'video'}: this export has no video connector (it was not "
                                   "trained with model.video); it takes images only")
        from vlm_dist.contract.video import DEFAULT_MAX_VIDEO_BYTES
        return self._need_tower().decode_video(source, self.video_sampling, name=name,
                                               max_bytes=max_bytes or DEFAULT_MAX_VIDEO_BYTES,
                                               max_pixels=max_pixels)

    def media_views(self, images: Sequence = (), videos: Sequence = ()) -> tuple[dict, dict]:
        """Decoded images (RGB PIL) and videos (contract.video.Video) -> (views, layouts): per kind,
        each item's views (an image: itself, or its thumbnail + tiles when the export is tiled; a
        video: its frames) and layouts (Tiling | None; VideoLayout) in order. CPU only."""
        from vlm_dist.contract.video import VideoLayout
        from vlm_dist.model.vision import image_views

        views, layouts = {}, {}
        if images:
            tiled = [image_views(img, self.tiling) for img in images]
            views["image"] = [v for _, v in tiled]
            layouts["image"] = [t for t, _ in tiled]
        if videos:
            if "video" not in self.vlm.num_tokens:
                raise MediaUnsupported("this export has no video connector (it was not trained with "
                                       "model.video); it takes images only")
            views["video"] = [list(v.frames) for v in videos]
            layouts["video"] = [VideoLayout.of(v) for v in videos]
        return views, layouts

    def encode_views(self, views: dict) -> dict:
        """media_views' views -> {kind: {"features": (sum of views, P, D), "counts": (1,)}}: one
        prompt's media, each kind's views concatenated in item order (tower.encode_views: the
        cache's exact preprocessing)."""
        tower = self._need_tower()
        media = {}
        for kind, items in views.items():
            flat = [v for item in items for v in item]
            if flat:
                media[kind] = {"features": tower.encode_views(flat, pool=self.cfg.pool),
                               "counts": torch.tensor([len(flat)])}
        return media

    def encode_media(self, images: Sequence = (), videos: Sequence = ()) -> tuple[dict, dict]:
        """RGB PIL images and decoded videos (`decode_video`) -> (media, layouts) for one prompt:
        media {kind: {"features", "counts"}}, layouts {kind: [per item]} for `generate(...,
        layouts=)` / `prompt_ids`, so block and features are the ones training built."""
        views, layouts = self.media_views(images, videos)
        return self.encode_views(views), layouts

    @staticmethod
    def cached_features(cache, refs: Sequence[str]) -> torch.Tensor:
        """(M, P, D) features of a record's image references from a FeatureCache."""
        if not refs:
            return torch.empty(0, *cache.feature_shape)
        return torch.stack([cache.features_for(r) for r in refs])

    def prompt_ids(self, conversations: list[dict], layouts: dict | None = None) -> tuple[list[int], int]:
        """(ids, number of <image> placeholders); `layouts` as encode_media returns them."""
        ids, counts = self.encoder.encode_prompt(conversations, layouts=layouts)
        return ids, counts["image"]

    def check_items(self, conversations: list[dict], features, layouts: dict | None) -> list[int]:
        """The prompt's ids, once every placeholder has its item (and a tiled export its tiles)."""
        from vlm_dist.contract.media import MEDIA_KINDS
        if isinstance(features, torch.Tensor) or features is None:
            given = {"image": 0 if features is None else features.shape[0]}
        else:
            given = {k: int(v["counts"].sum()) if isinstance(v, dict) else v.shape[0] for k, v in features.items()}
        # before counting: without layouts a tiled image's views would count as images
        if self.tiling is not None and given.get("image") and not (layouts and "image" in layouts):
            raise ValueError("this export is tiled: encode the images with encode_media(images) and pass "
                             "its layouts, so each image gets its thumbnail and tiles as in training")
        for kind, mk in MEDIA_KINDS.items():
            n = sum(t["content"].count(mk.placeholder) for t in conversations)
            items = len(layouts[kind]) if layouts and kind in layouts else given.get(kind, 0)
            if n != items:
                raise ValueError(f"the prompt has {n} {mk.placeholder} placeholder(s) but {items} {kind}(s) "
                                 f"were given; every {mk.placeholder} needs exactly one {kind}, in order")
        ids, _ = self.encoder.encode_prompt(conversations, layouts=layouts)
        return ids

    @torch.no_grad()
    def generate_ids(self, conversations: list[dict], features, settings: GenerationSettings,
                     streamer=None, layouts: dict | None = None) -> list[int]:
        """New token ids for the prompt (conversation without the reply) and its media: `features`
        an (M, P, D) tensor of untiled images (encode_images), or encode_media's media with its
        `layouts`."""
        ids = self.check_items(conversations, features, layouts)
        media = media_batch([features], self.device)
        sampling = None
        if settings.do_sample:
            from transformers import LogitsProcessorList
            top_k = unwrap_llm(self.vlm.llm).generation_config.top_k   # as transformers' sampling applied it
            sampling = LogitsProcessorList([SeededSampling(settings.temperature, settings.top_p, settings.seed,
                                                           self.device, top_k=top_k)])
        out = self.vlm.generate(torch.tensor([ids], device=self.device), media,
                                max_new_tokens=settings.max_new_tokens, do_sample=False,
                                eos_token_id=self.stop_ids, pad_token_id=self.pad_id,
                                streamer=streamer, logits_processor=sampling)
        new = out[0].tolist()
        for i, t in enumerate(new):       # cut at the first stop token
            if t in self.stop_ids:
                return new[:i]
        return new

    def generate(self, conversations: list[dict], features, settings: GenerationSettings | None = None,
                 streamer=None, layouts: dict | None = None) -> str:
        ids = self.generate_ids(conversations, features, settings or GenerationSettings(), streamer, layouts)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @torch.no_grad()
    def generate_batch(self, prompts: Sequence[Sequence[int]], features: Sequence,
                       settings: GenerationSettings, streamer=None, stopping_criteria=None) -> torch.Tensor:
        """(B, T_new) new token ids for B prompts (token ids, built with their layouts) and their media:
        per row None, an (M_b, P, D) tensor of untiled image features, or encode_media's media.

        The prompts are left-padded into one batch (transformers derives the positions from the
        attention mask, so each row sees its own tokens at positions 0..n-1, as alone). One row
        runs exactly as `generate_ids` does. Several rows need greedy settings: seeded sampling
        draws from one RNG, which rows would share. Rows stop at STOP_TOKENS (later tokens are
        pad) or where `stopping_criteria` (a transformers StoppingCriteriaList, per row) says;
        `streamer.put` gets each step's (B,) tokens. Batched rows match single-row greedy results
        up to floating-point summation order (padded matmuls), as in any batched server.
        """
        if len(prompts) != len(features) or not prompts:
            raise ValueError(f"{len(prompts)} prompts but {len(features)} feature sets")
        if settings.do_sample and len(prompts) > 1:
            raise ValueError("sampled rows cannot share a batch (one seeded RNG); batch greedy prompts only")
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):                  # left padding
            ids[row, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[row, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        media = media_batch(features, self.device)
        sampling = None
        if settings.do_sample:
            from transformers import LogitsProcessorList
            top_k = unwrap_llm(self.vlm.llm).generation_config.top_k
            sampling = LogitsProcessorList([SeededSampling(settings.temperature, settings.top_p, settings.seed,
                                                           self.device, top_k=top_k)])
        embeds = self.vlm.embed(ids, media)                                        # (B, T, H)
        return self.vlm.llm.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=settings.max_new_tokens,
            do_sample=False, temperature=None, top_p=None, top_k=None,
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id, streamer=streamer,
            logits_processor=sampling, stopping_criteria=stopping_criteria)
