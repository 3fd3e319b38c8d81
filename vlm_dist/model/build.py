"""Building the VLM: load Qwen3 in a mode, attach connectors, decide what trains.

LLM modes:
- frozen: no LLM weight trains (stage 1).
- lora:   PEFT LoRA adapters on the attention and MLP projections.
- qlora:  NF4 4-bit base weights (double quantisation, bf16 compute, storage in
          bf16 so ZeRO-3 can partition them) + LoRA adapters.
- full:   every LLM weight trains.

`set_trainable` is the one place that decides the trainable set;
`trainable_table` prints it at start. `load_llm` also applies --model.kernels (Liger's fused
Qwen3 kernels, before PEFT; `resolve_fused_ce` decides Liger's fused cross-entropy for the VLM)
and checkpoints --model.checkpoint_fraction of the decoder layers.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
from torch import nn

from vlm_dist.config.schema import ADAPTER_MODES, LLM_MODES, ConfigError, LoraConfig
from vlm_dist.model.attention import hf_name, resolve
from vlm_dist.model.connector import Connector
from vlm_dist.model.vlm import VisionLanguageModel, media_pad_ids, unwrap_llm

CONNECTOR_FILE, CONNECTOR_CONFIG = "connector.safetensors", "connector_config.json"


def load_llm(name_or_path: str, mode: str = "frozen", dtype: torch.dtype = torch.bfloat16,
             attn_implementation: str = "sdpa", lora: LoraConfig | None = None,
             adapter: str | None = None, gradient_checkpointing: bool = False,
             weights: dict[str, torch.Tensor] | None = None, checkpoint_fraction: float = 1.0,
             kernels: str = "none") -> nn.Module:
    """Qwen3 causal LM in the given mode; `lora` is the run config's section (defaults: LoraConfig());
    `adapter` resumes LoRA weights from a PEFT directory. `weights` (the benchmark's random weights,
    already on their device) replace the checkpoint files: `name_or_path` then needs only config.json.
    `checkpoint_fraction` of the decoder layers recompute with `gradient_checkpointing`; `kernels`
    is --model.kernels (auto, liger, none; see resolve_kernels)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM

    if mode not in LLM_MODES:
        raise ValueError(f"model.llm_mode must be one of {LLM_MODES}, got {mode!r}")
    impl = resolve(attn_implementation, "cuda" if torch.cuda.is_available() else "cpu")
    kwargs = dict(dtype=dtype, attn_implementation=hf_name(impl))
    if mode == "qlora":
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
    if weights is None:
        llm = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    else:   # the Auto class needs a path; the model's own class takes a config and a state dict
        config = AutoConfig.from_pretrained(name_or_path)
        llm = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].from_pretrained(
            None, config=config, state_dict=weights, device_map={"": next(iter(weights.values())).device},
            **kwargs)   # device_map: the weights stay on the device they were made on
    llm.config.use_cache = False
    apply_kernels(llm, resolve_kernels(kernels)[0], name_or_path)   # before PEFT: see apply_kernels
    if gradient_checkpointing:
        enable_checkpointing(llm, checkpoint_fraction)
    if mode in ADAPTER_MODES:
        from peft import LoraConfig as PeftLoraConfig, PeftModel, get_peft_model
        if adapter is not None:
            llm = PeftModel.from_pretrained(llm, adapter, is_trainable=True)
        else:
            lora = lora or LoraConfig()
            llm = get_peft_model(llm, PeftLoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                target_modules=list(lora.target_modules), bias="none", task_type="CAUSAL_LM"))
    return llm


def resolve_kernels(kernels: str) -> tuple[str, str]:
    """--model.kernels -> ("liger" | "none", why), for load_llm and the start-up log.

    auto picks liger when CUDA is there and liger-kernel imports (Triton kernels: GPU only), else none;
    an explicit liger that cannot run is a ConfigError rather than a silent fallback.
    """
    if kernels == "none":
        return "none", "--model.kernels=none"
    if kernels not in ("auto", "liger"):
        raise ConfigError(f"--model.kernels={kernels}: must be auto, liger or none")
    if not torch.cuda.is_available():
        if kernels == "liger":
            raise ConfigError("--model.kernels=liger needs a CUDA GPU (Liger's kernels are Triton): "
                              "use --model.kernels=none or auto")
        return "none", "--model.kernels=auto: no CUDA"
    try:
        importlib.import_module("liger_kernel.transformers")   # needs triton; fails without it
    except ImportError as e:
        if kernels == "liger":
            raise ConfigError(f"--model.kernels=liger needs liger-kernel ({e}): pip install '.[gpu]', "
                              "or use --model.kernels=none") from e
        return "none", f"--model.kernels=auto: liger-kernel does not import ({e})"
    return "liger", f"--model.kernels={kernels}"


