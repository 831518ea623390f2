"""Single-device Doge: ``build_model(ModelConfig)`` -> ``DogeForCausalLM``."""
from .doge import DogeForCausalLM, DogeOutput, build_model, init_weights
from .loss import IGNORE_INDEX, shift_labels, token_loss_sum

__all__ = ["DogeForCausalLM", "DogeOutput", "build_model", "init_weights", "IGNORE_INDEX", "shift_labels", "token_loss_sum"]
