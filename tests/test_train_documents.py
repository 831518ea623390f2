"""data.reset_attention_mask trains (it was refused before): the trainer derives document ids from
the end-of-document tokens and the model keeps attention inside each document (the model-level
oracle is tests/test_model_documents.py), so the losses differ from a run that only resets positions.
The corpus is cut into short documents so that every 64-token sample packs several."""
import math

from data_helpers import assets, quiet, write_jsonl
from doge_dist.data import preprocess
from train_helpers import losses, pretrain, scratch


def test_reset_attention_mask_keeps_attention_inside_documents():
    words = " ".join(assets().texts()).split()
    short = [{"text": " ".join(words[i : i + 12])} for i in range(0, 12 * 400, 12)]
    prefix = str(scratch() / "short_documents")
    preprocess(write_jsonl(scratch() / "short.jsonl", short), prefix, str(assets().tokenizer_model),
               append_eod=True, workers=1, log=quiet)
    runs = {}
    for masked in (False, True):
        run_dir = scratch() / f"documents_{masked}"
        pretrain(run_dir, 0, nproc=1, launcher="python", micro_batch_size=2, max_steps=3, warmup_steps=1, decay_steps=1,
                 **{"data.train_data": f"[{prefix}_text_document]", "data.cache_dir": str(scratch() / "short_cache"),
                    "data.reset_position_ids": "true", "data.reset_attention_mask": str(masked).lower()})
        runs[masked] = losses(run_dir)
    assert len(runs[True]) == len(runs[False]) == 3 and all(math.isfinite(x) for x in runs[True])
    assert abs(runs[True][0] - runs[False][0]) > 1e-4
