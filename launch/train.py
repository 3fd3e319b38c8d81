"""Train the VLM on cached vision features with DeepSpeed ZeRO-2/3 (the loop is vlm_dist.training.loop).

    deepspeed launch/train.py --deepspeed ds_configs/zero2.json \
        --config launch/configs/stage1_align.yaml [--section.key=value ...]
    torchrun --nproc-per-node 8 launch/train.py --config ...     # also srun and mpirun
    python launch/train.py --help                                 # every run-config key

Needs the package installed (`make install`, i.e. `pip install -e .`); `vlm-train`
is the same command.
"""
import sys

from vlm_dist.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
