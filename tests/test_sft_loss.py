"""SFT loss masking: the loss the loop trains on is the mean over assistant tokens only, on a
hand-built two-conversation micro-batch (right-padded), against a direct log-softmax computation."""
import numpy as np
import torch

from doge_dist.config import ModelConfig
from doge_dist.data.chat_dataset import SFTDataset, collate_lm, lm_sample
from doge_dist.model import build_model
from doge_dist.train.finetune import SFTTask


class Engine:
    """What the task needs of a DeepSpeed engine: a callable module on a device, ZeRO stage below 3."""

    def __init__(self, module):
        self.module, self.device = module, torch.device("cpu")

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def zero_optimization_partition_weights(self) -> bool:
        return False


def test_sft_loss_is_the_mean_over_assistant_tokens():
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("doge-tiny")).eval()
    # conversation = bos, user turn (mask 0), assistant turn + eos (mask 1), second user turn (mask 0)
    first = (np.array([0, 40, 41, 42, 1, 50, 51, 1, 60, 1]), np.array([0, 0, 0, 0, 0, 1, 1, 1, 0, 0]))
    second = (np.array([0, 70, 1, 80, 81, 82, 1]), np.array([0, 0, 0, 1, 1, 1, 1]))
    batch = collate_lm([lm_sample([first]), lm_sample([second])], pad_id=2)
    task = SFTTask()
    loss_sum, count, _ = task.forward_loss(Engine(model), batch)
    assert task.count(batch) == int(count) == 3 + 4

    with torch.no_grad():
        log_probs = model(batch["input_ids"]).logits.float().log_softmax(-1)
    expected = []
    for row, (ids, mask) in enumerate((first, second)):
        for t in range(1, len(ids)):
            if mask[t]:  # the token at t is trained: predicted from position t - 1
                expected.append(-log_probs[row, t - 1, ids[t]])
    assert torch.allclose(loss_sum / count, torch.stack(expected).mean(), rtol=1e-6, atol=1e-6)


class Conversations:
    """What SFTDataset reads of MaskedSequences: ``lengths`` and (ids, mask) per conversation."""

    def __init__(self, *conversations):
        self.conversations = conversations
        self.lengths = np.array([len(ids) for ids, _ in conversations])

    def __len__(self):
        return len(self.conversations)

    def __getitem__(self, index):
        return self.conversations[index]


def test_packed_conversations_score_as_padded_ones():
    """Packing is a layout, not another objective: each conversation of a packed row attends only to
    itself, so the loss sum and count equal those of the same conversations padded one per row."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_preset("doge-tiny")).eval()
    conversations = Conversations((np.array([0, 40, 41, 42, 1, 50, 51, 1]), np.array([0, 0, 0, 0, 0, 1, 1, 1])),
                                  (np.array([0, 70, 1, 80, 81, 82, 1]), np.array([0, 0, 0, 1, 1, 1, 1])))
    packed = SFTDataset(conversations, 64, packing=True)
    padded = SFTDataset(conversations, 64, packing=False)
    assert len(packed) == 1 and len(padded) == 2
    with torch.no_grad():
        packed_sum, packed_count, _ = SFTTask().forward_loss(Engine(model), collate_lm([packed[0]], pad_id=2))
        padded_sum, padded_count, _ = SFTTask().forward_loss(Engine(model), collate_lm([padded[0], padded[1]], pad_id=2))
    assert int(packed_count) == int(padded_count) == 3 + 4
    assert torch.allclose(packed_sum, padded_sum, rtol=1e-6, atol=1e-6)
