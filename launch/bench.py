"""Throughput of doge-dist's Doge against transformers' DogeForCausalLM, in one process.

Training: a full step (forward, backward, fused AdamW) of our model and of the Hugging Face model
(eager and sdpa attention) with the same config, weights, batch and precision. The models run
interleaved, round after round after a warm-up, so that clock drift, thermal state and other
load hit all of them alike; the table reports medians.

    python launch/bench.py --preset doge-20m --seq-len 512 --micro-batch 4 --dtype bf16 --threads 2
    python launch/bench.py --preset doge-20m --decode            # greedy generation at batch 1

``--dtype bf16`` means fp32 master weights under ``torch.autocast(device, torch.bfloat16)`` for
every model, as in mixed-precision training. MFU divides achieved FLOP/s
(``training_flops_per_token`` x tokens/s) by the device's peak: a table for known GPUs,
``--peak-tflops`` to override, and on CPU a measured dense matmul peak in the bench dtype.
The last line printed is one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from doge_dist.config import ATTN_BACKENDS, ConfigError, ModelConfig  # noqa: E402
from doge_dist.convert.hf import to_hf_config  # noqa: E402
from doge_dist.model import build_model, shift_labels  # noqa: E402
from doge_dist.model.generate import generate  # noqa: E402
from doge_dist.model.flops import training_flops_per_token  # noqa: E402
from doge_dist.model.compile import compile_model  # noqa: E402
from doge_dist.train.host_memory import keep_freed_memory  # noqa: E402
from doge_dist.train.metrics import device_peak_tflops  # noqa: E402

HF_VARIANTS = ("hf_eager", "hf_sdpa")
CLOCKS = {"wall": time.perf_counter, "thread": time.thread_time}
DECODE_PROMPT, DECODE_NEW_TOKENS = 32, 128
DEFAULTS = {"seq_len": 512, "micro_batch": 4, "tp": 2}  # None in argparse, so that a flag given where it does not apply is refused


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="default doge-20m (--comm: doge-60m, whose 2 key/value heads "
                   "tensor parallelism 2 can split; doge-20m has one)")
    p.add_argument("--seq-len", type=int, default=None, help=f"training and --comm (default {DEFAULTS['seq_len']})")
    p.add_argument("--micro-batch", type=int, default=None,
                   help=f"training and --comm (default {DEFAULTS['micro_batch']})")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=10, help="measured rounds (each model steps once per round)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first (compilation, allocator; --decode: half as many, at least one)")
    p.add_argument("--models", default="ours,hf_eager,hf_sdpa",
                   help="comma list of ours, hf_eager, hf_sdpa, and ours_<backend> (ours with another attention "
                        "backend, e.g. ours_sdpa, compared in the same run)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: table / measured)")
    p.add_argument(
        "--clock",
        choices=("wall", "thread"),
        default="wall",
        help="thread: CPU time of the calling thread, which other processes' load does not inflate (needs --threads 1)",
    )
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="CPU: have glibc keep freed memory for reuse, as the trainer does on CPU, for every model "
                        "(default: the process's allocator as it is)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile our decoder layers and loss kernel (the trainer's train.compile); with "
                        "--decode: our decode step as one compiled graph (generate(compile=True))")
    p.add_argument("--compile-mode", default=None, choices=("default", "reduce-overhead", "max-autotune",
                                                             "max-autotune-no-cudagraphs"),
                   help="compile with this torch.compile mode (reduce-overhead: CUDA graphs against launch overhead)")
    p.add_argument("--attn-backend", default="auto", choices=ATTN_BACKENDS,
                   help="our attention backend (flash: flash-attn from the [gpu] extra)")
    p.add_argument("--decode", action="store_true", help="measure greedy generation at batch 1 instead of training")
    p.add_argument("--comm", action="store_true",
                   help="bytes per micro-batch (forward + backward) sent by tensor parallelism (counted on --tp local gloo ranks, against the "
                        "analytic volume) and by the expert-parallel exchange at EP 2, 4, 8 (against all-to-all)")
    p.add_argument("--tp", type=int, default=None, help=f"tensor-parallel size for --comm (default {DEFAULTS['tp']})")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="after measuring, profile 2 training steps of ours and print the N ops with the most device time")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_ranges(p, args)
    for flag, value in DEFAULTS.items():  # after check_ranges, which refuses only what was given
        if getattr(args, flag) is None:
            setattr(args, flag, value)
    return args


def check_ranges(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Sizes and counts that would otherwise fail deep inside a model or a median, flags the chosen
    mode would silently ignore (while the JSON recorded them) and a device string bench.py cannot
    run on, named by their flag."""
    for flag, value, least in (("--seq-len", args.seq_len, 1), ("--micro-batch", args.micro_batch, 1),
                               ("--steps", args.steps, 1), ("--warmup", args.warmup, 0), ("--tp", args.tp, 1),
                               ("--threads", args.threads, 1), ("--profile", args.profile, 0)):
        if value is not None and value < least:
            parser.error(f"{flag} must be at least {least}, got {value}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak-tflops must be positive, got {args.peak_tflops}")
    if args.decode and (args.compile_mode or args.profile):
        parser.error("--compile-mode and --profile apply to the training step, not to --decode (which takes --compile)")
    if args.comm and (args.compile or args.compile_mode or args.profile):
        parser.error("--compile, --compile-mode and --profile apply to the training step, not to --comm")
    if args.decode and args.comm:
        parser.error("--comm and --decode are two separate measurements: run one at a time")
    if args.decode and (args.seq_len is not None or args.micro_batch is not None):
        parser.error(f"--seq-len and --micro-batch apply to training and --comm; --decode generates "
                     f"{DECODE_NEW_TOKENS} tokens after a {DECODE_PROMPT}-token prompt at batch 1")
    if args.tp is not None and not args.comm:
        parser.error("--tp applies to --comm only (the training and decode benches run on one device)")
    args.preset = args.preset or ("doge-60m" if args.comm else "doge-20m")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: bench.py runs on 'cpu' or 'cuda' (optionally 'cuda:N')")


