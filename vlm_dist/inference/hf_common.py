"""What both kinds of transformers export share (vlm_dist.inference.export_hf: native LLaVA;
vlm_dist.inference.export_remote: custom code): the chat template, the LoRA-merged model, where the
output may go and how it is published and read back.

    with publish_hf(out, export_dir) as tmp:          # refuses a dangerous OUT (check_hf_target)
        vlm, tokenizer, tower, cfg = load_merged(export_dir, "bf16")
        ...write a transformers model, its processor and chat_template(cfg.template) into tmp...
    # tmp was read back (check_hf_dir) and swapped in atomically

It sits below both writers, so export_hf (which dispatches to export_remote) and export_remote
import it without an import circle.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch

from vlm_dist.contract.media import IMAGE
from vlm_dist.inference.export import (ExportError, check_output_location, load_export, publishing,
                                       resolve_path, _check_weights, _read_json)
from vlm_dist.model.vision import resolve_dtype
from vlm_dist.model.vlm import unwrap_llm

HF_MARKER = "vlm_dist_export"        # provenance in config.json (a model saved from the export keeps it)
HF_OUTPUT_MARKER = ".vlm_dist_hf_export"   # a file only vlm-export hf writes: what makes a directory replaceable
"""Key in an hf export's config.json naming its source export: what makes an OUT replaceable."""
PROCESSOR_FILES = ("processor_config.json", "tokenizer_config.json", "tokenizer.json")
"""What AutoProcessor reads (transformers 5 keeps the image processor inside processor_config.json)."""

_BLOCK = f"{IMAGE.start_token}{IMAGE.pad_token}{IMAGE.end_token}"
# Content: a string (a record's `<image>` placeholders become image blocks, as in training) or a
# list of parts, {"type": "image"} -> one block (the processor expands the pad), {"type": "text"}.
_CONTENT = (
    "{%- macro content(c) -%}"
    "{%- if c is string -%}{{ c | replace('" + IMAGE.placeholder + "', '" + _BLOCK + "') }}"
    "{%- else -%}{%- for p in c -%}"
    "{%- if p['type'] == 'image' -%}" + _BLOCK +
    "{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}")
TEMPLATES = {
    # Qwen3's turns; the generation prompt opens the assistant turn (PromptEncoder, chatml). Newlines are
    # written as '\\n' expressions: a literal one would be eaten by the `{%-` whitespace control.
    "chatml": _CONTENT + (
        "{%- for m in messages -%}"
        "{{ '<|im_start|>' + m['role'] + '\\n' }}{{ content(m['content']) }}{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"),
    # user/system turns end in "\\n", assistant turns in <|endoftext|>; no generation prompt (plain)
    "plain": _CONTENT + (
        "{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}"
        "{{ content(m['content']) }}{{ '<|endoftext|>' }}"
        "{%- else -%}{{ content(m['content']) }}{{ '\\n' }}{%- endif -%}{%- endfor -%}"),
}


def chat_template(template: str) -> str:
    """The Jinja chat template that renders conversations as training's `template` (chatml or plain) did."""
    if template not in TEMPLATES:
        raise ExportError(f"template {template!r}: no chat template for it (known: {', '.join(TEMPLATES)})")
    return TEMPLATES[template]


def load_merged(export_dir: str | os.PathLike, dtype: str | torch.dtype | None = None):
    """(vlm, tokenizer, tower, cfg): the export on the CPU with its LoRA merged (vlm.llm a plain
    *ForCausalLM), LLM and connector in `dtype` (default: the base LLM's own dtype, as merge_export
    saves), the vision tower in float32 (each writer casts it: export_remote to cfg.vision_dtype,
    the native writer to `dtype`, as transformers loads a model in one dtype).

    The merge runs in float32 (PEFT's merge_and_unload); QLoRA merges onto the unquantised base.
    """
    from transformers import AutoConfig

    vlm, tokenizer, tower, cfg = load_export(export_dir, "cpu", torch.float32, vision_dtype="float32")
    if hasattr(vlm.llm, "merge_and_unload"):
        vlm.llm = vlm.llm.merge_and_unload()
    if dtype is None:
        dtype = getattr(AutoConfig.from_pretrained(resolve_path(cfg.llm, export_dir)), "dtype", None) \
            or torch.float32
    dtype = resolve_dtype(dtype) if isinstance(dtype, str) else dtype
    vlm.to(dtype)
    unwrap_llm(vlm.llm).config.use_cache = True
    return vlm, tokenizer, tower, cfg


# -- where the output may go, and how it is published ----------------------------------------------

def _is_hf_output(path: Path) -> bool:
    """An earlier vlm-export hf output: it holds our marker file (a config key would not do: a model
    fine-tuned from the export and saved with save_pretrained keeps the config's keys)."""
    return (path / HF_OUTPUT_MARKER).is_file()


def check_hf_target(out: str | os.PathLike, export_dir: str | os.PathLike) -> None:
    """Refuse an OUT that is, contains or lies inside the export or its training run
    (check_output_location), or an existing non-empty directory that is not an earlier `vlm-export hf` output."""
    out = Path(out)
    check_output_location(export_dir, out, "hf output")
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise ExportError(f"hf output {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not _is_hf_output(out):
        raise ExportError(f"hf output {out} is a non-empty directory that is not an earlier vlm-export hf "
                          f"output (no {HF_OUTPUT_MARKER}); refusing to replace it. Choose a "
                          "new path")


def check_hf_dir(path: str | os.PathLike) -> dict:
    """Read back a transformers export: every JSON parses, every safetensors file opens with the size its
    header says (a truncated file is an ExportError naming it), the processor and tokenizer files exist.
    Returns config.json."""
    d = Path(path)
    config = _read_json(d / "config.json")
    for f in sorted(d.glob("*.json")):
        _read_json(f)
    _check_weights(d, "model")
    for name in PROCESSOR_FILES:
        if not (d / name).is_file():
            raise ExportError(f"{d / name}: missing (the processor and tokenizer are part of an hf export)")
    if not ((d / "chat_template.jinja").is_file() or "chat_template" in _read_json(d / "processor_config.json")
            or "chat_template" in _read_json(d / "tokenizer_config.json")):
        raise ExportError(f"{d}: no chat template (chat_template.jinja)")
    return config


@contextmanager
def publish_hf(out: str | os.PathLike, export_dir: str | os.PathLike):
    """`with publish_hf(out, export) as tmp:` write the model into `tmp` (beside `out`); it is then read
    back (check_hf_dir) and swapped in by two renames, as export.publishing does for exports. A failed
    write or check removes `tmp` and leaves `out` as it was."""
    out = Path(out)
    check_hf_target(out, export_dir)
    with publishing(out, check=check_hf_dir, replaceable=lambda p: _is_hf_output(p) or not any(p.iterdir()),
                    kind="an earlier vlm-export hf output") as tmp:
        yield tmp
        (tmp / HF_OUTPUT_MARKER).write_text("written by vlm-export hf; its next run may replace this directory\n")
