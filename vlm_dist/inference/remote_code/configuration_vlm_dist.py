"""Configuration of a vlm_dist model exported for transformers (custom code, `trust_remote_code=True`).

A LLaVA configuration (SigLIP `vision_config`, Qwen3 `text_config`, `image_token_index`,
`image_seq_length`, `vision_feature_layer`, `vision_feature_select_strategy="full"`) plus what
LLaVA cannot express: the connector (`connector_config`: LayerNorm? -> Perceiver resampler? ->
2-layer GELU MLP, as vlm_dist.model.connector builds it) and the dtype the vision tower ran in
when the training features were cached (`vision_dtype`).
"""
from huggingface_hub.dataclasses import strict
from transformers.models.llava.configuration_llava import LlavaConfig

CONNECTOR_KEYS = ("vision_dim", "llm_dim", "kind", "num_latents", "depth", "heads", "resampler_dim",
                  "use_layernorm")


@strict
class VlmDistConfig(LlavaConfig):
    model_type = "vlm_dist"

    connector_config: dict | None = None
    """The connector's constructor arguments (vlm_dist's connector_config.json, image entry)."""
    vision_dtype: str = "bfloat16"
    """dtype the vision tower runs in: the one the training feature cache was built in."""

    def validate_architecture(self):
        """Part of `@strict` validation: what this model's code can compute."""
        super().validate_architecture()
        if self.connector_config is None:
            return
        missing = [k for k in CONNECTOR_KEYS if k not in self.connector_config]
        if missing:
            raise ValueError(f"connector_config is missing {missing}")
        if self.connector_config["kind"] not in ("resampler", "mlp"):
            raise ValueError(f"connector_config.kind must be 'resampler' or 'mlp', got "
                             f"{self.connector_config['kind']!r}")
        if self.vision_feature_select_strategy != "full":
            raise ValueError("vision_feature_select_strategy must be 'full' (SigLIP has no CLS token)")
        if not isinstance(self.vision_feature_layer, int):
            raise ValueError("vision_feature_layer must be one layer index")


__all__ = ["VlmDistConfig"]
