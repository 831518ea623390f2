"""Dense -> sparse continuation end to end: launch/upcycle.py keeps the dense function exactly, and
with train.freeze_dense_steps only the new router/expert tables change during the freeze."""
import subprocess

import torch

import data_helpers
from doge_dist.config import ModelConfig
from doge_dist.convert.hf import load_hf, save_hf
from doge_dist.convert.upcycle import is_new_moe_parameter
from doge_dist.model import build_model
from doge_dist.train.export import load_checkpoint_model
from model_helpers import perturb_all, unique_tokens
from train_helpers import PYTHON, REPO, env, pretrain, scratch


def test_upcycle_then_freeze_phase(tmp_path):
    dense = build_model(ModelConfig.from_preset("doge-tiny"))
    perturb_all(dense)
    tokenizer = data_helpers.assets().tokenizer_model.parent
    save_hf(dense, tmp_path / "dense", tokenizer=tokenizer)
    command = [PYTHON, str(REPO / "launch" / "upcycle.py"), "--checkpoint", str(tmp_path / "dense"),
               "--preset", "doge-tiny-moe", "--output", str(tmp_path / "moe")]
    subprocess.run(command, cwd=REPO, env=env(), check=True, capture_output=True, text=True)
    moe = load_hf(tmp_path / "moe")
    ids = unique_tokens(2, 16, 512)
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, dense(ids).logits)

    run = scratch() / "upcycled"
    pretrain(run, 0, nproc=1, launcher="python", save_interval=5,
             **{"model.preset": "doge-tiny-moe", "run.init_from": str(tmp_path / "moe"), "train.freeze_dense_steps": 5})
    start = dict(moe.named_parameters())
    for step, dense_should_move in ((5, False), (10, True)):
        trained = dict(load_checkpoint_model(run / "checkpoints" / f"step_{step:08d}").named_parameters())
        for name, param in trained.items():
            moved = not torch.equal(param, start[name])
            assert moved == (dense_should_move or is_new_moe_parameter(name)), (step, name)
