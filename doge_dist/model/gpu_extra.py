"""The ``[gpu]`` extra's kernels (flash-attn, transformer-engine) are optional: a setting that needs
one is checked before any work starts, with what to install or choose instead. They compute CUDA
tensors only: a model configured for them (a GPU run's checkpoint keeps its config) computes other
tensors (CPU generation, export, tests) through the default path."""
import importlib.util

import torch

from ..config import ConfigError

# flash-attn is published as source whose setup.py imports torch: pip's isolated build has no torch and fails
# (Dao-AILab/flash-attention#1675), so the extra is installed without build isolation, after `pip install -e .`
INSTALL_GPU_EXTRA = "pip install --no-build-isolation -e '.[gpu]'"
KERNEL_DEVICE_TYPES = {"cuda"}  # where the kernels run (the tests of their glue add "cpu" beside a stand-in kernel)


def runs_gpu_kernel(device: torch.device) -> bool:
    """Whether the [gpu] extra's kernels compute tensors on ``device``; elsewhere the default path does."""
    return device.type in KERNEL_DEVICE_TYPES


def require_gpu_package(module: str, setting: str, package: str, instead: str) -> None:
    """``setting`` (e.g. "model.attn_backend = 'flash'") needs ``module`` importable and CUDA."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{setting} needs {package}: {INSTALL_GPU_EXTRA} (CUDA; after pip install -e .), or {instead}.")
    if not torch.cuda.is_available():
        raise ConfigError(f"{setting} runs on CUDA only: {instead}.")