def resolve_fused_ce(kernels: str, zero_stage: int | None) -> tuple[bool, str]:
    """(use Liger's fused linear cross-entropy, why), from resolved kernels and the ZeRO stage.

    `kernels` is resolve_kernels' answer ("liger" | "none"). Liger's loss takes `lm_head.weight` as a
    tensor: under ZeRO-3 that is an empty partition (the module's gather hook never fires), so stage 3
    keeps the checkpointed chunks; `zero_stage` None (a caller that does not know it) keeps them too.
    """
    if kernels != "liger":
        return False, f"chunked lm_head/cross-entropy: kernels={kernels}"
    if zero_stage is None:
        return False, "chunked lm_head/cross-entropy: ZeRO stage not given"
    if zero_stage >= 3:
        return False, (f"chunked lm_head/cross-entropy: ZeRO-{zero_stage} partitions lm_head.weight and "
                       "Liger's fused loss takes the weight tensor, bypassing the gather")
    return True, f"Liger fused linear cross-entropy: kernels=liger, ZeRO-{zero_stage}"


def apply_kernels(llm: nn.Module, kernels: str, name_or_path: str = "") -> None:
    """Swap Liger's fused RMSNorm, RoPE and SwiGLU into a loaded Qwen3 (kernels="liger"; "none": nothing).

    On the instance and before PEFT wraps it: Liger finds the decoder layers through the model's
    base_model_prefix, which a PeftModel hides, and its SwiGLU forward calls the same gate/up/down
    Linear children that LoRA then wraps. Liger's cross-entropy stays off: the loss is vlm.py's,
    computed at supervised positions only. Note Liger also patches transformers' qwen3 module
    (RoPE function, RMSNorm/MLP classes) for Qwen3 models built later in this process.
    """
    if kernels == "none":
        return
    model_type = llm.config.model_type
    if model_type != "qwen3":
        raise ConfigError(f"--model.kernels=liger patches Qwen3 models; {name_or_path or 'the LLM'} is "
                          f"{model_type!r}: use --model.kernels=none")
    from liger_kernel.transformers import apply_liger_kernel_to_qwen3
    apply_liger_kernel_to_qwen3(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                fused_linear_cross_entropy=False, model=llm)


