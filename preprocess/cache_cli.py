"""Entry point of the feature cache builder (the code is vlm_dist.cache).

    vlm-cache build --records R.jsonl --image-root IMAGES --vision-model M --out CACHE
    torchrun --nproc-per-node 8 -m preprocess.cache_cli build ...    # one slice per GPU
    vlm-cache build ... --tiling '{"grids": [[2,2]], "tokens_per_tile": 64}' --frames 8 --max-fps 2
                                      # AnyRes tiles per image; records' `videos` sampled into frames
"""
import sys

from vlm_dist.cache.cli import main

if __name__ == "__main__":
    sys.exit(main())
