"""vlm_dist: train multi-image vision-language models (Qwen3 + SigLIP) with DeepSpeed."""
from setuptools import find_packages, setup

setup(
    name="vlm_dist",
    version="0.1.0",
    description="DeepSpeed training system for multi-image VLMs: Qwen3 + frozen SigLIP + Perceiver resampler",
    python_requires=">=3.10",
    packages=find_packages(include=["vlm_dist", "vlm_dist.*", "preprocess", "preprocess.*"]),
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.8",    # skips a non-finite step in every precision (bf16.check_grad_overflow, fp32 norm check)
        "transformers>=4.56",   # Qwen3 (>=4.51) and packed-sequence masks from position_ids
        "peft>=0.14",
        "bitsandbytes>=0.45",
        "pyarrow>=16",
        "pillow>=10",
        "av>=15",               # PyAV: video decoding for the video media kind (vlm_dist.contract.video); tested with 15.1.0
        "safetensors>=0.4",
        "pyyaml>=6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "pycocoevalcap>=1.2",   # BLEU and CIDEr for vlm-eval's caption report (pure-Python parts only)
        "pytest>=8",
    ],
    extras_require={
        "mpi": ["mpi4py>=3.1"],
        # fused RMSNorm/RoPE/SwiGLU for Qwen3 (Triton; --model.kernels=auto picks it up on CUDA)
        "gpu": ["liger-kernel>=0.8"],
        # vlm-serve (OpenAI-compatible API) and vlm-ui (Gradio upload chat, talks to vlm-serve)
        "serve": ["fastapi>=0.110", "uvicorn>=0.29", "openai>=1.40", "gradio>=6", "httpx>=0.27"],
        # the lmms-eval model plugin (vlm_dist.inference.lmms). It pulls torchvision: next to a CPU
        # torch, PyPI's (CUDA) torchvision cannot import; `make install` removes it again (see Makefile)
        "eval": ["lmms-eval>=0.7", "scikit-learn>=1.3", "filelock<4"],   # lmms-eval 0.7.3 imports filelock._api (gone in filelock 4)
        # what the test suite drives: the official openai client, a real browser through Selenium
        "test": ["openai>=1.40", "selenium>=4.20"],
    },
    entry_points={
        "console_scripts": [
            "vlm-cache=vlm_dist.cache.cli:main",
            "vlm-convert=vlm_dist.convert.cli:main",
            "vlm-generate=vlm_dist.inference.generate_cli:main",
            "vlm-eval=vlm_dist.inference.eval_cli:main",
            "vlm-train=vlm_dist.training.loop:main",
            "vlm-benchmark=vlm_dist.benchmark.cli:main",
            "vlm-export=vlm_dist.inference.export_cli:main",
            "vlm-serve=vlm_dist.serve.cli:main",
            "vlm-ui=vlm_dist.serve.ui:main",
        ],
        # lmms-eval finds `--model vlm_dist` here (its registry_v2 reads this entry-point group)
        "lmms_eval.models": ["vlm_dist=vlm_dist.inference.lmms:manifest"],
    },
)
