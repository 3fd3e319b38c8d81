"""Shared fixtures: tiny Qwen3 / SigLIP / tokenizer built once per session, locally."""
import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    from vlm_dist.testing.tiny import build_tiny_models
    return build_tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tokenizer(tiny_models):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_models["tokenizer"])


def real_photo_paths() -> list[str]:
    """Real photographs that ship with installed dependencies (nothing is downloaded):
    matplotlib's grace_hopper.jpg (512x600) and scikit-learn's china.jpg and flower.jpg (640x427;
    scikit-learn comes with the [eval] extra)."""
    from pathlib import Path

    import matplotlib
    paths = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    try:
        import sklearn.datasets
        images = Path(sklearn.datasets.__file__).parent / "images"
        paths += [images / "china.jpg", images / "flower.jpg"]
    except ImportError:
        pass
    return [str(p) for p in paths if p.is_file()]


@pytest.fixture(scope="session")
def real_photos():
    """At least two real photos (paths); fails loudly if the dependencies that carry them are missing."""
    paths = real_photo_paths()
    assert len(paths) >= 2, f"real photos not found (matplotlib + scikit-learn): {paths}"
    return paths


@pytest.fixture(scope="session")
def tiny_export(tiny_models, tmp_path_factory):
    """A LoRA + Perceiver-resampler export (4 tokens per image, chatml) of the tiny models."""
    from vlm_dist.testing.tiny import build_tiny_export
    return build_tiny_export(tmp_path_factory.mktemp("tiny_export") / "export", tiny_models)


@pytest.fixture(scope="session")
def tiny_export_mlp(tiny_models, tmp_path_factory):
    """A LoRA + plain-MLP-connector export without LayerNorm (LLaVA's projector: 16 tokens per image)."""
    from vlm_dist.testing.tiny import build_tiny_export
    return build_tiny_export(tmp_path_factory.mktemp("tiny_export_mlp") / "export", tiny_models,
                             connector="mlp", use_layernorm=False)
