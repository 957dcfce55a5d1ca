"""Shared fixtures: deterministic CPU torch, and real photos shipped inside scikit-image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import settings

import navit_dense.tasks  # noqa: F401  (registers the built-in tasks, as the tools do)

# Tests check correctness, not speed: tiny models run fastest on one intra-op thread, and a
# second one stalls badly when the 2-core machine is shared (measured 5-60x slower steps).
torch.set_num_threads(1)
settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ci")

def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one; tools/gpu_check.sh runs them)")


# Real CC0 / public-domain photos of very different aspect ratios.
PHOTO_NAMES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "text.png", "hubble_deep_field.jpg")


ROOT = Path(__file__).resolve().parents[1]


def perturbed(model, seed: int = 1):
    """``model`` in eval mode with N(0, 0.02) noise on every parameter, so zero biases, unit
    norms or tiny LayerScales cannot hide a weight-mapping error."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def timm_weight_file(name: str, kwargs: dict, folder: Path):
    """(perturbed random-init timm model ``name``, its state dict saved as folder/model.safetensors)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vit = perturbed(timm.create_model(name, pretrained=False, **kwargs))
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return vit, path


def load_tool(name: str):
    """Import tools/<name>.py as a module (the CLIs are scripts, not package modules)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def collate_detection(samples, patch_size: int = 16, max_tokens_per_image: int = 256, seq_len: int = 1024, **pack_kwargs):
    """What the detection task's collate does, without a config: each image's budget scaled by
    its budget_scale^2 (capped at one sequence), packed, plus the normalized targets."""
    from navit_dense.data import pack_images
    from navit_dense.data.detection import detection_targets
    from navit_dense.data.resize import scale_budgets

    room = seq_len - pack_kwargs.get("num_prefix_tokens", 0)
    budgets = scale_budgets([max_tokens_per_image] * len(samples), [s.budget_scale for s in samples], room)
    batch = pack_images([s.image for s in samples], patch_size, max_tokens_per_image, seq_len, max_tokens=budgets, **pack_kwargs)
    return batch, detection_targets(samples)


def skimage_data_dir() -> Path:
    import skimage.data

    return Path(skimage.data.__file__).parent


def load_photo(name: str) -> torch.Tensor:
    """float CHW RGB in [0, 1]; grayscale photos are repeated to 3 channels."""
    from PIL import Image

    array = np.asarray(Image.open(skimage_data_dir() / name).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


@pytest.fixture(scope="session")
def photos() -> list[torch.Tensor]:
    return [load_photo(n) for n in PHOTO_NAMES]
