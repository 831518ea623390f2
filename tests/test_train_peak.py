"""The MFU denominator: a GPU's datasheet peak by name (the most specific fragment wins), a CPU's
measured matmul peak, train.peak_tflops over both."""
import time

import pytest
import torch

from doge_dist.train.metrics import device_peak_tflops, peak_tflops


@pytest.mark.parametrize("name, bf16, fp32", [
    ("NVIDIA H100 80GB HBM3", 989.0, 67.0),
    ("NVIDIA H100 PCIe", 756.0, 51.0),
    ("NVIDIA L40S", 362.0, 91.6),  # not the L4's
    ("NVIDIA L40", 181.0, 90.5),  # not the L4's either
    ("NVIDIA L4", 121.0, 30.3),
    ("NVIDIA A100-SXM4-80GB", 312.0, 19.5),  # not the A10's
    ("NVIDIA A10", 125.0, 31.2),
    ("NVIDIA GeForce RTX 4090", 165.2, 82.6),
])
def test_gpu_peak_by_name(monkeypatch, name, bf16, fp32):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    assert device_peak_tflops(cuda) == (bf16, device_peak_tflops(cuda)[1])
    assert device_peak_tflops(cuda, bf16=False)[0] == fp32
    assert peak_tflops(cuda, None) == bf16


def test_unknown_gpu_has_no_peak_unless_given(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Imaginary GPU 9000")
    cuda = torch.device("cuda", 0)
    assert device_peak_tflops(cuda) == (None, "unknown GPU 'Imaginary GPU 9000'")
    assert peak_tflops(cuda, None) == 0.0 and peak_tflops(cuda, 100.0) == 100.0


def test_cpu_peak_is_measured():
    peak, source = device_peak_tflops(torch.device("cpu"), seconds=0.05)
    assert source == "measured bf16 matmul" and 0.001 < peak < 100
    assert peak_tflops(torch.device("cpu"), 2.5) == 2.5


def test_cpu_peak_is_not_lowered_by_other_processes_holding_the_cores(monkeypatch):
    """The trainer measures the CPU peak at startup, maybe while other work runs: time the process is
    not on the cores (simulated: each product waits 4x its length in a sleep) must not count, or MFU
    reads far above 100% once the machine is idle (368% was seen)."""
    cpu = torch.device("cpu")
    idle = peak_tflops(cpu, None)
    mm = torch.mm

    def descheduled_mm(*args, **kwargs):
        start = time.perf_counter()
        out = mm(*args, **kwargs)
        time.sleep(4 * (time.perf_counter() - start))
        return out

    monkeypatch.setattr(torch, "mm", descheduled_mm)
    busy = peak_tflops(cpu, None)
    assert busy > 0.4 * idle, (busy, idle)  # a wall clock reads 1/5 of it
