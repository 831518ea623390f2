"""The ``flash`` attention backend's glue around flash-attn: the folded q/k/v reach ``flash_attn_func``
in its layout ([B, T, heads, dim], dim a multiple of 8, fp16/bf16, softmax_scale 1, causal aligned to
the bottom right) and the logits equal the eager backend's, for a full sequence, v1 and decode with
a cache. flash-attn itself needs CUDA: here a stand-in with its documented contract computes the
attention (the real kernel runs in launch/gpu_check.sh)."""
import sys
import types

import pytest
import torch

from doge_dist.config import ConfigError, ModelConfig, load_config
from doge_dist.model import build_model, gpu_extra, shift_labels
from doge_dist.model.cache import KVCache
from doge_dist.model.generate import generate
from model_helpers import perturb_all, randomise_dynamic_mask, unique_tokens, use_backend


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash-attn 2's contract: [B, T, H, D] q and [B, S, Hk, D] k/v of one half dtype, Hk | H,
    D <= 256 and a multiple of 8; ``causal`` lets query i see key j <= i + S - T."""
    B, T, H, D = q.shape
    S, Hk = k.shape[1], k.shape[2]
    assert q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype
    assert D % 8 == 0 and D <= 256 and v.shape[-1] == D and H % Hk == 0 and dropout_p == 0.0
    calls.append((T, S))
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(H // Hk, dim=1), vf.repeat_interleave(H // Hk, dim=1)
    scores = qf @ kf.transpose(2, 3) * softmax_scale
    if causal:
        visible = torch.arange(S)[None, :] <= torch.arange(T)[:, None] + S - T
        scores = scores.masked_fill(~visible, float("-inf"))
    return (scores.softmax(-1) @ vf).transpose(1, 2).to(q.dtype)


calls: list = []


@pytest.fixture
def fake_flash(monkeypatch):
    module = types.ModuleType("flash_attn")
    module.flash_attn_func = flash_attn_func
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(gpu_extra, "KERNEL_DEVICE_TYPES", {"cuda", "cpu"})  # the stand-in computes CPU tensors
    calls.clear()
    return calls


def _logits(model, backend, prompt, new):
    use_backend(model, backend)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        full = model(torch.cat([prompt, new], 1)).logits.float()
        cache = KVCache()
        model(prompt, cache=cache)
        stepped = torch.cat([model(new[:, i : i + 1], cache=cache).logits for i in range(new.shape[1])], 1).float()
    return full, stepped


@pytest.mark.parametrize("variant", ["v2", "v1"])
def test_flash_backend_equals_eager_for_a_sequence_and_for_decode(fake_flash, variant):
    overrides = {"attention_variant": "v1", "num_key_value_heads": 4} if variant == "v1" else {}
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("doge-tiny", **overrides)).eval()
    randomise_dynamic_mask(model)
    perturb_all(model)
    generator = torch.Generator().manual_seed(1)
    prompt, new = torch.randint(3, 512, (2, 9), generator=generator), torch.randint(3, 512, (2, 3), generator=generator)
    flash_full, flash_stepped = _logits(model, "flash", prompt, new)
    eager_full, eager_stepped = _logits(model, "eager", prompt, new)
    assert (12, 12) in fake_flash and (1, 10) in fake_flash  # a full causal pass and decode after a cache
    scale = eager_full.abs().max()
    assert (flash_full - eager_full).abs().max() <= 2e-2 * scale
    assert (flash_stepped - eager_stepped).abs().max() <= 2e-2 * scale
    assert (flash_stepped - eager_full[:, 9:]).abs().max() <= 2e-2 * scale


def test_a_flash_and_te_model_computes_cpu_tensors_through_the_default_path(monkeypatch):
    """A GPU run's checkpoint keeps model.attn_backend flash and loss_backend te in its config, and the
    model rebuilt from it on CPU (launch/generate.py, export, tests) has no kernel there: its CPU tensors
    take the default path (the kernels' modules are absent here, so touching one would fail)."""
    for module in ("flash_attn", "transformer_engine"):
        monkeypatch.setitem(sys.modules, module, None)
    torch.manual_seed(0)
    default = build_model(ModelConfig.from_preset("doge-tiny")).eval()
    randomise_dynamic_mask(default)
    perturb_all(default)
    gpu_run = build_model(ModelConfig.from_preset("doge-tiny", attn_backend="flash", loss_backend="te")).eval()
    gpu_run.load_state_dict(default.state_dict())
    ids = unique_tokens(2, 12, 512)
    labels = shift_labels(ids)
    results = []
    for model in (default, gpu_run):
        with torch.no_grad():
            out = model(ids, labels=labels)
            token_losses = model.token_losses(out.logits, labels)
        results.append((out.logits, out.loss_sum, token_losses, generate(model, ids[:, :5], 6, temperature=0)))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def test_flash_backend_without_flash_attn_is_refused_before_training(monkeypatch):
    """The install it names must work: flash-attn's setup.py imports torch, which pip's isolated build lacks."""
    from doge_dist.model.flash import check_flash_available

    monkeypatch.setitem(sys.modules, "flash_attn", None)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install --no-build-isolation -e '\.\[gpu\]'"):
        check_flash_available()


def test_flash_backend_in_fp32_is_refused_before_training():
    """flash-attn's kernel takes fp16/bf16 only: a DeepSpeed config without bf16 reached it in fp32 (a
    RuntimeError in the first step); launch/plan.py and the trainer check the effective config."""
    from doge_dist.train.preflight import check_ds_config, check_layout

    config = load_config(None, ["model.preset=doge-tiny", "model.attn_backend=flash"])
    layout = check_layout(config, 1)
    with pytest.raises(ConfigError, match=r"trains in fp32 \(no bf16 enabled\), but model.attn_backend = 'flash'"):
        check_ds_config(config, {"zero_optimization": {"stage": 2}}, layout, "test.json")
    check_ds_config(config, {"bf16": {"enabled": True}}, layout, "test.json")
    config.train.bf16 = True  # the YAML's switch enables it too
    check_ds_config(config, {}, layout, "test.json")


def test_flash_attn_older_than_2_1_is_refused(monkeypatch):
    """Before 2.1 flash-attn's causal mask was aligned to the top left, wrong for decoding after a cache."""
    from pathlib import Path

    from doge_dist.model.flash import FLASH_ATTN_MIN, check_flash_available

    assert f"flash-attn>={FLASH_ATTN_MIN[0]}.{FLASH_ATTN_MIN[1]}" in (Path(__file__).parents[1] / "setup.py").read_text()
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    module = types.ModuleType("flash_attn")
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    module.__version__ = "2.0.9"
    with pytest.raises(ConfigError, match="needs flash-attn 2.1 or newer .*, found 2.0.9"):
        check_flash_available()
    module.__version__ = "2.1.0"
    check_flash_available()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: flash-attn runs on a GPU")
def test_cuda_flash_kernel_training_step_matches_sdpa():
    flash_attn = pytest.importorskip("flash_attn", reason="flash-attn not installed (pip install --no-build-isolation -e '.[gpu]')")
    assert flash_attn
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("doge-tiny")).cuda()
    randomise_dynamic_mask(model)
    ids = torch.randint(3, 512, (2, 64), device="cuda")
    results = {}
    for backend in ("sdpa", "flash"):
        use_backend(model, backend)
        model.zero_grad()
        with torch.autocast("cuda", torch.bfloat16):
            loss = model(ids).logits.float().pow(2).mean()
        loss.backward()
        results[backend] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert results["flash"][0] == pytest.approx(results["sdpa"][0], rel=1e-2)
    for name, grad in results["sdpa"][1].items():
        assert (grad - results["flash"][1][name]).abs().max() <= 5e-2 * grad.abs().max().clamp(min=1e-6), name
