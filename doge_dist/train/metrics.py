"""What a run reports: one TensorBoard writer on rank 0 and a console line every ``log_interval`` steps.

MFU = achieved training FLOP/s per device / the device's peak dense bf16 FLOP/s. The peak comes from
the table below by device name (``train.peak_tflops`` overrides it; CPUs have no entry: TensorBoard
gets 0 and the console "MFU n/a" unless given one). FLOPs per token come from ``doge_dist.model.flops``.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch

# dense bf16 peak TFLOP/s per device (vendor datasheets, without sparsity)
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
    "A6000": 154.8,
    "V100": 125.0,
}


def peak_tflops(device: torch.device, override: Optional[float]) -> float:
    if override is not None:
        return override
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():  # most specific names first
        if key in name:
            return value
    return 0.0


def memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or this process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Reporter:
    """Throughput, MFU and ETA between log points; writes TensorBoard scalars on rank 0 only."""

    def __init__(
        self, run_dir: str, is_main: bool, flops_per_token: float, peak: float, world_size: int, max_steps: int,
        start_step: int = 0, start_tokens: int = 0,
    ) -> None:
        self.is_main = is_main
        self.flops_per_token = flops_per_token
        self.peak = peak
        self.world_size = world_size
        self.max_steps = max_steps
        self.writer = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run hides what a killed run logged after its checkpoint (TensorBoard's purge_step)
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        self._last_time = time.perf_counter()
        self._last_step, self._last_tokens = start_step, start_tokens

    def text(self, tag: str, text: str) -> None:
        if self.writer:
            self.writer.add_text(tag, text.replace("\n", "  \n"))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def train_step(self, step: int, loss: float, lr: float, grad_norm: float, consumed_tokens: int, device: torch.device, balance_loss: Optional[float]) -> None:
        """Log at a log point: rates are averaged over the steps since the previous log point."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        tokens_per_sec = (consumed_tokens - self._last_tokens) / elapsed
        tflops = tokens_per_sec / self.world_size * self.flops_per_token / 1e12
        mfu = tflops / self.peak if self.peak else 0.0
        values = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_sec": tokens_per_sec,
            "train/tflops_per_device": tflops,
            "train/mfu": mfu,
            "train/memory_gb": memory_gb(device),
            "train/consumed_tokens": float(consumed_tokens),
        }
        if balance_loss is not None:
            values["moe/balance_loss"] = balance_loss
        self.scalars(step, values)
        if self.is_main:
            eta = (self.max_steps - step) * elapsed / max(1, step - self._last_step)
            print(
                f"step {step:>6}/{self.max_steps} | loss {loss:.4f} | lr {lr:.3e} | grad norm {grad_norm:.3f} | "
                f"{tokens_per_sec:,.0f} tok/s | {f'MFU {100 * mfu:.1f}%' if self.peak else 'MFU n/a'} | ETA {_duration(eta)}",
                flush=True,
            )
        self._last_time, self._last_step, self._last_tokens = now, step, consumed_tokens

    def validation(self, step: int, loss: float, perplexity: bool = True, metrics: Optional[dict[str, float]] = None) -> None:
        """``perplexity``: the loss is a mean token cross entropy; ``metrics``: the task's other scalars."""
        values = {"val/loss": loss}
        if perplexity:
            values["val/ppl"] = math.exp(min(loss, 50.0))
        values.update(metrics or {})
        self.scalars(step, values)
        if self.is_main:
            shown = "".join(f" | perplexity {value:.2f}" if tag == "val/ppl" else f" | {tag} {value:.4f}"
                            for tag, value in values.items() if tag != "val/loss")
            print(f"step {step:>6}/{self.max_steps} | validation loss {loss:.4f}{shown}", flush=True)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
