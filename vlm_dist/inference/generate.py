"""From images and a conversation to generated text: features, prompt, generate, decode.

    vlm, tokenizer, tower, cfg = load_export("runs/sft/export")
    gen = Generator(vlm, tokenizer, cfg, tower)
    text = gen.generate(conversations, gen.encode_images([img1, img2]), GenerationSettings())

Features come either online (`encode_images`: the export's vision tower, its
image processor, its dtype and pooling, as `vlm-cache build` encodes them) or
from a feature cache (`cached_features`). The prompt is the conversation up to
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


class Generator:
    """One loaded model (from load_export) turned into text-in, text-out generation."""

    def __init__(self, vlm, tokenizer, cfg, tower=None):
        self.vlm, self.tokenizer, self.cfg, self.tower = vlm, tokenizer, cfg, tower
        self.encoder = PromptEncoder(tokenizer, cfg.template, cfg.num_media_tokens)
        self.stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[-1]

    @property
    def device(self) -> torch.device:
        return next(self.vlm.parameters()).device

    def encode_images(self, images: Sequence) -> torch.Tensor:
        """RGB PIL images -> (M, P, D) features, exactly as the cache computes them."""
        if self.tower is None:
            raise ValueError("this Generator has no vision tower; load the export with with_vision=True")
        if not images:
            return torch.empty(0, *self.tower.feature_shape(self.cfg.pool), dtype=self.tower.dtype)
        return self.tower(self.tower.preprocess(list(images)), pool=self.cfg.pool)

    @staticmethod
    def cached_features(cache, refs: Sequence[str]) -> torch.Tensor:
        """(M, P, D) features of a record's image references from a FeatureCache."""
        if not refs:
            return torch.empty(0, *cache.feature_shape)
        return torch.stack([cache.features_for(r) for r in refs])

    def prompt_ids(self, conversations: list[dict]) -> tuple[list[int], int]:
        ids, counts = self.encoder.encode_prompt(conversations)
        return ids, counts["image"]

    @torch.no_grad()
    def generate_ids(self, conversations: list[dict], features: torch.Tensor | None,
                     settings: GenerationSettings, streamer=None) -> list[int]:
        """New token ids for the prompt (conversation without the reply) and its images' features."""
        ids, n_images = self.prompt_ids(conversations)
        n_feats = 0 if features is None else features.shape[0]
        if n_images != n_feats:
            raise ValueError(f"the prompt has {n_images} <image> placeholder(s) but {n_feats} image(s) "
                             "were given; every <image> needs exactly one image, in order")
        media = None
        if n_feats:
            media = {"image": {"features": features.to(self.device),
                               "counts": torch.tensor([n_feats], device=self.device)}}
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

    def generate(self, conversations: list[dict], features: torch.Tensor | None,
                 settings: GenerationSettings | None = None, streamer=None) -> str:
        ids = self.generate_ids(conversations, features, settings or GenerationSettings(), streamer)
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @torch.no_grad()
    def generate_batch(self, prompts: Sequence[Sequence[int]], features: Sequence[torch.Tensor | None],
                       settings: GenerationSettings, streamer=None, stopping_criteria=None) -> torch.Tensor:
        """(B, T_new) new token ids for B prompts (token ids) and their images' (M_b, P, D) features.

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
        feats = [f for f in features if f is not None and f.shape[0]]
        media = None
        if feats:
            counts = [0 if f is None else f.shape[0] for f in features]
            media = {"image": {"features": torch.cat(feats).to(self.device),
                               "counts": torch.tensor(counts, device=self.device)}}
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
