"""`vlm-export hf`: an export as a transformers model directory (LLaVA, or custom code for the resampler).

    export_hf("runs/sft/export", "hf/sft")                 # vlm-export hf runs/sft/export hf/sft [--dtype bf16]

    model = LlavaForConditionalGeneration.from_pretrained("hf/sft")      # no custom code
    processor = AutoProcessor.from_pretrained("hf/sft")
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")

With the plain MLP connector without LayerNorm (model.connector=mlp, model.use_layernorm=false:
launch/configs/stage1_align_llava.yaml) the model *is* LLaVA-1.5's architecture with a SigLIP tower
and a Qwen3 LLM, and the directory is a stock `LlavaForConditionalGeneration` (write_native):

    config.json           LlavaConfig: SigLIP vision_config (no pooling head), Qwen3 text_config,
                          image_token_index = <|image_pad|>, image_seq_length = tokens per image,
                          vision_feature_layer = the export's feature_layer, vision_feature_select_strategy
                          = "full" (SigLIP has no CLS token), projector_hidden_act "gelu" (exact, nn.GELU)
    model.safetensors     model.vision_tower.*, model.multi_modal_projector.linear_1/2,
                          model.language_model.* (LoRA merged with PEFT's merge_and_unload), lm_head.weight
    generation_config.json, tokenizer files, processor_config.json (LlavaProcessor: the SigLIP image
                          processor, patch_size, "full", image_token <|image_pad|>), chat_template.jinja

This is the layout vLLM's LLaVA implementation serves (`vllm serve hf/sft`); vLLM is not tested
here (it does not run on these machines). LLaVA picks `hidden_states[vision_feature_layer]` of the
whole tower, before its post_layernorm, exactly what VisionTower (and so the feature cache) uses:
feature_layer=-2 is hidden_states[-2] in both. tests/test_export_hf.py checks tokens and logits.

What LLaVA cannot express is refused, naming the setting: a LayerNorm before the projector or the
Perceiver resampler (the custom-code export, vlm_dist.inference.export_remote, writes those; it is
what `export_hf` picks for them), features pooled 2x2 (`pool`), SigLIP2 NaFlex towers; a model
trained with tiles or video is refused by both kinds (export_remote.check_expressible: no
transformers class has its block layout; its own export directory carries it).

How the HF path differs from vlm-generate's, for the same conversation:
- The processor tokenizes the rendered template in one piece with special tokens parsed: a user
  who types `<|image_pad|>` or `<|im_end|>` in text gets that control token, where PromptEncoder
  (split_special_tokens=True) gives ordinary text. Strip them from untrusted text first.
- Text next to template text is tokenized jointly: chatml's pieces are separated by special tokens,
  so ordinary text gives the same ids (tested); the plain template's "\\n" after a user turn may merge
  with punctuation that ends the turn ("?\\n" as one token) where training tokenized it apart.
- The vision tower runs in the saved dtype (`--dtype`, default the base LLM's: transformers loads a
  model in one dtype); vlm-generate runs it in the training cache's (`vision_dtype`). With the usual
  bf16 LLM and bf16 cache they agree; otherwise features differ by rounding only.
- Images: the processor takes decoded PIL images; vlm-generate decodes JPEGs with the training
  cache's draft size (`jpeg_draft_to`). Give both the same PIL image for equal features.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from vlm_dist.contract.media import IMAGE, token_id
from vlm_dist.errors import UserError
from vlm_dist.inference.export import ExportError, check_export, _read_json
from vlm_dist.inference.export_remote import _generation_config, check_expressible, vision_model, write_remote_code
from vlm_dist.inference.hf_common import (HF_MARKER, chat_template, check_hf_dir, check_hf_target,  # noqa: F401
                                          load_merged, publish_hf)   # (re-exported: the shared API)
from vlm_dist.model.build import read_connector_config
from vlm_dist.model.vlm import unwrap_llm

def native_refusal(export_dir: str | os.PathLike) -> str | None:
    """Why LlavaForConditionalGeneration cannot compute this export's connector (None: it can). Reads
    connector_config.json only; what no transformers export expresses (pooled features, SigLIP2 NaFlex)
    is export_remote.check_expressible's to refuse."""
    conn = read_connector_config(export_dir)["image"]
    where = Path(export_dir) / "connector_config.json"
    if conn.get("kind") != "mlp":
        return (f"{where}: connector kind={conn.get('kind')!r}: LLaVA's projector is Linear-GELU-Linear "
                "only; export the resampler with --remote-code (custom code, trust_remote_code=True)")
    if conn.get("use_layernorm", True):
        return (f"{where}: connector use_layernorm=true: LLaVA has no LayerNorm before its projector; "
                "train with model.use_layernorm=false (launch/configs/stage1_align_llava.yaml) or export "
                "with --remote-code")
    return None


