"""``model.loss_backend: te``: the whole-logits loss (ZeRO-3, DPO's log-probs) through transformer-engine's
fused cross entropy equals the PyTorch loss, values and gradients, with ignored tokens. TE's kernel
is Triton on CUDA: here a stand-in with the contract of its source (``transformer_engine/pytorch/
cross_entropy.py`` and ``triton/cross_entropy.py``), quirks included, computes it; the real kernel
has a CUDA test."""
import sys
import types

import pytest
import torch

from doge_dist.config import ConfigError, ModelConfig, load_config
from doge_dist.model import IGNORE_INDEX, build_model, gpu_extra, shift_labels
from model_helpers import perturb_all, randomise_dynamic_mask, unique_tokens

calls: list = []


class CrossEntropyFunction(torch.autograd.Function):
    """TE's contract: input [B, SQ, V] (bf16 or fp32) and target [B, SQ]; with reduce_loss False the
    fp32 loss per token [B, SQ], 0 at ignore_idx. Its kernels write into the input: the forward zeroes
    ignored rows, the backward stores (softmax - one_hot) * grad_output with the softmax statistics of
    the original logits, on ignored rows too (not zero there). A group of several ranks is refused."""

    @staticmethod
    def forward(ctx, inp, target, label_smoothing=0.0, reduce_loss=False, dist_process_group=None,
                ignore_idx=-100, is_cg_capturable=False):
        assert inp.dim() == 3 and target.shape == inp.shape[:2] and inp.dtype in (torch.bfloat16, torch.float32)
        assert inp.is_contiguous() and label_smoothing == 0.0 and not reduce_loss and dist_process_group is None
        calls.append(inp.dtype)
        x = inp.detach().float()
        m = x.max(-1).values
        d = (x - m[..., None]).exp().sum(-1)
        ignored = target == ignore_idx
        picked = x.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1)
        loss = torch.where(ignored, torch.zeros_like(m), m + d.log() - picked)
        inp.data[ignored] = 0  # what the Triton kernel does, unseen by autograd
        ctx.save_for_backward(inp, target, m, d)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        inp, target, m, d = ctx.saved_tensors
        grad = (inp.detach().float() - m[..., None]).exp() / d[..., None]
        inside = target >= 0
        grad[inside, target[inside]] -= 1.0
        inp.data.copy_(grad * grad_output[..., None])
        return inp, None, None, None, None, None, None


@pytest.fixture
def fake_te(monkeypatch):
    package, pytorch, cross_entropy = (types.ModuleType(name) for name in (
        "transformer_engine", "transformer_engine.pytorch", "transformer_engine.pytorch.cross_entropy"))
    cross_entropy.CrossEntropyFunction = CrossEntropyFunction
    package.pytorch, pytorch.cross_entropy = pytorch, cross_entropy
    for module in (package, pytorch, cross_entropy):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(gpu_extra, "KERNEL_DEVICE_TYPES", {"cuda", "cpu"})  # the stand-in computes CPU tensors
    calls.clear()
    return calls


def _losses_and_grads(model, ids, mask, bf16: bool):
    labels = shift_labels(ids, mask)
    model.zero_grad()
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        logits = model(ids, attention_mask=mask).logits
        total, count = model.loss_sum(logits, labels)
    (total / count).backward()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        per_token = model.token_losses(model(ids, attention_mask=mask).logits, labels)
    return total.item(), count.item(), per_token, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_te_loss_equals_the_torch_loss_and_gradients(fake_te, bf16):
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("doge-tiny"))
    randomise_dynamic_mask(model)
    perturb_all(model)
    ids = unique_tokens(2, 16, 512)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # padding: ignored labels, whose TE gradient is not zero by itself
    reference = _losses_and_grads(model, ids, mask, bf16)
    assert not fake_te
    model.config.loss_backend = "te"
    fused = _losses_and_grads(model, ids, mask, bf16)
    assert fake_te == [torch.bfloat16 if bf16 else torch.float32] * 2  # loss_sum and token_losses
    assert fused[1] == reference[1] == 16 * 2 - 1 * 2 - 5
    assert fused[0] == pytest.approx(reference[0], rel=1e-5)
    assert torch.allclose(fused[2], reference[2], rtol=1e-5, atol=1e-5)
    assert (fused[2][1, 10:] == 0).all()
    for name, grad in reference[3].items():
        assert (fused[3][name] - grad).abs().max() <= 1e-4 * grad.abs().max().clamp(min=1e-6), name


def test_te_loss_is_refused_before_training_without_te_or_with_tp(monkeypatch):
    from doge_dist.model.te_loss import check_te_available
    from doge_dist.train.preflight import check_run

    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"transformer-engine: pip install --no-build-isolation -e '\.\[gpu\]'"):
        check_te_available()
    config = load_config(None, ["model.preset=doge-tiny", "model.loss_backend=te", "parallel.tensor_parallel=2"])
    with pytest.raises(ConfigError, match="vocab-parallel cross entropy"):
        check_run(config, {}, 2, "test")
    with pytest.raises(ConfigError, match="model.loss_backend = 'fused' is not one of torch, te"):
        ModelConfig.from_preset("doge-tiny", loss_backend="fused")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: transformer-engine's kernel is Triton on a GPU")
def test_cuda_te_loss_equals_the_torch_loss():
    pytest.importorskip("transformer_engine.pytorch", reason="transformer-engine not installed (pip install --no-build-isolation -e '.[gpu]')")
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("doge-tiny")).cuda()
    ids = torch.randint(3, 512, (2, 64), device="cuda")
    labels = shift_labels(ids)
    labels[1, 40:] = IGNORE_INDEX
    results = {}
    for backend in ("torch", "te"):
        model.config.loss_backend = backend
        model.zero_grad()
        with torch.autocast("cuda", torch.bfloat16):
            total, count = model.loss_sum(model(ids).logits, labels)
        (total / count).backward()
        results[backend] = total.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
    assert results["te"][0] == pytest.approx(results["torch"][0], rel=1e-3)
    for name, grad in results["torch"][1].items():
        assert (grad - results["te"][1][name]).abs().max() <= 2e-2 * grad.abs().max().clamp(min=1e-6), name
