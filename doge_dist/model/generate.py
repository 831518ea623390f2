"""Sampling with the key/value cache: the prompt is run once through the model, then one token
per step of ``decode.Decoder`` (the same math with fewer operations).

Temperature 0 is greedy decoding; ``top_k``/``top_p`` restrict sampling to the most likely tokens.
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from .cache import KVCache
from .decode import Decoder
from .doge import DogeForCausalLM


def check_options(max_new_tokens: int, temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    """A ValueError naming the first option out of range (0 tokens, temperature 0, top_k 0 and top_p 1
    are allowed: nothing generated, greedy, no top-k cut, no top-p cut)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be 0 or more, got {max_new_tokens}.")
    if not temperature >= 0:
        raise ValueError(f"temperature must be 0 (greedy) or more, got {temperature}.")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be 0 (no cut) or more, got {top_k}.")
    if top_p is not None and not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be between 0 and 1 (1: no cut), got {top_p}.")


def untrained_positions_note(config, prompt_tokens: int, max_new_tokens: int) -> Optional[str]:
    """Why a long generation may read as noise: under plain RoPE, positions past
    ``max_position_embeddings`` were never trained (dynamic NTK, the published models' ``rope_scaling``,
    stretches the frequencies for them instead); None when the generation stays within them."""
    end = prompt_tokens + max_new_tokens
    if end <= config.max_position_embeddings or config.rope_type == "dynamic":
        return None
    return (f"the prompt ({prompt_tokens} tokens) and max_new_tokens {max_new_tokens} reach position {end}, past this "
            f"model's max_position_embeddings ({config.max_position_embeddings}) without RoPE scaling: positions beyond "
            "it were never trained and the text degrades there. Shorten the prompt or max_new_tokens.")


def next_token(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
               generator: Optional[torch.Generator]) -> torch.Tensor:
    """[B, V] logits -> [B] token ids. Sampled from softmax(logits / temperature) as
    softmax((logits - max) / temperature), the same distribution: a tiny temperature (1e-45) overflows
    logits / temperature to inf (NaN probabilities), but never a difference that is at most 0."""
    if temperature <= 0:
        return logits.float().argmax(-1)  # the same token; a bf16 argmax is 5x slower on CPU
    logits = logits.float()
    logits = (logits - logits.max(-1, keepdim=True).values) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p,
        drop[..., 0] = False  # and the most likely token at least (transformers' min_tokens_to_keep)
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def is_left_padded(real: torch.Tensor) -> bool:
    """Whether a [B, T] bool mask of real tokens has padding only before each row's first real token."""
    return not bool((real[:, :-1] & ~real[:, 1:]).any()) and bool(real[:, -1].all())


def inferred_attention_mask(input_ids: torch.Tensor, pad: Optional[int], eos: Optional[int]) -> Optional[torch.Tensor]:
    """The mask transformers' ``generate`` infers for a batch given without one: the pad token's
    positions, where the pad token occurs and is not the eos; here only for a left-padded batch (the
    padding ``generate`` takes), else None (every token real)."""
    if pad is None or pad == eos or not bool((input_ids == pad).any()):
        return None
    real = input_ids != pad
    return real if is_left_padded(real) else None


def left_padding(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The [B, T] bool mask of a left-padded batch, None when no row is padded; a row with padding after
    a real token is refused (generation continues each row from the batch's last column)."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    real = attention_mask.bool()
    if not is_left_padded(real):
        raise ValueError("generate got the attention_mask of a right-padded prompt (padding after a real token): "
                         "pad prompts on the left (tokenizer.padding_side = 'left'), as transformers' generate needs.")
    return real


class PaddedStep:
    """Generation steps of a left-padded batch through the model's own cached forward, with the
    attention mask and each row's positions (the padding left out: transformers' position ids); the
    decoder's one shared position per step does not apply."""

    def __init__(self, model: DogeForCausalLM, cache: KVCache, mask: torch.Tensor) -> None:
        self.model, self.cache, self.mask = model, cache, mask
        self.positions = (mask.long().cumsum(-1) - 1).clamp(min=0)

    def prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, attention_mask=self.mask, position_ids=self.positions, cache=self.cache).logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(tokens), 1)], dim=1)
        self.positions = self.positions[:, -1:] + 1
        return self.prompt(tokens[:, None])


@torch.no_grad()
def generate(
    model: DogeForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Union[int, None, str] = "config",
    generator: Optional[torch.Generator] = None,
    attention_mask: Optional[torch.Tensor] = None,
    compile: bool = False,
    pad_token_id: Optional[int] = None,
    vocab_limit: Optional[int] = None,
) -> torch.Tensor:
    """``input_ids`` [B, T] -> [B, T + new]; rows that emitted ``eos_token_id`` go on with ``pad_token_id``
    (default the config's, else the eos), as transformers' ``generate`` pads them. ``eos_token_id`` is
    the model config's by default, as transformers' generation config has it; None generates every token.
    ``vocab_limit`` samples only ids below it: a tokenizer with fewer ids than the model's (padded)
    vocabulary cannot decode the others.

    ``attention_mask`` [B, T] (1 for real tokens) batches prompts of different lengths left-padded, as
    transformers' ``generate`` takes them: padding is not attended and each row's positions start at
    its first real token, so a row gets the tokens of its prompt alone. Without a mask, a left-padded
    batch's is inferred from ``pad_token_id`` (default the config's), as transformers infers it. ``compile`` runs the decode
    steps as one compiled graph (``decode.prepared_step``): several times fewer milliseconds per token
    at batch 1 after a compile of about 20 s, done once per model, batch size and length bucket. It
    applies where the decode step does (prompts without padding, the single-device model, within the
    keep window); elsewhere the steps run as they would without it. The loop runs in eval and
    inference mode (about 10% less dispatch per operation than no_grad at batch 1); the model is left
    in the mode it was in, and the result is an ordinary tensor, so it can feed a training step."""
    check_options(max_new_tokens, temperature, top_k, top_p)
    if eos_token_id == "config":
        eos_token_id = model.config.eos_token_id
    if input_ids.shape[-1] == 0:
        raise ValueError("input_ids is empty: generation needs at least one prompt token.")
    if attention_mask is None:
        attention_mask = inferred_attention_mask(input_ids, pad_token_id if pad_token_id is not None
                                                 else model.config.pad_token_id, eos_token_id)
    padding = left_padding(attention_mask)
    if max_new_tokens == 0:
        return input_ids.clone()
    training = model.training
    model.eval()
    try:
        tokens = [input_ids]
        with torch.inference_mode():
            cache = KVCache()
            step = PaddedStep(model, cache, padding) if padding is not None else None
            logits = step.prompt(input_ids) if step else model(input_ids, cache=cache).logits[:, -1]
            if step is None and Decoder.supports(model):
                step = Decoder(model, cache, input_ids.shape[1] + max_new_tokens, compiled=compile)
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
            pad = next((token for token in (pad_token_id, model.config.pad_token_id, eos_token_id) if token is not None), None)
            for _ in range(max_new_tokens):
                token = next_token(logits[:, :vocab_limit], temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    token = token.masked_fill(finished, pad)
                    finished |= token == eos_token_id
                tokens.append(token[:, None])
                if bool(finished.all()):
                    break
                logits = step.step(token) if step else model(token[:, None], cache=cache).logits[:, -1]
    finally:
        model.train(training)  # as it was: a training loop that samples keeps its dropout
    return torch.cat(tokens, dim=1)  # outside inference mode: an ordinary tensor
