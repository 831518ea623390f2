"""What a run reports: one TensorBoard writer on rank 0 and a console line every ``log_interval`` steps.

The loss, the balance loss and the rates of a log point are means over the steps since the previous one
(Megatron-LM's convention), steps skipped for a non-finite loss or gradient left out of the losses.

MFU = achieved training FLOP/s per device / the device's peak dense bf16 FLOP/s. The peak of a GPU
comes from the table below by device name; a CPU's is measured (a dense bf16 matmul with the run's
threads, about a second: no datasheet covers a machine's or a VM's share of a CPU);
``train.peak_tflops`` overrides both. Tokens are the real ones of the global batch (fine-tuning pads
its sequences to the longest of a micro-batch), their FLOPs ``doge_dist.model.flops.training_flops``;
time spent validating and checkpointing is left out, as Megatron-LM does.
launch/bench.py uses the same table and measurement, in the precision of its ``--dtype`` (an fp32 bench
divides by the fp32 peak; the trainer always by the bf16 one).
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

# Dense (no sparsity) peak TFLOP/s by device-name fragment, most specific first (vendor datasheets):
# (bf16 tensor cores, fp32 without TF32)
PEAK_TFLOPS = {
    "H200": (989.0, 67.0),
    "H100 SXM": (989.0, 67.0),
    "H100 NVL": (835.0, 60.0),
    "H100 PCIe": (756.0, 51.0),
    "H100": (989.0, 67.0),
    "H800": (989.0, 67.0),
    "A100": (312.0, 19.5),
    "A800": (312.0, 19.5),
    "L40S": (362.0, 91.6),
    "L40": (181.0, 90.5),  # before "L4", which its name contains
    "RTX 4090": (165.2, 82.6),
    "RTX 3090": (71.0, 35.6),
    "A6000": (154.8, 38.7),
    "L4": (121.0, 30.3),
    "A10": (125.0, 31.2),
    "V100": (125.0, 15.7),  # fp16 tensor cores: a V100 has no bf16
}


def measured_cpu_peak_tflops(bf16: bool = True, clock: Callable[[], float] = time.perf_counter, size: int = 2048,
                             seconds: float = 1.0) -> float:
    """The dense matmul TFLOP/s this CPU reaches with the current thread count (the best of the
    products that fit in ``seconds``)."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.mm(a, b)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = clock()
        torch.mm(a, b)
        best = max(best, 2 * size**3 / max(clock() - start, 1e-9))
    return best / 1e12


def device_peak_tflops(device: torch.device, bf16: bool = True, clock: Callable[[], float] = time.perf_counter,
                       seconds: float = 1.0) -> tuple[Optional[float], str]:
    """The device's dense peak TFLOP/s in bf16 (or fp32) and where it comes from; None if unknown."""
    precision = "bf16" if bf16 else "fp32"
    if device.type == "cpu":
        return measured_cpu_peak_tflops(bf16, clock, seconds=seconds), f"measured {precision} matmul"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, (bf16_peak, fp32_peak) in PEAK_TFLOPS.items():
            if fragment in name:
                return (bf16_peak if bf16 else fp32_peak), f"table: {fragment}"
        return None, f"unknown GPU {name!r}"
    return None, f"no peak known for {device.type}"


def cpu_time_per_thread() -> float:
    """This process's CPU seconds divided by its compute threads: a clock that stops while other
    processes hold the cores, so that a machine busy at startup does not lower the measured peak
    (and put MFU above 100% once it is idle again)."""
    return time.process_time() / torch.get_num_threads()


def peak_tflops(device: torch.device, override: Optional[float]) -> float:
    """The trainer's MFU denominator (0: unknown, "MFU n/a")."""
    if override is not None:
        return override
    return device_peak_tflops(device, clock=cpu_time_per_thread, seconds=0.25)[0] or 0.0


def memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory, or this process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class Reporter:
    """Throughput, MFU and ETA between log points; writes TensorBoard scalars on rank 0 only."""

    def __init__(self, run_dir: str, is_main: bool, peak: float, world_size: int, max_steps: int, start_step: int = 0) -> None:
        self.is_main = is_main
        self.peak = peak
        self.world_size = world_size
        self.max_steps = max_steps
        self.writer = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run hides what a killed run logged after its checkpoint (TensorBoard's purge_step),
            # a restarted one (step 0) all a run killed before its first checkpoint logged
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=start_step + 1)
        self._last_time = time.perf_counter()
        self._last_step = start_step
        self._tokens, self._flops = 0, 0.0  # since the last log point, all ranks together
        self._losses: list[tuple[float, Optional[float]]] = []  # (loss, balance loss) of the steps applied since then

    def count(self, tokens: int, flops: float) -> None:
        """One step's work, all ranks together: real tokens (fine-tuning pads its sequences) and their
        training FLOPs (``doge_dist.model.flops.training_flops``)."""
        self._tokens += tokens
        self._flops += flops

    def count_loss(self, loss: float, balance_loss: Optional[float]) -> None:
        """The losses of a step whose update was applied (a step skipped for a non-finite loss or gradient is
        left out of the logged mean, as Megatron-LM does; the loop warns about it)."""
        self._losses.append((loss, balance_loss))

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent in here (validation, checkpoints) stays out of tok/s, MFU and the ETA, as
        Megatron-LM stops its interval timer for them."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._last_time += time.perf_counter() - start

    def text(self, tag: str, text: str) -> None:
        """At the step the run starts from: a resumed run's config shows where it took effect, beside the first run's."""
        if self.writer:
            self.writer.add_text(tag, text.replace("\n", "  \n"), global_step=self._last_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()

    def train_step(self, step: int, loss: float, lr: float, grad_norm: float, consumed_tokens: int, device: torch.device, balance_loss: Optional[float]) -> None:
        """Log at a log point: rates, and the losses given to ``count_loss``, are averaged over the steps since the
        previous log point, as Megatron-LM does (with log_interval 10, the losses of all ten steps count, not
        only the tenth's); lr and grad norm are this step's. When every step since then was skipped, ``loss``
        and ``balance_loss``, this skipped step's own, are shown."""
        if self._losses:
            loss = sum(logged for logged, _ in self._losses) / len(self._losses)
            if balance_loss is not None:
                balance_loss = sum(balance for _, balance in self._losses) / len(self._losses)
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        tokens_per_sec = self._tokens / elapsed
        tflops = self._flops / elapsed / self.world_size / 1e12
        mfu = tflops / self.peak if self.peak else 0.0
        values = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_sec": tokens_per_sec,
            "train/tflops_per_device": tflops,
            "train/memory_gb": memory_gb(device),
            "train/consumed_tokens": float(consumed_tokens),
        }
        if self.peak:  # an unknown peak is no MFU of 0 ("MFU n/a" on the console)
            values["train/mfu"] = mfu
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
        self._last_time, self._last_step = now, step
        self._tokens, self._flops, self._losses = 0, 0.0, []

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
