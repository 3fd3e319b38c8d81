"""The model worker: one thread owns the model, takes jobs from a bounded queue, batches greedy ones.

    engine = Engine.from_export("runs/sft/export", ServeConfig(max_queue=32))
    job = Job(engine.prompt_ids(turns, layouts), views, SamplingParams(max_tokens=64), on_event)
    engine.submit(job)            # RequestError(503) when the queue is full; events arrive on on_event

A job is one chat completion: prompt token ids (built here from content parts, so text is always
text: a typed `<image>` or `<|image_pad|>` never becomes an image slot), its decoded media as
views (Generator.media_views: an image, or a tiled export's thumbnail + tiles; a video's sampled
frames), and sampling settings. The blocks are PromptEncoder.block with each item's layout, so a
served prompt has exactly the tokens training gave the same record; the worker encodes the views
with the tower (the cache's preprocessing). The worker takes the oldest job; if it is greedy (temperature 0) it also takes
every other waiting greedy job, up to `max_batch`, and generates them together, left-padded
(Generator.generate_batch). A sampled job runs alone: its seeded RNG is its own. Each row stops on
its own -- a stop token ("stop"), a stop string ("stop"), its max_tokens ("length"), or its client
leaving (`job.cancel()`), which also frees its queue slot at once; the batch ends when every row
has. Text reaches the client through `on_event` as ("delta", text) items, then ("done", reason)
or ("error", exception), called from the worker thread.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from vlm_dist.contract.media import IMAGE, VIDEO
from vlm_dist.contract.prompt import PromptEncoder
from vlm_dist.serve.errors import RequestError

log = logging.getLogger("vlm_dist.serve")

IMAGE_PART = object()
"""Marks an image's position in a turn's content parts (the rest are text strings)."""
VIDEO_PART = object()
"""Marks a video's position in a turn's content parts."""
PART_KINDS = {id(IMAGE_PART): IMAGE.name, id(VIDEO_PART): VIDEO.name}


class PartsPromptEncoder(PromptEncoder):
    """PromptEncoder whose turn content is a list of parts: text strings, IMAGE_PART and VIDEO_PART.

    Each media part becomes its kind's block for the k-th item's layout (PromptEncoder.block:
    a tiled image's thumbnail + tiles, a video's frames with their timestamps); text is only
    ever tokenized as text (with split_special_tokens), so an `<image>` a user types stays the
    characters `<image>`. Text pieces are tokenized one by one, as PromptEncoder tokenizes the
    text between placeholders: "Image 1: <image>\\nWhat?" and the parts ["Image 1: ", IMAGE_PART,
    "\\nWhat?"] give the same ids.
    """

    def _content(self, parts: list, layouts: dict, kinds: list[str]) -> list[int]:
        ids = []
        for part in parts:
            kind = PART_KINDS.get(id(part)) if not isinstance(part, str) else None
            if kind is not None:
                k = kinds.count(kind)
                items = layouts.get(kind) or []
                ids += self.block(kind, items[k] if k < len(items) else None)
                kinds.append(kind)
            else:
                ids += self._text(part)
        return ids


@dataclass
class ServeConfig:
    served_model_name: str | None = None
    """The model name clients send and /v1/models lists (default: the --model argument)."""
    api_key: str | None = None
    """Required as `Authorization: Bearer KEY` on /v1/*; None: no key needed."""
    limit_mm_per_prompt: int = 8
    """Most images in one request (all turns together)."""
    limit_video_per_prompt: int = 1
    """Most videos in one request (all turns together)."""
    max_image_bytes: int = 20 << 20
    """Largest image in bytes (data: URL decoded, fetched or local)."""
    max_video_bytes: int = 100 << 20
    """Largest video in bytes (data: URL decoded, fetched or local)."""
    max_image_pixels: int = 40_000_000
    """Largest image in pixels (width x height), checked before its pixels are decoded."""
    allowed_local_media_path: str | None = None
    """The one directory file:// image URLs may read under; None: file:// refused."""
    fetch_timeout: float = 10.0
    """Seconds for an http(s) image fetch."""
    max_queue: int = 64
    """Requests admitted at once (waiting + generating); more get 503 with Retry-After."""
    max_batch: int = 16
    """Most greedy requests generated together in one batch."""
    max_model_len: int | None = None
    """Prompt + reply tokens at most (default: the LLM's max_position_embeddings)."""
    default_max_tokens: int = 512
    """Reply length when a request gives no max_tokens (cut to what max_model_len leaves)."""


SAMPLING_EPS = 1e-5
# characters of text per token of --max-model-len a prompt may bring before it is tokenized at all: no
# tokenizer makes fewer than one token per ~16 characters, so a longer text cannot fit; refusing it
# first keeps a huge prompt from holding the tokenizer lock the worker needs on every step
MAX_CHARS_PER_TOKEN = 16


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS   # as vLLM: a temperature this small is greedy (1/T overflows)


class Job:
    """One chat completion in the engine; `text`, `finish_reason`, token counts once done."""

    def __init__(self, prompt_ids: list[int], views: dict, params: SamplingParams,
                 on_event: Callable[[tuple], None]):
        """`views`: {kind: [each item's RGB views]} (Generator.media_views), {} without media; a
        plain list is images, one view each (untiled)."""
        if isinstance(views, list):
            views = {"image": [[img] for img in views]} if views else {}
        self.prompt_ids, self.views, self.params, self.on_event = prompt_ids, views, params, on_event
        self.tokens: list[int] = []
        self.text, self.emitted = "", 0
        self.finish_reason: str | None = None
        self.cancelled = threading.Event()
        self.admitted = False

    def cancel(self) -> None:
        """The client left: stop generating this row, free its slot (from any thread)."""
        self.cancelled.set()

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


class BatchControl:
    """Streamer and stopping criterion of one batch: routes each step's tokens to their jobs.

    transformers calls `put` with the step's (B,) tokens, then `__call__` for the rows to stop.
    A row's text is decoded from all its tokens each step; what could still become a stop string
    or an incomplete UTF-8 character is held back until it cannot.
    """

    def __init__(self, engine: "Engine", jobs: list[Job]):
        self.engine, self.jobs = engine, jobs
        self.tokenizer, self.stop_ids = engine.generator.tokenizer, set(engine.generator.stop_ids)

    def put(self, value: torch.Tensor) -> None:
        if value.dim() != 1:              # the (B, 0) prompt put when generating from embeddings
            return
        for job, tok in zip(self.jobs, value.tolist()):
            if not job.done:
                self._step(job, tok)

    def end(self) -> None:
        for job in self.jobs:
            if not job.done:
                self.engine.finish(job, "length")

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        for job in self.jobs:
            if job.cancelled.is_set() and not job.done:
                self.engine.finish(job, "cancelled")
        return torch.tensor([job.done for job in self.jobs], device=input_ids.device)

    def _step(self, job: Job, tok: int) -> None:
        if job.cancelled.is_set():
            return self.engine.finish(job, "cancelled")
        if tok in self.stop_ids:
            return self.engine.finish(job, "stop")
        job.tokens.append(tok)
        self.engine.tokens_generated += 1
        with self.engine.tokenizer_lock:
            text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in job.params.stop) if i >= 0]
        if hits:
            job.text = text[:min(hits)]
            return self.engine.finish(job, "stop")
        job.text = text
        if len(job.tokens) >= job.params.max_tokens:
            return self.engine.finish(job, "length")
        safe = len(text.rstrip("\ufffd"))
        held = max((k for s in job.params.stop for k in range(1, len(s))
                    if text[:safe].endswith(s[:k])), default=0)
        self.engine.emit(job, safe - held)


class Engine:
    """The model, its worker thread and the admission queue. Thread-safe `submit`, `cancel`."""

    def __init__(self, generator, config: ServeConfig, model_name: str):
        from vlm_dist.model.vlm import unwrap_llm

        self.generator, self.config, self.model_name = generator, config, model_name
        self.tower = generator.tower
        self.encoder = PartsPromptEncoder(generator.tokenizer, generator.cfg.template,
                                          generator.media_tokens)
        self.max_model_len = config.max_model_len or unwrap_llm(generator.vlm.llm).config.max_position_embeddings
        self.tokenizer_lock = threading.Lock()   # a fast tokenizer's Rust state is not shared safely
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.active = 0                  # admitted and not finished
        self.running = 0                 # jobs in the batch being generated
        self.tokens_generated = 0
        self.batches = self.largest_batch = self.completed = 0
        self._thread = threading.Thread(target=self._loop, name="vlm-serve-worker", daemon=True)
        self._thread.start()

    @classmethod
    def from_export(cls, export_dir: str, config: ServeConfig | None = None, device: str | None = None,
                    dtype: str | None = None) -> "Engine":
        from vlm_dist.inference.export import load_export
        from vlm_dist.inference.generate import Generator

        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        vlm, tokenizer, tower, cfg = load_export(export_dir, device=device, dtype=dtype)
        config = config or ServeConfig()
        return cls(Generator(vlm, tokenizer, cfg, tower), config, config.served_model_name or str(export_dir))

    # -- request side ---------------------------------------------------------------------------
    def prompt_ids(self, turns: list[dict], layouts: dict | None = None) -> list[int]:
        """Token ids of the prompt for turns whose content is a list of parts (see PartsPromptEncoder),
        each media part's block made with its layout (Generator.media_views)."""
        chars = sum(len(part) for t in turns for part in t["content"] if isinstance(part, str))
        if chars > MAX_CHARS_PER_TOKEN * self.max_model_len:
            raise RequestError(400, f"the prompt's text is {chars} characters: far more than this model's "
                                    f"{self.max_model_len} tokens (--max-model-len) can hold",
                               code="context_length_exceeded", param="messages")
        with self.tokenizer_lock:
            ids, _ = self.encoder.encode_prompt(turns, layouts=layouts)
        return ids

    def check_length(self, n_prompt: int, max_tokens: int | None) -> int:
        """The reply length to generate; RequestError(400) when the prompt leaves no room for it."""
        limit = self.max_model_len
        if n_prompt >= limit:
            raise RequestError(400, f"the prompt is {n_prompt} tokens (images included); this model "
                                    f"takes at most {limit} tokens in all (--max-model-len)",
                               code="context_length_exceeded", param="messages")
        if max_tokens is None:
            return min(self.config.default_max_tokens, limit - n_prompt)
        if n_prompt + max_tokens > limit:
            raise RequestError(400, f"the prompt is {n_prompt} tokens and max_tokens is {max_tokens}: "
                                    f"{n_prompt + max_tokens} exceeds this model's {limit} tokens "
                                    "(--max-model-len); ask for fewer tokens or send less",
                               code="context_length_exceeded", param="max_tokens")
        return max_tokens

    def check_capacity(self) -> None:
        """RequestError(503, Retry-After) when no slot is free (call holding no lock, or the lock)."""
        if self._closed:
            raise RequestError(503, "the server is shutting down", code="server_busy",
                               headers={"Retry-After": "5"})
        if self.active >= self.config.max_queue:
            raise RequestError(503, f"the server is busy ({self.active} requests in progress, "
                                    f"--max-queue {self.config.max_queue}); retry shortly",
                               code="server_busy", headers={"Retry-After": "1"})

    def submit(self, job: Job) -> None:
        with self._cond:
            self.check_capacity()
            self.active += 1
            job.admitted = True
            self._pending.append(job)
            self._cond.notify()

    def stats(self) -> dict:
        with self._cond:
            return {"active": self.active, "waiting": len(self._pending), "running": self.running,
                    "capacity": self.config.max_queue, "completed": self.completed, "batches": self.batches,
                    "largest_batch": self.largest_batch, "tokens_generated": self.tokens_generated}

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            for job in self._pending:
                job.cancel()
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- worker side ----------------------------------------------------------------------------
    def emit(self, job: Job, upto: int) -> None:
        if upto > job.emitted:
            delta, job.emitted = job.text[job.emitted:upto], upto
            job.on_event(("delta", delta))

    def finish(self, job: Job, reason: str, error: Exception | None = None) -> None:
        """End a job once: the rest of its text, then done (or error); its slot is freed now."""
        if job.done:
            return
        job.finish_reason = reason
        if error is not None:
            job.on_event(("error", error))
        else:
            self.emit(job, len(job.text))
            job.on_event(("done", reason))
        with self._cond:
            if job.admitted:
                job.admitted = False
                self.active -= 1
                self.completed += 1

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while self._pending and self._pending[0].cancelled.is_set():
                    self._drop(self._pending.popleft())
                if self._pending:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            first = self._pending.popleft()
            batch = [first]
            if first.params.greedy:
                for job in list(self._pending):
                    if len(batch) >= self.config.max_batch:
                        break
                    if job.params.greedy and not job.cancelled.is_set():
                        self._pending.remove(job)
                        batch.append(job)
            self.running = len(batch)
            self.batches += 1
            self.largest_batch = max(self.largest_batch, len(batch))
            return batch

    def _drop(self, job: Job) -> None:
        """A job whose client left before it ran (called holding the lock)."""
        job.finish_reason = "cancelled"
        if job.admitted:
            job.admitted = False
            self.active -= 1

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._generate(batch)
            except Exception as e:   # a bug: the requests get a 500, the worker lives on
                log.exception("generation failed for a batch of %d request(s)", len(batch))
                for job in batch:
                    self.finish(job, "error", error=e)
            finally:
                with self._cond:
                    self.running = 0

    def _generate(self, batch: list[Job]) -> None:
        from transformers import StoppingCriteriaList

        from vlm_dist.inference.generate import GenerationSettings

        gen = self.generator
        feats = [gen.encode_views(job.views) if job.views else None for job in batch]
        p = batch[0].params
        settings = GenerationSettings(max_new_tokens=max(job.params.max_tokens for job in batch),
                                      do_sample=not p.greedy, temperature=p.temperature or 1.0,
                                      top_p=p.top_p, seed=p.seed)
        control = BatchControl(self, batch)
        start = time.monotonic()
        gen.generate_batch([job.prompt_ids for job in batch], feats, settings, streamer=control,
                           stopping_criteria=StoppingCriteriaList([control]))
        control.end()
        log.info("batch of %d: %d tokens in %.2f s", len(batch), sum(len(j.tokens) for j in batch),
                 time.monotonic() - start)
