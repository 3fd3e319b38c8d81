"""`vlm-export`: take a trained export out of vlm_dist's own format.

    vlm-export merge EXPORT OUT [--dtype bf16]     LoRA merged into the LLM; loads in vlm-generate/eval/serve
    vlm-export hf EXPORT OUT [--dtype bf16] [--native | --remote-code]
                                                   a transformers model directory: LlavaForConditionalGeneration
                                                   (no custom code) for the MLP connector without LayerNorm,
                                                   else a custom-code model (trust_remote_code=True);
                                                   a model trained with tiles or video is refused (no
                                                   transformers class has its layout: use the export
                                                   itself, or merge, with vlm-generate/vlm-serve/lmms-eval)

OUT must lie outside the export and its training run, and be new, empty or an earlier output of the
same command; it is built beside OUT, read back, then swapped in. Mistakes are one line on stderr.
"""
from __future__ import annotations

import argparse

from vlm_dist.errors import run_cli
from vlm_dist.model.vision import DTYPES


def main(argv: list[str] | None = None) -> int:
    return run_cli("vlm-export", lambda: _main(argv))


def _main(argv: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog="vlm-export", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="merge the LoRA adapter into the LLM: one directory vlm-generate, "
                       "vlm-eval and vlm-serve load")
    h = sub.add_parser("hf", help="a transformers model directory (LLaVA, or custom code for the resampler)")
    for s in (m, h):
        s.add_argument("export_dir")
        s.add_argument("out_dir", help="a new path outside the export's run (or an earlier output)")
        s.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="dtype of the saved weights "
                       "(default: the base LLM's)")
    kind = h.add_mutually_exclusive_group()
    kind.add_argument("--native", dest="kind", action="store_const", const="native",
                      help="LlavaForConditionalGeneration only (refused, naming the setting, when LLaVA "
                      "cannot express the model)")
    kind.add_argument("--remote-code", dest="kind", action="store_const", const="remote-code",
                      help="the custom-code model even where LLaVA could express it")
    args = p.parse_args(argv)
    if args.command == "merge":
        from vlm_dist.inference.export import merge_export
        out = merge_export(args.export_dir, args.out_dir, args.dtype)
        print(f"merged export written to {out}")
    else:
        from vlm_dist.inference.export_hf import export_hf
        kind = export_hf(args.export_dir, args.out_dir, args.dtype, kind=args.kind)
        print(f"{kind} transformers export written to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
