"""launch/bench.py runs end to end on a tiny preset and ends with one JSON line of figures."""
import json
import os
import subprocess
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args: str) -> dict:
    command = [sys.executable, os.path.join(ROOT, "launch", "bench.py"), "--preset", "doge-tiny", "--threads", "1",
               "--steps", "1", "--warmup", "1", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    return json.loads(lines[-1])


def test_training_bench_prints_the_expected_json():
    summary = _bench("--seq-len", "32", "--micro-batch", "2", "--dtype", "bf16", "--peak-tflops", "1.0",
                     "--keep-freed-memory")
    assert summary["allocator"]["keep_freed_memory"] is True  # glibc took the setting
    assert "ours_vs_hf_eager" in summary["ratios"]
    assert summary["mode"] == "train" and summary["preset"] == "doge-tiny"
    for key in ("seq_len", "micro_batch", "dtype", "device", "threads", "commit", "date", "flops_per_token",
                "peak_tflops", "peak_source", "train", "ratios"):
        assert key in summary, key
    assert set(summary["train"]) == {"ours", "hf_eager", "hf_sdpa"}
    for figures in summary["train"].values():
        assert set(figures) == {"step_ms", "tokens_per_s", "tflops", "mfu"}
        assert figures["tokens_per_s"] > 0 and 0 < figures["mfu"]
    assert set(summary["ratios"]) == {"ours_vs_hf_eager", "ours_vs_hf_sdpa"}
    assert summary["peak_tflops"] == 1.0
    # what tells two runs apart in gpu_check.sh's figures.jsonl (its flex and flash 320m lines had the same keys)
    assert (summary["attn_backend"], summary["steps"], summary["warmup"], summary["seed"]) == ("auto", 1, 1, 0)


def test_decode_bench_generates_the_same_tokens_as_transformers():
    summary = _bench("--decode", "--dtype", "fp32", "--models", "ours,hf_eager", "--warmup", "0")
    assert summary["mode"] == "decode" and summary["warmup"] == 1  # the rounds it ran
    assert set(summary["decode"]["ours"]) == {"ms_per_token", "tokens_per_s"}
    assert summary["same_tokens_as_ours"] == {"hf_eager": True}
    assert "ours_vs_hf_eager" in summary["ratios"]


def test_bench_rejects_unknown_models():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench.py"), "--models", "ours,megatron"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode != 0 and "--models" in result.stderr


def test_comm_bench_runs_at_its_default_preset():
    """--comm at the default preset (doge-20m, one key/value head) was refused: tensor parallelism 2 cannot split it."""
    command = [sys.executable, os.path.join(ROOT, "launch", "bench.py"), "--comm", "--seq-len", "16", "--micro-batch", "1",
               "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["preset"] == "doge-60m"


def test_comm_bench_counts_what_the_formula_predicts():
    summary = _bench("--comm", "--seq-len", "16", "--micro-batch", "2")
    for mode in ("tp", "tp+sp"):
        figures = summary["comm_tp"][mode]
        assert figures["counted_mb"] == figures["analytic_mb"] > 0
    assert set(summary["comm_ep_doge_1.4b_moe"]) == {"ep2", "ep4", "ep8"}


def test_bench_compares_our_backends_and_profiles():
    command = [sys.executable, os.path.join(ROOT, "launch", "bench.py"), "--preset", "doge-tiny", "--threads", "1",
               "--steps", "1", "--warmup", "1", "--seq-len", "16", "--micro-batch", "1", "--models", "ours,ours_eager",
               "--profile", "5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT,
                            env=dict(os.environ, DOGE_DIST_COMMIT="abc1234", MALLOC_TRIM_THRESHOLD_="1073741824"))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(summary["train"]) == {"ours", "ours_eager"} and "ours_vs_ours_eager" in summary["ratios"]
    assert summary["commit"] == "abc1234"
    assert summary["allocator"]["env"]["MALLOC_TRIM_THRESHOLD_"] == "1073741824"
    assert summary["allocator"]["keep_freed_memory"] is False
    assert "Self CPU" in result.stdout  # the profile table of ours' step


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_cli", os.path.join(ROOT, "launch", "bench.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_names_bad_sizes_and_layouts_before_any_work(capsys):
    """Sizes, counts, layouts and backends that would fail deep in a model, a median or a spawned rank."""
    import pytest

    from doge_dist.config import ConfigError

    bench = _bench_module()
    for flag, value in (("--seq-len", "0"), ("--micro-batch", "0"), ("--steps", "0"), ("--tp", "0"), ("--threads", "0"),
                        ("--peak-tflops", "0")):
        with pytest.raises(SystemExit):
            bench.parse_args(["--preset", "doge-tiny", flag, value])
        assert flag in capsys.readouterr().err
    for argv in (["--decode", "--profile", "3"], ["--comm", "--compile"]):  # would be ignored, yet recorded
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert "apply to the training step" in capsys.readouterr().err
    for argv, message in ((["--comm", "--tp", "3"], "not divisible by parallel.tensor_parallel = 3"),
                          (["--comm", "--tp", "2", "--seq-len", "15"], r"--seq-len \(15\) must be a multiple of --tp"),
                          (["--attn-backend", "flash", "--device", "cpu"], "runs on CUDA only|flash-attn"),
                          (["--attn-backend", "flash", "--dtype", "fp32"], "fp16/bf16 only: with --dtype fp32"),
                          (["--models", "ours,ours_flash", "--dtype", "fp32"], "fp16/bf16 only: with --dtype fp32"),
                          (["--models", "ours,ours_flex", "--device", "cpu"], "no backward on CPU")):
        with pytest.raises(ConfigError, match=message):
            bench.main(["--preset", "doge-tiny", "--threads", "1", *argv])


def test_bench_refuses_flags_its_mode_would_ignore_and_devices_it_cannot_run(capsys):
    """--comm with --decode measured the TP bytes at --seq-len 512 x 4 while the JSON said 160 x 1;
    --seq-len and --micro-batch under --decode (a fixed 32 + 128 tokens at batch 1) and --tp without
    --comm were dropped silently; an unknown --device was a traceback; CUDA graphs on the CPU ran as a
    plain compile while the JSON said reduce-overhead."""
    import pytest

    from doge_dist.config import ConfigError

    bench = _bench_module()
    for argv, message in ((["--comm", "--decode"], "--comm and --decode"),
                          (["--decode", "--seq-len", "64"], "--seq-len and --micro-batch"),
                          (["--decode", "--micro-batch", "2"], "--seq-len and --micro-batch"),
                          (["--tp", "4"], "--tp applies to --comm"),
                          (["--device", "foo"], "--device 'foo'"),
                          (["--device", "mps"], "--device 'mps'")):
        with pytest.raises(SystemExit):
            bench.parse_args(["--preset", "doge-tiny", *argv])
        assert message in capsys.readouterr().err, argv
    defaults = bench.parse_args(["--decode"])  # flags not given are not refused, and keep their defaults
    assert (defaults.seq_len, defaults.micro_batch, defaults.tp) == (512, 4, 2)
    with pytest.raises(ConfigError, match="CUDA graphs"):
        bench.main(["--preset", "doge-tiny", "--threads", "1", "--device", "cpu", "--compile-mode", "reduce-overhead"])


def test_bench_unknown_preset_is_one_line():
    result = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "bench.py"), "--preset", "doge-nope"],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 1 and "error: Unknown model preset 'doge-nope'" in result.stderr
    assert "Traceback" not in result.stderr


def test_transformers_decode_runs_past_the_models_eos():
    """Both sides generate every one of the new tokens: transformers' generate takes the eos of the model's
    generation config when the one it is given has none, and stopped there (the bench's token check failed)."""
    import torch

    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import bench
    from doge_dist.config import ModelConfig

    models = bench.build_models(ModelConfig.from_preset("doge-tiny"), torch.device("cpu"), ["ours", "hf_eager"], compiled=False)
    prompt = torch.randint(3, 512, (1, 8), generator=torch.Generator().manual_seed(0))
    expected = bench.greedy_ours(models["ours"], prompt, 16)
    models["hf_eager"].generation_config.eos_token_id = int(expected[0, 0])  # the model's eos: its first token
    assert torch.equal(bench.greedy_hf(models["hf_eager"].eval(), prompt, 16), expected)