def checkpointed_layers(num_layers: int, fraction: float) -> list[int]:
    """Indices of the decoder layers that recompute: round(fraction x num_layers) of them (at least
    one), spread evenly from layer 0 (0.5 -> 0, 2, 4, ...), as transformers' every_n_layers does."""
    k = min(num_layers, max(1, round(fraction * num_layers)))
    return sorted({j * num_layers // k for j in range(k)})


def enable_checkpointing(llm: nn.Module, fraction: float = 1.0) -> None:
    """Activation checkpointing on checkpointed_layers(…, fraction) of the decoder layers.

    transformers turns it on for every GradientCheckpointingLayer; the flag is per layer, so the
    layers left out keep their activations (memory spent where it buys speed).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    layers = [m for m in llm.modules() if isinstance(m, GradientCheckpointingLayer)]
    keep = set(checkpointed_layers(len(layers), fraction))
    for i, layer in enumerate(layers):
        layer.gradient_checkpointing = i in keep


def build_vlm(llm: nn.Module, tokenizer, vision_dim: int, num_patches: int,
              connector: dict | None = None, dtype: torch.dtype = torch.bfloat16,
              fused_ce: bool = False, video_tokens_per_frame: int | None = None) -> VisionLanguageModel:
    """Attach a fresh image connector (kwargs of Connector) to a loaded LLM. `fused_ce`: Liger's
    fused lm_head + cross-entropy in the forward (decide it with resolve_fused_ce).

    `video_tokens_per_frame`: also a video connector (the image connector's architecture with
    that many latents, initialised from the image connector: `init_video_connector`), so each
    sampled frame becomes that many <|video_pad|> tokens. None: no video (a <video> slot is
    then a SpliceError)."""
    llm_dim = unwrap_llm(llm).config.hidden_size
    conn = Connector(vision_dim=vision_dim, llm_dim=llm_dim, **(connector or {})).to(dtype)
    connectors, num_tokens = {"image": conn}, {"image": conn.num_tokens(num_patches)}
    if video_tokens_per_frame is not None:
        vconn = Connector(**video_connector_config(conn.config, video_tokens_per_frame, num_patches)).to(dtype)
        init_video_connector(vconn, conn)
        connectors["video"], num_tokens["video"] = vconn, vconn.num_tokens(num_patches)
    return VisionLanguageModel(llm, connectors, media_pad_ids(tokenizer), num_tokens, fused_ce=fused_ce)


def video_connector_config(image_config: dict, tokens_per_frame: int, num_patches: int) -> dict:
    """The video connector's Connector kwargs: the image connector's, with tokens_per_frame latents.

    With the MLP connector (one token per patch) a frame costs num_patches tokens: reduce them
    with the cache's `pool`, and tokens_per_frame must say that number."""
    cfg = dict(image_config)
    if cfg["kind"] == "mlp":
        if tokens_per_frame != num_patches:
            raise ValueError(f"model.video.tokens_per_frame={tokens_per_frame}: the mlp connector makes "
                             f"one token per patch ({num_patches} with this cache's pooling); set it to "
                             f"{num_patches}, raise the cache's --pool, or use the resampler")
    else:
        cfg["num_latents"] = tokens_per_frame
    return cfg


@torch.no_grad()
def init_video_connector(video: Connector, image: Connector) -> None:
    """Start the video connector from the image connector's weights (frames are images to the
    tower): every tensor copied; the resampler's latents are the image's first tokens_per_frame
    (cycled when there are more frames' tokens than image latents)."""
    src = image.state_dict()
    for name, t in video.state_dict().items():
        s = src[name]
        if name.endswith("resampler.latents") and s.shape != t.shape:
            idx = torch.arange(t.shape[0]) % s.shape[0]
            s = s[idx]
        t.copy_(s.to(t.dtype))


def set_trainable(vlm: VisionLanguageModel, llm_mode: str, train_connector: bool = True) -> None:
    """The one place that decides which parameters train."""
    if llm_mode not in LLM_MODES:
        raise ValueError(f"model.llm_mode must be one of {LLM_MODES}, got {llm_mode!r}")
    for p in vlm.connectors.parameters():
        p.requires_grad_(train_connector)
    for name, p in vlm.llm.named_parameters():
        if llm_mode == "full":
            p.requires_grad_(p.is_floating_point())
        elif llm_mode in ADAPTER_MODES:
            p.requires_grad_("lora_" in name)
        else:
            p.requires_grad_(False)


def trainable_table(vlm: nn.Module) -> str:
    """Module | parameters | trainable, grouped at a readable depth."""
    rows: dict[str, list[int]] = {}
    for name, p in vlm.named_parameters():
        parts = name.split(".")
        if parts[0] == "connectors":
            key = ".".join(parts[:3])
        else:
            key = "llm.lora" if "lora_" in name else "llm." + ("lm_head" if "lm_head" in name else
                                                              "embed_tokens" if "embed_tokens" in name
                                                              else "layers" if ".layers." in name else "norm")
        n = _numel(p)
        r = rows.setdefault(key, [0, 0])
        r[0] += n
        r[1] += n if p.requires_grad else 0
    width = max(len(k) for k in rows) + 2
    lines = [f"{'module':<{width}}{'parameters':>16}{'trainable':>16}"]
    for k, (n, t) in rows.items():
        lines.append(f"{k:<{width}}{n:>16,}{t:>16,}")
    tot, tr = sum(r[0] for r in rows.values()), sum(r[1] for r in rows.values())
    lines.append(f"{'total':<{width}}{tot:>16,}{tr:>16,}  ({100 * tr / max(tot, 1):.3f}% trainable)")
    return "\n".join(lines)


def _numel(p: torch.Tensor) -> int:
    # ZeRO-3 partitions parameters (ds_numel is the full size); bitsandbytes packs
    # 4-bit weights two to a byte (quant_state.shape is the logical shape)
    if hasattr(p, "ds_numel"):
        return p.ds_numel
    quant_state = getattr(p, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else p.numel()


# -- export / import of the trainable connector --------------------------------
def save_connectors(vlm: VisionLanguageModel, out_dir: str | Path, state: dict | None = None) -> None:
    """Write connector.safetensors (+ its config). `state` overrides (e.g. ZeRO-3 gathered)."""
    from safetensors.torch import save_file
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state is None:
        state = {k: v for k, v in vlm.connectors.state_dict().items()}
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / CONNECTOR_FILE))
    cfg = {name: dict(c.config, num_tokens=vlm.num_tokens[name]) for name, c in vlm.connectors.items()}
    (out / CONNECTOR_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))


def load_connectors(vlm: VisionLanguageModel, export_dir: str | Path, log=None) -> None:
    """Load connector weights written by save_connectors; shapes must match exactly.

    A video connector the export has no weights for (a stage-1 export trained on images only)
    starts from the loaded image connector (`init_video_connector`), said through `log`."""
    from safetensors.torch import load_file
    path = Path(export_dir) / CONNECTOR_FILE
    if not path.exists():
        raise FileNotFoundError(f"no {CONNECTOR_FILE} in {export_dir} (expected a vlm_dist export)")
    state = load_file(str(path))
    missing, unexpected = vlm.connectors.load_state_dict(state, strict=False)
    if "video" in vlm.connectors and missing and all(k.startswith("video.") for k in missing) \
            and not any(k.startswith("video.") for k in state):
        init_video_connector(vlm.connectors["video"], vlm.connectors["image"])
        (log or print)(f"[model] {path} has no video connector: it starts from the image connector")
        missing = []
    if missing or unexpected:
        raise ValueError(f"{path}: connector weights do not match the configured connector "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")


def read_connector_config(export_dir: str | Path) -> dict:
    return json.loads((Path(export_dir) / CONNECTOR_CONFIG).read_text())

