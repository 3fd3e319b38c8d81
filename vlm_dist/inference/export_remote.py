"""The transformers custom-code export: what `vlm-export hf` writes for a connector LLaVA cannot express.

    write_remote_code("runs/sft/export", tmp_dir)      # export_hf.export_hf calls it, then publishes

    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)   # or AutoModel
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)

LLaVA's projector is Linear-GELU-Linear; vlm_dist's connector may put a LayerNorm and a Perceiver
resampler before it. The export is a LLaVA model with the projector swapped for the connector
(the classes in vlm_dist/inference/remote_code/, copied into the export by `save_pretrained`
after `register_for_auto_class`; transformers runs them with `trust_remote_code=True`):

    config.json                 VlmDistConfig: LLaVA's keys (SigLIP vision_config, Qwen3 text_config,
                                image_token_index = <|image_pad|>, image_seq_length = tokens per image,
                                vision_feature_layer, vision_feature_select_strategy="full") +
                                connector_config + vision_dtype; auto_map and architectures
    model.safetensors           model.vision_tower.*, model.multi_modal_projector.* (the connector's own
                                parameter names), model.language_model.* (LoRA merged), lm_head.weight
    generation_config.json      the LLM's, stopping at <|im_end|> and <|endoftext|> like vlm-generate
    processor_config.json, preprocessor_config.json, tokenizer files, chat_template.jinja
    configuration_vlm_dist.py, modeling_vlm_dist.py, processing_vlm_dist.py

The processor expands each image's `<|image_pad|>` to exactly `num_media_tokens` of them inside
`<|vision_start|>…<|vision_end|>`, as training did, and decodes image files as the training cache
did (JPEG draft size cfg.jpeg_draft_to, EXIF rotation, alpha on white). Features are the tower's
hidden_states[feature_layer] (no post-layernorm), computed in the dtype the training cache was
(cfg.vision_dtype: the tower keeps it whatever dtype the model is loaded in). What the export cannot
express is refused, naming the setting: cached features pooled 2x2 (`pool`), SigLIP2 NaFlex towers,
and a tiled or video model (its blocks have no stock class; the export directory itself carries them).
tests/test_export_remote.py checks greedy tokens and logits against vlm-generate.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from vlm_dist.contract.media import IMAGE, token_id
from vlm_dist.inference.export import EXPORT_CONFIG, ExportConfig, ExportError, read_export_config, resolve_path
from vlm_dist.inference.generate import STOP_TOKENS
from vlm_dist.inference.remote_code.configuration_vlm_dist import VlmDistConfig
from vlm_dist.inference.remote_code.modeling_vlm_dist import VlmDistForConditionalGeneration
from vlm_dist.inference.remote_code.processing_vlm_dist import VlmDistProcessor
from vlm_dist.model.vision import dtype_name, resolve_dtype
from vlm_dist.model.vlm import unwrap_llm

SIGLIP_TYPES = ("siglip", "siglip_vision_model")


def check_expressible(export_dir: str | os.PathLike) -> ExportConfig:
    """The export's config; ExportError naming the setting when the custom-code model would compute
    other features than training did. Reads config files only (runs before any weight is loaded)."""
    from transformers import AutoConfig

    cfg = read_export_config(export_dir)
    where = Path(export_dir) / EXPORT_CONFIG
    media = [m for m, on in (("tiled images (tiling: AnyRes thumbnail + tiles with row separators)",
                              cfg.tiling is not None),
                             ("video (a video connector, frames with timestamps)", cfg.video is not None)) if on]
    if media:
        raise ExportError(f"{where}: this model was trained with {' and '.join(media)}; no transformers "
                          "class has this layout (LlavaNext learns an image_newline vector and unpads "
                          "its tiles) and the custom-code export carries untiled images only, so "
                          "`vlm-export hf` refuses it (--native and --remote-code alike). Use the export "
                          "directory itself, or `vlm-export merge`: vlm-generate, vlm-serve and the "
                          "lmms-eval model (--model vlm_dist) load it with tiles and video")
    if cfg.pool != 1:
        raise ExportError(f"{where}: pool={cfg.pool} (the training features were average-pooled "
                          f"{cfg.pool}x{cfg.pool} over the patch grid): the transformers export does not "
                          "implement feature pooling; only an export trained on pool=1 features exports")
    model_type = AutoConfig.from_pretrained(resolve_path(cfg.vision, export_dir)).model_type
    if model_type not in SIGLIP_TYPES:
        raise ExportError(f"{where}: vision={cfg.vision!r} has model_type {model_type!r}; the transformers "
                          f"export supports fixed-resolution SigLIP ({', '.join(SIGLIP_TYPES)}) only"
                          + (" (SigLIP2 NaFlex keeps each image's aspect ratio, with a variable number "
                             "of patches)" if model_type.startswith("siglip2") else ""))
    return cfg


def write_remote_code(export_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      dtype: str | torch.dtype | None = None) -> None:
    """Fill the existing empty directory `out_dir` with the custom-code export of `export_dir`.

    `dtype`: the LLM and connector weights' dtype (export_hf.load_merged's default when None);
    the vision tower is saved in cfg.vision_dtype. The caller publishes `out_dir`.
    """
    from vlm_dist.inference.hf_common import chat_template, load_merged

    out = Path(out_dir)
    if not out.is_dir() or any(out.iterdir()):
        raise ExportError(f"{out}: write_remote_code fills an existing empty directory")
    check_expressible(export_dir)
    vlm, tokenizer, tower, cfg = load_merged(export_dir, dtype)
    save_remote_code(vlm, tokenizer, tower, cfg, export_dir, out_dir, chat_template(cfg.template))


def vision_model(cfg: ExportConfig, export_dir: str | os.PathLike):
    """The export's SigLIP vision model, all layers, without the pooling head (no feature uses it),
    in the dtype the training features were computed in (what VisionTower.from_pretrained loads)."""
    from transformers import SiglipVisionModel
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # a full SigLIP checkpoint's text weights are "unexpected": expected
    try:
        model = SiglipVisionModel.from_pretrained(resolve_path(cfg.vision, export_dir), dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.config.vision_use_head = False
    model.head, model.use_head = None, False
    return model.to(resolve_dtype(cfg.vision_dtype or "bfloat16"))


def remote_config(vlm, tokenizer, vision, cfg: ExportConfig) -> VlmDistConfig:
    """The VlmDistConfig of a loaded, merged VLM (LLaVA's keys + the connector's)."""
    llm = unwrap_llm(vlm.llm)
    connector = vlm.connectors[IMAGE.name]
    return VlmDistConfig(
        vision_config=vision.config.to_dict(), text_config=llm.config.to_dict(),
        image_token_index=token_id(tokenizer, IMAGE.pad_token),
        image_seq_length=vlm.num_tokens[IMAGE.name],
        vision_feature_layer=cfg.feature_layer, vision_feature_select_strategy="full",
        projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=bool(llm.config.tie_word_embeddings),
        connector_config=dict(connector.config),
        vision_dtype=dtype_name(resolve_dtype(cfg.vision_dtype or "bfloat16")))


def remote_state_dict(vlm, vision) -> dict[str, torch.Tensor]:
    """Our modules' weights under LlavaForConditionalGeneration's key names (transformers >= 4.52)."""
    llm = unwrap_llm(vlm.llm)
    state = {f"model.vision_tower.{k}": v for k, v in vision.state_dict().items()}
    state.update({f"model.multi_modal_projector.{k}": v
                  for k, v in vlm.connectors[IMAGE.name].state_dict().items()})
    for k, v in llm.state_dict().items():      # Qwen3ForCausalLM: model.* and lm_head.weight
        state["model.language_model." + k.removeprefix("model.") if k.startswith("model.") else k] = v
    return state


def save_remote_code(vlm, tokenizer, tower, cfg: ExportConfig, export_dir: str | os.PathLike,
                     out_dir: str | os.PathLike, template: str) -> None:
    """Write the custom-code model, processor and code files of a loaded, LoRA-merged VLM."""
    if hasattr(vlm.llm, "peft_config"):
        raise ExportError(f"{export_dir}: the LLM still has a LoRA adapter; merge it first (load_merged)")
    out = Path(out_dir)
    vision = vision_model(cfg, export_dir)
    config = remote_config(vlm, tokenizer, vision, cfg)
    with torch.device("meta"):      # no second copy of the weights: the loaded tensors are assigned
        model = VlmDistForConditionalGeneration(config)
    state = remote_state_dict(vlm, vision)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not _tied(model, k)]
    if missing or unexpected:   # a mapping bug, not a user's mistake
        raise RuntimeError(f"export key mapping: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.generation_config = _generation_config(vlm, tokenizer)
    VlmDistConfig.register_for_auto_class()
    VlmDistForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    model.config.auto_map = {"AutoModel": f"modeling_vlm_dist.{VlmDistForConditionalGeneration.__name__}"}
    model.save_pretrained(str(out))        # + AutoConfig, AutoModelForImageTextToText, the code files

    processor = VlmDistProcessor(image_processor=tower.processor, tokenizer=tokenizer,
                                 num_image_tokens=vlm.num_tokens[IMAGE.name], jpeg_draft_to=cfg.jpeg_draft_to,
                                 chat_template=template)
    VlmDistProcessor.register_for_auto_class()
    processor.save_pretrained(str(out))


def _tied(model, key: str) -> bool:
    return key == "lm_head.weight" and model.config.tie_word_embeddings


def _generation_config(vlm, tokenizer):
    """The LLM's generation config, stopping where vlm-generate stops."""
    import copy
    gen = copy.deepcopy(unwrap_llm(vlm.llm).generation_config)
    gen.eos_token_id = [token_id(tokenizer, t) for t in STOP_TOKENS]
    gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else gen.eos_token_id[-1]
    return gen
