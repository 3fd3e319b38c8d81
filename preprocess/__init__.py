"""The offline job's entry points: `python -m preprocess.cache_cli` (vlm-cache) and
`python -m preprocess.convert` (vlm-convert). The code is in vlm_dist.cache and vlm_dist.convert."""
