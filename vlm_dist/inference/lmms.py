"""lmms-eval model `vlm_dist`: our export (or a merged one) in the field's evaluation harness.

    pip install -e '.[eval]'
    lmms-eval eval --model vlm_dist --model_args pretrained=runs/sft/export \\
        --tasks pope,mmmu_val --batch_size 8 --output_path eval/lmms --log_samples
    accelerate launch --num_processes 8 -m lmms_eval --model vlm_dist \\
        --model_args pretrained=merged/sft,dtype=bf16 --tasks pope --batch_size 8 --output_path eval/lmms

lmms-eval finds the model through the `lmms_eval.models` entry point (setup.py names
`manifest` below); nothing of lmms-eval is copied here, and importing vlm_dist never needs
it: the model class is built on first use (module `__getattr__`), when lmms-eval asks for it.

model_args: pretrained (export directory, required), device (default: the rank's accelerator
device, else cuda if available, else cpu), dtype (LLM/connector: bf16, fp16, fp32; default bf16
on CUDA, fp32 on CPU), vision_dtype (default: the export's), max_new_tokens (an upper bound on
every task's own max_new_tokens), batch_size (lmms-eval's --batch_size).

Images and text, as lmms-eval's LLaVA/Qwen models place them: a context without `<image>`
gets the document's images in front, in doc_to_visual's order (one: "<image>\\n"; several:
"Image 1: <image>\\nImage 2: <image>\\n...", vlm-generate's convention); a context that carries
one `<image>` marker per image keeps them, the k-th marker taking the k-th image (a context whose
marker count disagrees with its images is warned about, by task and doc, and its markers are
removed so the images go in front). Other markers, such as MMMU's "<image 1>", stay text.
PIL images from the harness go straight to the vision tower; bytes and file paths are decoded by
`tower.decode`, as vlm-generate decodes them. A tiled export tiles them as its training cache did.
Video tasks pass video file paths as visuals (a path with a video suffix, VIDEO_SUFFIXES): for a
model trained with video they are decoded by `Generator.decode_video` (the training cache's frame
sampling) and placed like images, as `<video>` (in front, or at the context's own `<video>`
markers); a model without a video connector refuses them, naming the task and doc.
The context is one user turn in the export's template.

generate_until: requests sorted by context length (longest first, like lmms-eval's models),
grouped by generation settings, run `batch_size` at a time (left-padded), each cut at its first
stop token and at the first of the task's `until` strings. generate_until_multi_round is not
implemented (a NotImplementedError says so). loglikelihood: from one forward per request,
(-sum log p(continuation tokens | context, images), whether greedy decoding gives them). The
first element is the continuation's negative log-likelihood: lmms-eval's multiple_choice scoring
takes the argmin over the choices (api/task.py: "we return the actual loss in many model
loglikelihood, we just use the argmin here"), as its own models return a loss; a log-likelihood
there would pick the least likely choice. The flip side, as for lmms-eval's own models: its
`perplexity` aggregation (exp(-mean)) reports 1/perplexity for plain loglikelihood tasks, and
`acc_mutual_info` (argmax of conditional minus unconditional) picks the least informative choice;
do not read those two metrics from this model. The continuation's leading whitespace (lmms-eval's
target_delimiter) is dropped, as a reply starts right after the assistant prefix in training.

Sharding: under accelerate or torchrun each process loads the model on its own device and
answers its rank's slice of the documents (lmms-eval splits them by `rank`/`world_size` and
gathers the answers).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from vlm_dist.errors import UserError

MODEL_ID = "vlm_dist"
CLASS_NAME = "VlmDistLmms"
DEFAULT_MAX_NEW_TOKENS = 128    # when a task sets none (lmms-eval's Qwen models' default)
# what lmms-eval's video models treat as a video visual (paths; the files are decoded with PyAV)
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp")


class LmmsEvalError(UserError, ValueError):
    """A document or a model argument the model cannot take; names the task, doc or argument."""


def manifest():
    """lmms-eval's registration payload (entry point group `lmms_eval.models`)."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{CLASS_NAME}")


def __getattr__(name: str):
    if name == CLASS_NAME:   # lmms-eval imports the class: only then is lmms-eval needed
        from lmms_eval.api.model import lmms
        cls = type(CLASS_NAME, (VlmDistModel, lmms), {"__module__": __name__, "__doc__": VlmDistModel.__doc__})
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    out = []
    for v in visuals if isinstance(visuals, (list, tuple)) else [visuals]:
        out += _flatten(v) if isinstance(v, (list, tuple)) else [v]
    return out


def _cut_at(text: str, until: list[str]) -> str:
    """Text up to the first occurrence of any stop string."""
    cut = min((text.index(s) for s in until if s and s in text), default=len(text))
    return text[:cut]


