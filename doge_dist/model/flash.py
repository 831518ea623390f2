"""DMA through flash-attn's kernel (``pip install --no-build-isolation -e '.[gpu]'``, ``model.attn_backend: flash``).

With the per-key bias folded into q and k (``[scale * q, 1] . [k_j, bias_j]``, attention.py), DMA
without a keep window is plain causal attention, so ``flash_attn_func`` computes it exactly with
``softmax_scale=1``: q and k carry head_dim + 1 channels, padded (with v) to a multiple of 8 by
attention.py, as for SDPA's fused kernels.
Its causal mask is aligned to the bottom right, so T new queries after a cache of S - T keys see
key j <= i + S - T: the decode rule. Batches with padding (key_valid) or packed documents, and
caches longer than the keep window, take the SDPA path instead (attention.py decides). flash-attn needs CUDA tensors in
fp16/bf16: under autocast they are cast to its dtype, as autocast does for matmuls.
"""
import torch

from ..config import ConfigError
from .gpu_extra import INSTALL_GPU_EXTRA, require_gpu_package
from .precision import compute_dtype

# flash-attn before 2.1 aligned its causal mask to the top left: T queries after a cache saw the
# first T keys, not the last (setup.py's [gpu] extra pins the same)
FLASH_ATTN_MIN = (2, 1)


def check_flash_available() -> None:
    instead = "choose attn_backend auto (flex on CUDA, sdpa on CPU), sdpa, flex or eager"
    require_gpu_package("flash_attn", "model.attn_backend = 'flash'", "the flash-attn package", instead)
    import flash_attn

    version = flash_attn.__version__
    if tuple(int(part) for part in version.split(".")[:2]) < FLASH_ATTN_MIN:
        minimum = ".".join(map(str, FLASH_ATTN_MIN))
        raise ConfigError(f"model.attn_backend = 'flash' needs flash-attn {minimum} or newer (its causal mask for decoding "
                          f"after a cache), found {version}: {INSTALL_GPU_EXTRA} --upgrade, or {instead}.")


def flash_dma(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float) -> torch.Tensor:
    """Folded and padded q [B, nh, T, D], k and v [B, nkv, S, D] -> [B, nh, T, D], causal."""
    from flash_attn import flash_attn_func

    dtype = compute_dtype(q)
    q, k, v = (t.transpose(1, 2).to(dtype) for t in (q, k, v))  # flash-attn's [B, T, heads, dim]
    return flash_attn_func(q, k, v, dropout_p=dropout, softmax_scale=1.0, causal=True).transpose(1, 2)