def check_backends(args: argparse.Namespace, device: torch.device, names: list[str]) -> None:
    """The device and our attention backends can run here: CUDA present, flash-attn installed and
    given bf16 (its kernel has no fp32), FlexAttention trained on CUDA only (PyTorch has no CPU backward for it)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but this torch sees no CUDA device; use --device cpu.")
    if args.compile_mode == "reduce-overhead" and device.type != "cuda":
        raise ConfigError("--compile-mode reduce-overhead captures CUDA graphs, which need --device cuda; on the CPU "
                          "use --compile (or --compile-mode default / max-autotune).")
    backends = {our_backend(name, args.attn_backend) for name in names} - {None}
    if "flash" in backends and args.dtype == "fp32":
        raise ConfigError("The flash attention backend runs flash-attn's kernel, which computes in fp16/bf16 only: with "
                          "--dtype fp32 choose another --attn-backend (auto, flex, sdpa), or --dtype bf16.")
    if "flash" in backends:
        from doge_dist.model.flash import check_flash_available

        check_flash_available()
        if device.type != "cuda":
            raise ConfigError("The flash attention backend runs on CUDA only: --device cuda, or another --attn-backend.")
    if "flex" in backends and device.type == "cpu" and not (args.decode or args.comm):
        raise ConfigError("FlexAttention has no backward on CPU: train with --attn-backend auto, sdpa or eager there "
                          "(or ours_sdpa, ours_eager in --models).")


def autocast(device: torch.device, dtype: str):
    if dtype == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def our_backend(name: str, default: str) -> Optional[str]:
    """The attention backend of one of our variants ("ours" or "ours_<backend>"); None for HF models."""
    if name == "ours":
        return default
    backend = name.removeprefix("ours_")
    return backend if name.startswith("ours_") and backend in ATTN_BACKENDS else None


def build_models(config: ModelConfig, device: torch.device, names: list[str], compiled: bool,
                 compile_mode: Optional[str] = None) -> dict:
    """Our model (one per requested attention backend) and the requested transformers models, all
    holding the same weights."""
    ours = build_model(config, device)
    models = {"ours": ours}
    for name in names:
        backend = our_backend(name, config.attn_backend)
        if name != "ours" and backend is not None:
            models[name] = build_model(dataclasses.replace(config, attn_backend=backend), device)
            models[name].load_state_dict(ours.state_dict(), strict=True)
    if compiled:
        for model in models.values():
            compile_model(model, compile_mode)
    if any(name in HF_VARIANTS for name in names):
        from transformers import DogeForCausalLM as HFDoge

        for name in names:
            if name in HF_VARIANTS:
                hf_config = to_hf_config(config)
                hf_config._attn_implementation = name.removeprefix("hf_")
                hf = HFDoge(hf_config).to(device)
                hf.load_state_dict(ours.state_dict(), strict=True)
                models[name] = hf
    return {name: models[name] for name in names}


def train_step(name: str, model, optimizer, input_ids: torch.Tensor, device, dtype: str) -> Callable[[], torch.Tensor]:
    """One closure per model: forward + backward + optimizer step, returning the loss."""
    labels = shift_labels(input_ids)

    def step() -> torch.Tensor:
        with autocast(device, dtype):
            if name.startswith("ours"):
                out = model(input_ids, compute_logits=False, labels=labels)  # the trainer's call
                loss = out.loss_sum / out.loss_tokens
            else:
                loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def interleaved_times(
    steps: dict[str, Callable], warmup: int, rounds: int, device, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float] | str]:
    """Seconds per call of each closure, measured round-robin (rotating the order every round).
    A model that runs out of memory is dropped and reported as such instead of ending the run."""
    names = list(steps)
    times: dict[str, list[float] | str] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            if isinstance(times[name], str):
                continue
            synchronize(device)
            start = clock()
            try:
                steps[name]()
            except torch.OutOfMemoryError:
                times[name] = "out of memory"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            synchronize(device)
            if r >= warmup:
                times[name].append(clock() - start)
    return times


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[Optional[float], str]:
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    peak, source = device_peak_tflops(device, args.dtype == "bf16", CLOCKS[args.clock])
    return peak, source if peak else f"{source}: pass --peak-tflops"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = "cpu"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    return f"{name} ({torch.get_num_threads()} threads)"


def allocator_env() -> dict:
    """The environment variables that change how the CPU allocator reuses memory. On a VM where page
    faults are slow they (or ``--keep-freed-memory``) move a model that allocates large temporaries
    every step (HF's full fp32 logits) by up to 2x, so a figure is only comparable with others
    measured under the same allocator settings."""
    names = ("THP_MEM_ALLOC_ENABLE", "LD_PRELOAD")
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_") or k in names}


def git_commit() -> str:
    """HEAD's short hash; DOGE_DIST_COMMIT overrides it for a copy of the tree without .git."""
    if os.environ.get("DOGE_DIST_COMMIT"):
        return os.environ["DOGE_DIST_COMMIT"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def bench_training(args, config: ModelConfig, device: torch.device, names: list[str]) -> dict:
    models = build_models(config, device, names, args.compile, args.compile_mode)
    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(3, config.vocab_size, (args.micro_batch, args.seq_len), generator=generator).to(device)
    fused = device.type in ("cuda", "cpu")
    steps = {}
    for name, model in models.items():
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.01, fused=fused)
        steps[name] = train_step(name, model, optimizer, input_ids, device, args.dtype)
    times = interleaved_times(steps, args.warmup, args.steps, device, CLOCKS[args.clock])
    if args.profile:
        print_profile(steps["ours"], device, args.profile)

    tokens = args.micro_batch * args.seq_len
    flops_per_token = training_flops_per_token(config, args.seq_len)
    peak, peak_source = peak_tflops(args, device)
    results = {}
    for name, seconds in times.items():
        if isinstance(seconds, str):
            results[name] = {"error": seconds}
            continue
        median = statistics.median(seconds)
        tflops = tokens / median * flops_per_token / 1e12
        results[name] = {
            "step_ms": round(median * 1e3, 2),
            "tokens_per_s": round(tokens / median, 1),
            "tflops": round(tflops, 3),
            "mfu": round(tflops / peak, 4) if peak else None,
        }
    return {"flops_per_token": flops_per_token, "peak_tflops": peak, "peak_source": peak_source, "train": results}


def print_profile(step: Callable[[], torch.Tensor], device: torch.device, rows: int) -> None:
    """The ops of two already-warm training steps with the most self time on the device and on the
    host (the next speed work)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step()
        synchronize(device)
    table = prof.key_averages()
    if device.type == "cuda":  # the device's time, then the host's (a launch-bound step waits on the host)
        print(table.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60), flush=True)
    print(table.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60), flush=True)


def greedy_ours(model, prompt: torch.Tensor, new_tokens: int, compiled: bool = False) -> torch.Tensor:
    """Our generation loop (KV cache with the per-key bias cached beside K and V), greedy."""
    return generate(model, prompt, new_tokens, temperature=0.0, eos_token_id=None, compile=compiled)[:, prompt.shape[1] :]


@torch.inference_mode()
def greedy_hf(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    from transformers import GenerationConfig

    # no eos: every run generates exactly new_tokens tokens (generate fills an eos left None in the
    # generation config it is given from the model's own, so that one is cleared too)
    model.generation_config.eos_token_id = None
    generation = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=2)
    return model.generate(prompt, generation_config=generation)[:, prompt.shape[1] :]


def bench_decode(args, config: ModelConfig, device: torch.device, names: list[str]) -> dict:
    models = build_models(config, device, names, compiled=False)
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(3, config.vocab_size, (1, DECODE_PROMPT), generator=generator).to(device)
    outputs: dict[str, torch.Tensor] = {}

    def run(name, model):
        def go():
            model.eval()
            with autocast(device, args.dtype):
                if name.startswith("ours"):
                    outputs[name] = greedy_ours(model, prompt, DECODE_NEW_TOKENS, args.compile)
                else:
                    outputs[name] = greedy_hf(model, prompt, DECODE_NEW_TOKENS)

        return go

    runs = {n: run(n, m) for n, m in models.items()}
    warmup = max(1, args.warmup // 2)  # a generation is many steps: half the rounds, at least one (inductor, allocator)
    times = interleaved_times(runs, warmup, args.steps, device, CLOCKS[args.clock])
    results = {}
    for name, seconds in times.items():
        if isinstance(seconds, str):
            results[name] = {"error": seconds}
            continue
        assert outputs[name].shape[1] == DECODE_NEW_TOKENS, f"{name} generated {outputs[name].shape[1]} tokens"
        median = statistics.median(seconds)
        results[name] = {
            "ms_per_token": round(median / DECODE_NEW_TOKENS * 1e3, 3),
            "tokens_per_s": round(DECODE_NEW_TOKENS / median, 1),
        }
    finished = [n for n, r in results.items() if n != "ours" and "error" not in r]
    same = {n: bool(torch.equal(outputs[n], outputs["ours"])) for n in finished}
    return {"decode": results, "same_tokens_as_ours": same, "warmup": warmup}


def ratios(results: dict, key: str) -> dict:
    ours = results.get("ours")
    if not ours or key not in ours:
        return {}
    others = {name: r for name, r in results.items() if name != "ours" and key in r}
    return {f"ours_vs_{name}": round(ours[key] / r[key], 3) for name, r in others.items()}


def bench_comm(args, config: ModelConfig) -> dict:
    """Per rank and step (one micro-batch, forward + backward), in MB."""
    from doge_dist.parallel.comm_volume import analytic_tp_bytes, measure_tp_bytes, moe_exchange_bytes
    from doge_dist.parallel.tensor import check_tensor_parallel

    check_tensor_parallel(config, args.tp, sequence_parallel=True)  # here, not in the spawned ranks
    if args.seq_len % args.tp:
        raise ConfigError(f"--seq-len ({args.seq_len}) must be a multiple of --tp ({args.tp}): sequence parallelism "
                          "gives every rank seq_len / tp tokens.")
    tokens = args.micro_batch * args.seq_len
    counted = measure_tp_bytes([(config, False), (config, True)], args.micro_batch, args.seq_len, args.tp)
    tp = {
        "tp" if not sp else "tp+sp": {
            "counted_mb": round(sent / 2**20, 3),
            "analytic_mb": round(analytic_tp_bytes(config, tokens, args.tp, sp) / 2**20, 3),
        }
        for sp, sent in zip((False, True), counted)
    }
    moe = ModelConfig.from_preset("doge-1.4b-moe")
    ep = {f"ep{size}": {k: round(v / 2**20, 1) for k, v in moe_exchange_bytes(moe, tokens, size).items()}
          for size in (2, 4, 8)}
    return {"tp_size": args.tp, "fp32_bytes": True, "comm_tp": tp, "comm_ep_doge_1.4b_moe": ep}


def print_table(summary: dict) -> None:
    if "comm_tp" in summary:
        print(f"tensor parallel {summary['tp_size']}, {summary['preset']}: MB sent per rank per micro-batch (fp32)")
        for mode, r in summary["comm_tp"].items():
            print(f"  {mode:<6} counted {r['counted_mb']:>10.3f}   analytic {r['analytic_mb']:>10.3f}")
        print("expert parallel, doge-1.4b-moe, same tokens per rank: MB per rank per micro-batch (bf16)")
        for ep, r in summary["comm_ep_doge_1.4b_moe"].items():
            print(f"  {ep:<5} gather/reduce-scatter {r['gather_reduce_scatter']:>9.1f}   all-to-all {r['all_to_all']:>9.1f}")
        return
    if "train" in summary:
        print(f"{'model':<10} {'step ms':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>7}")
        for name, r in summary["train"].items():
            if "error" in r:
                print(f"{name:<10} {r['error']}")
                continue
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
            print(f"{name:<10} {r['step_ms']:>9.1f} {r['tokens_per_s']:>11.0f} {r['tflops']:>8.3f} {mfu:>7}")
    else:
        print(f"{'model':<10} {'ms/token':>9} {'tokens/s':>9}")
        for name, r in summary["decode"].items():
            if "error" in r:
                print(f"{name:<10} {r['error']}")
                continue
            print(f"{name:<10} {r['ms_per_token']:>9.2f} {r['tokens_per_s']:>9.1f}")
    for name, ratio in summary["ratios"].items():
        print(f"{name}: {ratio:.2f}x")


def main(argv: Optional[list[str]] = None) -> dict:
    args = parse_args(argv)
    args.compile = args.compile or args.compile_mode is not None
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    config = ModelConfig.from_preset(args.preset, attn_backend=args.attn_backend)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = {n for n in names if n not in HF_VARIANTS and our_backend(n, args.attn_backend) is None}
    if unknown or "ours" not in names:
        raise SystemExit(f"--models must include 'ours' and only ours, ours_<backend> ({', '.join(ATTN_BACKENDS)}), "
                         f"hf_eager, hf_sdpa (got {args.models!r})")
    if args.clock == "thread" and (torch.get_num_threads() != 1 or device.type != "cpu"):
        raise SystemExit("--clock thread measures one CPU thread: use it with --device cpu --threads 1")
    check_backends(args, device, names)

    kept_freed_memory = args.keep_freed_memory and keep_freed_memory()  # before any model allocates
    summary = {
        "mode": "comm" if args.comm else "decode" if args.decode else "train",
        "preset": args.preset,
        "seq_len": DECODE_PROMPT + DECODE_NEW_TOKENS if args.decode else args.seq_len,
        "micro_batch": 1 if args.decode else args.micro_batch,
        "dtype": args.dtype,
        "attn_backend": args.attn_backend,  # 'ours' runs it; ours_<backend> models name their own
        "device": device_name(device),
        "threads": torch.get_num_threads(),
        "compile": (args.compile_mode or True) if args.compile else False,
        "clock": args.clock,
        "steps": args.steps,
        "warmup": args.warmup,
        "seed": args.seed,
        "torch": torch.__version__,
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d"),
        "allocator": {"keep_freed_memory": kept_freed_memory, "env": allocator_env()},
    }
    if args.comm:
        summary.update(bench_comm(args, config))
    elif args.decode:
        summary.update(bench_decode(args, config, device, names))
        summary["ratios"] = ratios(summary["decode"], "tokens_per_s")
    else:
        summary.update(bench_training(args, config, device, names))
        summary["ratios"] = ratios(summary["train"], "tokens_per_s")
    print_table(summary)
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    try:
        main()
    except ConfigError as error:  # an unknown preset, a tp size the heads do not allow, a missing kernel
        sys.exit(f"error: {error}")
