"""Training: the loop (loop.py, vlm-train), the DeepSpeed config (ds_config.py), optimizer and
schedule (optim.py), checkpoints and exports (checkpoint.py, run_record.py), logs (metrics.py)
and FLOPs / MFU (flops.py)."""
