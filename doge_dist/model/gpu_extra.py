"""The ``[gpu]`` extra's kernels (flash-attn, transformer-engine) are optional: a setting that needs
one is checked before any work starts, with what to install or choose instead."""
import importlib.util

import torch

from ..config import ConfigError

# flash-attn is published as source whose setup.py imports torch: pip's isolated build has no torch and fails
# (Dao-AILab/flash-attention#1675), so the extra is installed without build isolation, after `pip install -e .`
INSTALL_GPU_EXTRA = "pip install --no-build-isolation -e '.[gpu]'"


def require_gpu_package(module: str, setting: str, package: str, instead: str) -> None:
    """``setting`` (e.g. "model.attn_backend = 'flash'") needs ``module`` importable and CUDA."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{setting} needs {package}: {INSTALL_GPU_EXTRA} (CUDA; after pip install -e .), or {instead}.")
    if not torch.cuda.is_available():
        raise ConfigError(f"{setting} runs on CUDA only: {instead}.")