def write_native(export_dir: str | os.PathLike, out_dir: str | os.PathLike,
                 dtype: str | torch.dtype | None = None) -> None:
    """Fill the empty directory `out_dir` with the LlavaForConditionalGeneration export of `export_dir`."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    check_expressible(export_dir)
    why = native_refusal(export_dir)
    if why:
        raise ExportError(why)
    vlm, tokenizer, tower, cfg = load_merged(export_dir, dtype)
    llm = unwrap_llm(vlm.llm)
    dtype = llm.dtype
    # the whole tower, no head; transformers loads a model in one dtype, so the tower is saved in the LLM's
    vision = vision_model(cfg, export_dir).to(dtype)
    n_tokens = vlm.num_tokens[IMAGE.name]
    patch = vision.config.patch_size
    if (vision.config.image_size // patch) ** 2 != n_tokens:
        raise ExportError(f"{export_dir}: {n_tokens} tokens per image but the tower gives "
                          f"{(vision.config.image_size // patch) ** 2} patches")
    config = LlavaConfig(
        vision_config=vision.config.to_dict(), text_config=llm.config.to_dict(),
        image_token_index=token_id(tokenizer, IMAGE.pad_token), image_seq_length=n_tokens,
        vision_feature_layer=cfg.feature_layer, vision_feature_select_strategy="full",
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=bool(llm.config.tie_word_embeddings))
    config.architectures = [LlavaForConditionalGeneration.__name__]
    for c in (config, config.text_config, config.vision_config):    # what from_pretrained's "auto" loads
        c.dtype = dtype
    setattr(config, HF_MARKER, {"template": cfg.template, "vision_dtype": cfg.vision_dtype,
                                "jpeg_draft_to": cfg.jpeg_draft_to})
    projector = vlm.connectors[IMAGE.name].projector          # Sequential(Linear, GELU, Linear)
    state = {f"model.vision_tower.{k}": v for k, v in vision.state_dict().items()}
    state.update({"model.multi_modal_projector.linear_1.weight": projector[0].weight,
                  "model.multi_modal_projector.linear_1.bias": projector[0].bias,
                  "model.multi_modal_projector.linear_2.weight": projector[2].weight,
                  "model.multi_modal_projector.linear_2.bias": projector[2].bias})
    for k, v in llm.state_dict().items():      # Qwen3ForCausalLM: model.* and lm_head.weight
        state["model.language_model." + k.removeprefix("model.") if k.startswith("model.") else k] = v
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:   # a mapping bug, not a user's mistake
        raise RuntimeError(f"LLaVA key mapping: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.generation_config = _generation_config(vlm, tokenizer)
    # transformers >= 4.52 key names (model.language_model.*, ...), not the pre-4.52 layout that
    # save_pretrained writes by default (both load; vLLM maps either)
    model.save_pretrained(str(out_dir), save_original_format=False)
    processor = LlavaProcessor(image_processor=tower.processor, tokenizer=tokenizer, patch_size=patch,
                               vision_feature_select_strategy="full", num_additional_image_tokens=0,
                               image_token=IMAGE.pad_token, chat_template=chat_template(cfg.template))
    processor.save_pretrained(str(out_dir))


def export_hf(export_dir: str | os.PathLike, out: str | os.PathLike, dtype: str | torch.dtype | None = None,
              kind: str | None = None) -> str:
    """Write the transformers export of `export_dir` at `out`; returns the kind written ("native" or
    "remote-code"). `kind` None picks native where LLaVA expresses the model, else remote-code; "native"
    refuses a model LLaVA cannot express, naming the setting."""
    check_export(export_dir)
    check_expressible(export_dir)        # pooled features, SigLIP2 NaFlex: refused for both kinds
    why = native_refusal(export_dir)
    if kind is None:
        kind = "remote-code" if why else "native"
    if kind == "native" and why:
        raise ExportError(why)
    if kind not in ("native", "remote-code"):
        raise UserError(f"unknown hf export kind {kind!r} (native or remote-code)")
    with publish_hf(out, export_dir) as tmp:
        if kind == "native":
            write_native(export_dir, tmp, dtype)
        else:
            write_remote_code(export_dir, tmp, dtype)
        _mark(tmp, export_dir, kind)
    return kind


def _mark(tmp: Path, export_dir, kind: str) -> None:
    """Record the source export in config.json (what lets a later export replace this directory)."""
    path = tmp / "config.json"
    config = _read_json(path)
    config[HF_MARKER] = dict(config.get(HF_MARKER) or {}, source=str(Path(export_dir).resolve()), kind=kind)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
