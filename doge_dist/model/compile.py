"""torch.compile of a Doge model, applied from outside like the parallel layouts."""
from typing import Optional

from .doge import DogeForCausalLM


def compile_model(model: DogeForCausalLM, mode: Optional[str] = None) -> None:
    """``torch.compile`` each decoder layer in place (``nn.Module.compile``), so parameter names and
    checkpoints are those of the uncompiled model. Layers share their code, so one compiled graph
    serves them all. The chunked loss compiles its softmax and gradient (one fused kernel per
    chunk); its matrix products, the embedding and the final norm stay eager."""
    for layer in model.model.layers:
        layer.compile(mode=mode)
    model.compiled_loss = True
