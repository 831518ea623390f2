"""The dtype matrix products compute in: autocast's when it is on for the tensor's device, else the
tensor's own. Paths that call kernels outside autocast (the chunked loss, flash-attn, the decode
step) cast to it themselves, as autocast would."""
import torch


def compute_dtype(reference: torch.Tensor) -> torch.dtype:
    device_type = reference.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else reference.dtype