def _survives_unwrap(pair: tuple[float, bool]):
    """(nll, is_greedy) as lmms-eval's evaluator will hand it to the task.

    lmms-eval 0.7.3 passes every response through `unwrap_generation_output`, which turns a
    (float, bool) tuple into its str, so multiple-choice scoring fails for every model
    ("too many values to unpack"); a GenerationResult's text passes through unchanged. Where
    the installed lmms-eval keeps tuples, they are returned as they are.
    """
    from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    if unwrap_generation_output(pair)[0] == pair:
        return pair
    return GenerationResult(text=pair)


class VlmDistModel:
    """A vlm_dist export as an lmms-eval simple model (`--model vlm_dist`); the lmms-eval base class
    is mixed in when lmms-eval loads it."""

    is_simple = True

    def __init__(self, pretrained: str, device: str | None = None, dtype: str | None = None,
                 vision_dtype: str | None = None, max_new_tokens: int | str | None = None,
                 batch_size: int | str = 1, max_batch_size=None, **kwargs) -> None:
        super().__init__()
        if kwargs:
            raise LmmsEvalError(f"--model_args: unknown argument(s) {sorted(kwargs)} for --model {MODEL_ID}; "
                                "known: pretrained, device, dtype, vision_dtype, max_new_tokens")
        from accelerate import Accelerator

        from vlm_dist.inference.export import load_export
        from vlm_dist.inference.generate import Generator

        try:
            self.batch_size_per_gpu = int(batch_size)
            self.max_new_tokens = None if max_new_tokens in (None, "") else int(max_new_tokens)
        except ValueError as e:
            raise LmmsEvalError(f"--batch_size {batch_size!r} / max_new_tokens {max_new_tokens!r}: "
                                "need integers (no 'auto')") from e
        accelerator = Accelerator()
        if accelerator.num_processes > 1:   # one process per device; lmms-eval splits the documents
            self._device = accelerator.device
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.accelerator = accelerator
        vlm, tokenizer, tower, cfg = load_export(pretrained, self._device, dtype, vision_dtype=vision_dtype)
        self.gen = Generator(vlm, tokenizer, cfg, tower)
        self.pretrained = pretrained

    # -- what lmms-eval reads -------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer(self):
        return self.gen.tokenizer

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # -- documents -> prompts and images -----------------------------------------
    def _doc(self, task, split, doc_id):
        return self.task_dict[task][split][doc_id]

    def _visuals(self, visuals, where: str) -> tuple[list, list]:
        """The document's visuals: (RGB PIL images, decoded videos), each kind in order."""
        from PIL import Image
        out, videos = [], []
        for k, v in enumerate(_flatten(visuals)):
            if isinstance(v, (str,)) or hasattr(v, "__fspath__"):
                if str(v).lower().endswith(VIDEO_SUFFIXES):
                    videos.append(self.gen.decode_video(str(v), name=f"{where} visual {k} ({v})"))
                    continue
            if isinstance(v, Image.Image):   # as the cache decodes: EXIF upright, alpha on white, 16-bit scaled
                from PIL import ImageOps

                from vlm_dist.contract.images import to_rgb
                out.append(to_rgb(ImageOps.exif_transpose(v)))
            elif isinstance(v, (bytes, str)) or hasattr(v, "__fspath__"):
                out.append(self.gen.tower.decode(v if isinstance(v, bytes) else str(v), name=f"{where} visual {k}"))
            else:
                raise LmmsEvalError(f"{where}: visual {k} is a {type(v).__name__}; {MODEL_ID} takes images "
                                    "(PIL images, image bytes or image file paths) and video file paths "
                                    f"({', '.join(VIDEO_SUFFIXES)}), not audio")
        return out, videos

    def _turns(self, context: str, n_images: int, where: str, n_videos: int = 0) -> list[dict]:
        from vlm_dist.contract.media import VIDEO
        from vlm_dist.contract.records import IMAGE_PLACEHOLDER
        from vlm_dist.inference.generate_cli import build_conversation
        for placeholder, n, what in ((IMAGE_PLACEHOLDER, n_images, "image"), (VIDEO.placeholder, n_videos, "video")):
            markers = context.count(placeholder)
            if markers and markers != n:   # a benchmark's own text: do not stop a long run on it
                from loguru import logger   # lmms-eval's logger (its dependency)
                logger.warning(f"{where}: the context has {markers} {placeholder} marker(s) but the document "
                               f"has {n} {what}(s); markers removed, the {what}s put in front")
                context = context.replace(placeholder, "")
        return build_conversation(context, None, n_images, n_videos=n_videos)

    def _prompt(self, context: str, doc_to_visual, doc_id, task, split):
        """(prompt ids, media) of one request: the blocks and features training would build
        (tiles, video frames: Generator.encode_media)."""
        where = f"task {task} ({split}) doc {doc_id}"
        images, videos = self._visuals(doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual else None,
                                       where)
        media, layouts = self.gen.encode_media(images, videos)
        ids, _ = self.gen.prompt_ids(self._turns(context, len(images), where, len(videos)), layouts)
        return ids, media

    def _media(self, feats: list) -> dict | None:
        from vlm_dist.inference.generate import media_batch
        return media_batch(feats, self.device)

    # -- generation ----------------------------------------------------------------
    @torch.no_grad()
    def _generate_batch(self, prompts: list[tuple[list[int], torch.Tensor]], max_new_tokens: int,
                        sampling=None) -> list[list[int]]:
        """New token ids for several prompts at once: left-padded, masked, cut at the first stop token."""
        gen = self.gen
        width = max(len(ids) for ids, _ in prompts)
        input_ids = torch.full((len(prompts), width), gen.pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, (ids, _) in enumerate(prompts):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            mask[row, width - len(ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        embeds = gen.vlm.embed(input_ids, self._media([f for _, f in prompts]))        # (B, T, H)
        out = gen.vlm.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                   do_sample=False, temperature=None, top_p=None, top_k=None,
                                   eos_token_id=gen.stop_ids, pad_token_id=gen.pad_id, logits_processor=sampling)
        results = []
        for row in out.tolist():
            stop = next((i for i, t in enumerate(row) if t in gen.stop_ids), len(row))
            results.append(row[:stop])
        return results

    def _settings(self, gen_kwargs: dict):
        """(until, max_new_tokens, sampling processor or None) from a task's generation_kwargs."""
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        if self.max_new_tokens is not None:
            max_new = min(max_new, self.max_new_tokens)
        temperature = float(gen_kwargs.get("temperature") or 0)
        sampling = None
        if gen_kwargs.get("do_sample") and temperature > 0:   # lmms-eval's models sample only then
            from transformers import LogitsProcessorList

            from vlm_dist.inference.generate import SeededSampling
            sampling = LogitsProcessorList([SeededSampling(temperature, float(gen_kwargs.get("top_p") or 1.0),
                                                           None, self.device)])
        return until, max_new, sampling

    def generate_until(self, requests) -> list[str]:
        from lmms_eval import utils
        tokenizer = self.tokenizer
        # longest context first (lmms-eval's convention: the first batch is the widest; OOM early)
        order = utils.Collator([r.args for r in requests], lambda a: (-len(tokenizer.encode(a[0])), a[0]),
                               grouping=True)
        res = []
        pbar = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for chunk in order.get_batched(n=self.batch_size, batch_fn=None):
            until, max_new, sampling = self._settings(chunk[0][1])   # the chunk shares its gen_kwargs
            prompts = [self._prompt(ctx, visual, doc_id, task, split)
                       for ctx, _, visual, doc_id, task, split in chunk]
            for (ctx, gen_kwargs, *_), ids in zip(chunk, self._generate_batch(prompts, max_new, sampling)):
                text = _cut_at(tokenizer.decode(ids, skip_special_tokens=True), until)
                res.append(text)
                self.cache_hook.add_partial("generate_until", (ctx, gen_kwargs), text)
            pbar.update(len(chunk))
        pbar.close()
        return order.get_original(res)

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_ID}: generate_until_multi_round (lmms-eval's multi-round tasks, "
                                  "e.g. mmsearch_end2end, ovo_forward) is not implemented; "
                                  "generate_until and loglikelihood are")

    # -- scoring ---------------------------------------------------------------------
    @torch.no_grad()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        res = []
        for req in tqdm(requests, disable=self.rank != 0, desc="Model Responding"):
            if len(req.args) == 2:          # acc_mutual_info's unconditional request: (context, continuation)
                (context, continuation), visual, doc_id, task, split = req.args, None, req.doc_id, req.task_name, None
            else:
                context, continuation, visual, doc_id, task, split = req.args
            if callable(continuation):      # output_type loglikelihood passes doc_to_target
                continuation = continuation(self._doc(task, split, doc_id))
            where = f"task {task} ({split}) doc {doc_id}"
            cont_ids = self.tokenizer.encode(str(continuation).lstrip(), add_special_tokens=False)
            if not cont_ids:
                raise LmmsEvalError(f"{where}: empty continuation {continuation!r} to score")
            if split is None:
                ctx_ids, feats = self.gen.prompt_ids(self._turns(context, 0, where))[0], None
            else:
                ctx_ids, feats = self._prompt(context, visual, doc_id, task, split)
            res.append(self._score(ctx_ids, cont_ids, feats))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), res[-1])
        return [_survives_unwrap(r) for r in res]

    def _score(self, ctx_ids: list[int], cont_ids: list[int], feats) -> tuple[float, bool]:
        """(-sum of log p(continuation | context), greedy?) from one forward: lower is likelier,
        as lmms-eval's multiple_choice (argmin) expects."""
        vlm = self.gen.vlm
        ids = torch.tensor([ctx_ids + cont_ids], device=self.device)
        embeds = vlm.embed(ids, self._media([feats]))
        # logits at positions len(ctx)-1 .. end; the last one predicts past the continuation
        logits = vlm.llm(inputs_embeds=embeds, use_cache=False, logits_to_keep=len(cont_ids) + 1).logits
        logp = torch.log_softmax(logits[0, :-1].float(), dim=-1)                        # (C, V)
        target = torch.tensor(cont_ids, device=self.device)
        nll = -logp.gather(1, target[:, None]).sum().item()
        return nll, bool((logp.argmax(dim=-1) == target).all())
