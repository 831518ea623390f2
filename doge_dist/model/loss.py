"""Next-token cross entropy as (sum over tokens, number of tokens), so that gradient accumulation
and data parallelism can divide by the token count of the whole global batch exactly."""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Labels for next-token prediction: position t predicts token t+1; the last and padded ones are ignored."""
    labels = input_ids.clone()
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of fp32 token losses, number of counted tokens); ``labels`` already aligned with ``logits``."""
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, (labels != IGNORE_INDEX).sum()
