"""Entry point of the dataset converters (the code is vlm_dist.convert).

    vlm-convert llava-pretrain --input blip_laion_cc_sbu_558k.json --out records.jsonl --image-root images
    python -m preprocess.convert check --records records.jsonl --tokenizer Qwen/Qwen3-8B-Base ...
"""
import sys

from vlm_dist.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
