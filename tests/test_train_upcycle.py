"""Dense -> sparse continuation end to end: launch/upcycle.py keeps the dense function exactly, and
with train.freeze_dense_steps only the new router/expert tables change during the freeze, and the
frozen weights get no gradient (none in the clipping norm, AdamW's moments or its step counts), as
small-doge's MoE warm-up sets requires_grad=False on them."""
import subprocess

import torch

import data_helpers
from doge_dist.config import ModelConfig
from doge_dist.convert.hf import load_hf, save_hf
from doge_dist.convert.upcycle import is_new_moe_parameter
from doge_dist.model import build_model
from doge_dist.train.export import load_checkpoint_model
from model_helpers import perturb_all, unique_tokens
from train_helpers import PYTHON, REPO, env, pretrain, scalars, scratch


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
    pretrain(run, 3, nproc=1, launcher="python", save_interval=5,  # ZeRO-3: AdamW steps flat sub-groups
             **{"model.preset": "doge-tiny-moe", "run.init_from": str(tmp_path / "moe"), "train.freeze_dense_steps": 5})
    inherited_lr = scalars(run, "train/lr_inherited")  # beside train/lr, the new tables' schedule
    assert [inherited_lr[step] for step in range(1, 6)] == [0.0] * 5 and max(inherited_lr.values()) > 0.0, inherited_lr
    start = dict(moe.named_parameters())
    for step, dense_should_move in ((5, False), (10, True)):
        trained = dict(load_checkpoint_model(run / "checkpoints" / f"step_{step:08d}").named_parameters())
        for name, param in trained.items():
            moved = not torch.equal(param, start[name])
            assert moved == (dense_should_move or is_new_moe_parameter(name)), (step, name)
    for step, frozen_moments in ((5, 0.0), (10, None)):  # AdamW's first moments of the frozen groups
        states = torch.load(run / "checkpoints" / f"step_{step:08d}" / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                            weights_only=False)
        optimizer = states["optimizer_state_dict"]["optimizer_state_dict"]
        frozen = [i for group in optimizer["param_groups"] if group.get("frozen_until") for i in group["params"]]
        assert frozen and len(frozen) < len(optimizer["state"])
        largest = max(optimizer["state"][i]["exp_avg"].abs().max().item() for i in frozen)
        assert largest == 0.0 if frozen_moments == 0.0 else largest > 0.0, (step, largest)
        # AdamW's step counts (its bias correction): the released weights start as under a fresh AdamW, as
        # after small-doge's warm-up restart; counted through the freeze, their first updates were ~3x larger
        counts = {i: int(state["step"]) for i, state in optimizer["state"].items()}
        assert {counts[i] for i in frozen} == {step - 5}, (step, counts)
        assert {count for i, count in counts.items() if i not in frozen} == {step}, (step, counts)
