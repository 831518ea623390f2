"""keep_freed_memory: after it, glibc serves a large tensor from its heap and keeps the block when
the tensor is freed (the next step reuses it without faulting pages in); by default the block is
a fresh mmap that goes back to the system. Each case runs in its own process."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = """
import ctypes, ctypes.util, json, sys
import torch
from doge_dist.train.host_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = MallInfo2
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
tensor = torch.ones(16 << 20)  # 64 MB
mmapped = libc.mallinfo2().hblkhd
del tensor
print(json.dumps({"kept": kept, "mmapped": mmapped, "free_in_heap": libc.mallinfo2().fordblks}))
"""
MB64 = 64 << 20


def _allocator_after_a_64mb_tensor(mode: str) -> dict:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}  # glibc's defaults
    environment["PYTHONPATH"] = ROOT
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                            cwd=ROOT, env=environment)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_freed_blocks_stay_in_the_heap_after_keep_freed_memory():
    kept = _allocator_after_a_64mb_tensor("keep")
    assert kept["kept"] is True
    assert kept["mmapped"] < MB64 and kept["free_in_heap"] >= MB64


def test_by_default_a_large_tensor_is_a_fresh_mapping_given_back():
    default = _allocator_after_a_64mb_tensor("default")
    assert default["mmapped"] >= MB64 and default["free_in_heap"] < MB64
