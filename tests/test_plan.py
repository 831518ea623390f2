"""The memory planner (doge_dist/plan.py, launch/plan.py): its model-state bytes against what 2 CPU
ranks of DeepSpeed really hold at ZeRO 1, 2 and 3; activation bytes against torch.cuda's peak on a
GPU; the accumulation that keeps the global batch; and clear errors for impossible layouts."""
import json
import re
import subprocess
import shutil

import pytest
import torch

from doge_dist.config import ConfigError, load_config
from doge_dist.plan import (GB, accumulation_steps, activation_bytes_per_sequence, check_layout, full_logits,
                            loss_workspace_bytes, make_plan, model_states, parameter_groups_numel)
from doge_dist.train.ds_config import read_ds_config, resolve_ds_config
from train_helpers import PYTHON, REPO, _port, env, run_on_a_free_port, scratch

MEASURE = REPO / "tests" / "plan_measure.py"


@pytest.fixture
def plan_cli(monkeypatch, capsys):
    """launch/plan.py's main() in this process (a subprocess costs an interpreter and torch's import per
    call, seconds each); test_cli_is_quiet_about_transformer_engine_and_apex runs the script itself."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("plan_script", REPO / "launch" / "plan.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.chdir(REPO)

    def run(*args) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["launch/plan.py", *args])
        try:
            code = script.main()
        except SystemExit as stop:  # argparse
            code = stop.code
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)

    return run


def _measured(*args: str) -> list[dict]:
    """Per rank, per ZeRO stage in ``args`` ("1", "2", ...): what DeepSpeed holds (``args`` may add overrides)."""
    out = scratch() / "plan_measured.json"
    _, result = run_on_a_free_port(lambda: [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                                            str(_port()), str(MEASURE), str(out), *args])
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


def test_model_states_match_deepspeed_on_two_ranks():
    """Per rank and per kind within 5%: parameters, gradients (after the first micro-batch of two)
    and optimizer states (after the step), for doge-20m in bf16 at ZeRO 1, 2 and 3, and at ZeRO-1
    with fp32 gradient accumulation."""
    import plan_measure

    config = load_config(None, plan_measure.OVERRIDES)
    layout = check_layout(config, 2)
    for rank, per_stage in enumerate(_measured("1", "2", "3", "1+fp32")):
        for stage, measured in per_stage.items():
            ds = resolve_ds_config(plan_measure.ds_config(stage), config.train, 2)
            predicted = model_states(config, ds, layout, rank)
            for kind in ("params", "grads", "optimizer"):
                assert getattr(predicted, kind) == pytest.approx(measured[kind], rel=0.05), (rank, stage, kind)
            if stage == "3":  # the reduce bucket exists from the start at ZeRO-3
                assert measured["buffers"] == 2 * ds["zero_optimization"]["reduce_bucket_size"]


def test_model_states_match_deepspeed_under_expert_parallelism():
    """doge-20m-moe at EP 2 on 2 ranks: ZeRO 1-2 partition over the ranks holding the same expert
    shard (here one), not over the data-parallel size, so each rank keeps the optimizer states of all
    the dense parameters and of its half of the expert tables."""
    import plan_measure

    ep = ["model.preset=doge-20m-moe", "parallel.expert_parallel=2"]
    config = load_config(None, plan_measure.OVERRIDES + ep)
    layout = check_layout(config, 2)
    for per_stage in _measured("1", "2", *ep):
        for stage, measured in per_stage.items():
            ds = resolve_ds_config(read_ds_config(str(REPO / "configs" / f"zero{stage}.json")), config.train, 2)
            predicted = model_states(config, ds, layout)
            for kind in ("params", "grads", "optimizer"):
                assert getattr(predicted, kind) == pytest.approx(measured[kind], rel=0.05), (stage, kind)


def test_experts_that_do_not_split_over_expert_parallel_ranks_are_refused():
    """As the trainer refuses them (doge_dist.train.preflight), before any plan is printed."""
    config = load_config(str(REPO / "configs" / "doge_20m_moe.yaml"), ["model.num_experts=1089", "parallel.expert_parallel=2"])
    with pytest.raises(ConfigError, match=r"num_experts \(1089\) is not divisible by parallel.expert_parallel \(2\)"):
        check_layout(config, 2)


@pytest.mark.parametrize("recipe", sorted(path.name for path in (REPO / "configs").glob("doge_*.yaml")
                                            if path.name != "doge_tiny_cpu.yaml"))
def test_single_gpu_recipes_quote_the_plan(recipe):
    """Each RTX 4090 recipe's "Why it fits 24 GB" comment states what launch/plan.py prints for it."""
    from doge_dist.plan import largest_micro_batch

    config = load_config(str(REPO / "configs" / recipe))
    plan = make_plan(config, config, read_ds_config(str(REPO / config.run.ds_config)), 1, 24.0, 1.5)
    s = plan.states
    checkpointed = " checkpointed" if plan.checkpointing else ""
    fits = "fits" if plan.total <= plan.gpu_bytes else "does NOT fit"
    expected = [
        f"python launch/plan.py --config configs/{recipe} --gpus 1 --gpu-mem-gb 24, ZeRO-{plan.stage};",
        f"parameters {s.params / GB:.2f} + gradients {s.grads / GB:.2f} + optimizer {s.optimizer / GB:.2f} + "
        f"buffers {s.buffers / GB:.2f} = {s.total / GB:.2f} GB;",
        f"activations {plan.per_sequence / GB:.2f} GB per sequence ({plan.per_sequence_checkpointed / GB:.2f} checkpointed) "
        f"+ a loss workspace of {plan.loss_workspace / GB:.2f} GB per micro-batch;",
        f"micro {plan.micro_batch}{checkpointed}: {plan.total / GB:.2f} GB with a 1.5 GB reserve, {fits}; largest micro "
        f"{largest_micro_batch(plan.free_for_activations, plan.per_sequence)} "
        f"({largest_micro_batch(plan.free_for_activations, plan.per_sequence_checkpointed)} checkpointed)",
    ]
    text = (REPO / "configs" / recipe).read_text()
    for line in expected:
        assert line in text, line


def _cdmoe_saved_bytes_per_token(rank: int, world_size: int) -> tuple[float, float]:
    """Bytes autograd keeps per token for one bf16 doge-20m-moe CDMoE layer (parameters not counted):
    on one device, and through the expert-parallel exchange (a group of one rank holds every expert)."""
    import torch.distributed as dist

    from doge_dist.config import ModelConfig
    from doge_dist.model.cdmoe import CDMoE
    from doge_dist.parallel.expert import ExpertParallelCDMoE

    torch.manual_seed(0)
    moe = CDMoE(ModelConfig.from_preset("doge-20m-moe")).to(torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in moe.parameters()}
    x = torch.randn(1, 256, moe.down_embed.embedding_dim, dtype=torch.bfloat16, requires_grad=True)

    def saved() -> float:
        kept = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                kept[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            moe(x)
        return sum(kept.values()) / x.shape[1]

    one_device = saved()
    moe.__class__ = ExpertParallelCDMoE
    moe.ep_group, moe.expert_offset = dist.group.WORLD, 0
    return one_device, saved()


def test_expert_parallel_activations_follow_the_exchange():
    """The expert-parallel exchange keeps more per token than the single-device CDMoE (four [pairs, h]
    tensors instead of one); the planner counts the difference. The MoE part is also not divided by
    tensor parallelism without sequence parallelism (router and expert tables are replicated)."""
    from doge_dist.config import ModelConfig
    from doge_dist.parallel.spawn import run_distributed
    from doge_dist.plan import layer_bytes_per_token

    (one_device, exchange), = run_distributed(_cdmoe_saved_bytes_per_token, 1)
    m = ModelConfig.from_preset("doge-20m-moe")
    predicted = sum(layer_bytes_per_token(m, 1, False, ep=2)) - sum(layer_bytes_per_token(m, 1, False, ep=1))
    assert predicted == pytest.approx(exchange - one_device, rel=0.1)
    dense = ModelConfig.from_preset("doge-20m")
    moe_part = sum(layer_bytes_per_token(m, 2, False)) - sum(layer_bytes_per_token(dense, 2, False))
    assert moe_part == sum(layer_bytes_per_token(m, 1, False)) - sum(layer_bytes_per_token(dense, 1, False))


def test_zero_stages_shrink_what_they_partition():
    """At dp 8 with doge-320m: ZeRO-1 divides the optimizer, ZeRO-2 also (most) gradients, ZeRO-3 parameters."""
    config = load_config(str(REPO / "configs" / "doge_320m.yaml"))
    layout = check_layout(config, 8)
    states = [model_states(config, {"bf16": {"enabled": True}, "zero_optimization": {"stage": s}}, layout) for s in range(4)]
    params = 335_750_272
    assert states[0].optimizer == 12 * params and states[0].params == states[0].grads == 2 * params
    assert states[1].optimizer == pytest.approx(12 * params / 8, rel=1e-3) and states[1].grads == 2 * params
    assert states[2].grads < 0.2 * states[1].grads
    assert states[3].params < 0.15 * states[2].params


def test_loss_path_follows_the_trainer():
    """Chunked loss (a bounded workspace, 2 h per token) below ZeRO-3 on one TP rank; whole logits
    (14 V / tp per token, no workspace) under ZeRO-3 or TP, as forward_loss and the TP model do."""
    config = load_config(str(REPO / "configs" / "doge_20m.yaml"))
    one, two = check_layout(config, 1), check_layout(load_config(str(REPO / "configs" / "doge_60m.yaml"),  # doge-20m's
                                                                 ["parallel.tensor_parallel=2"]), 2)  # 1 kv head does not split
    assert [full_logits(one, stage) for stage in range(4)] == [False, False, False, True]
    assert full_logits(two, 1)
    m, seq = config.model, config.data.seq_length
    chunked = activation_bytes_per_sequence(config, one, False, False)
    assert activation_bytes_per_sequence(config, one, False, True) - chunked == (14 * m.vocab_size - 2 * m.hidden_size) * seq
    rows = 2**28 // m.vocab_size  # one chunk of the GPU loss
    assert loss_workspace_bytes(config, 1000, False) == 6 * 1000 * m.vocab_size + 6 * m.vocab_size * m.hidden_size
    assert loss_workspace_bytes(config, 10**9, False) == loss_workspace_bytes(config, rows, False)
    assert loss_workspace_bytes(config, 10**9, True) == 0


def test_accumulation_keeps_the_global_batch_and_names_the_fix():
    assert accumulation_steps(768, 4, 8) == 24
    assert accumulation_steps(256, 16, 16) == 1
    with pytest.raises(ConfigError, match="not divisible .* GLOBAL_BATCH"):
        accumulation_steps(256, 16, 3)
    with pytest.raises(ConfigError, match="No data-parallel size keeps it with this micro-batch: change"):
        accumulation_steps(100, 16, 3)  # not "one of []"
    config = load_config(str(REPO / "configs" / "doge_20m.yaml"), ["parallel.tensor_parallel=2"])
    with pytest.raises(ConfigError, match=r"--gpus 3 is not a multiple of parallel.tensor_parallel \(2\)"):
        check_layout(config, 3)


@pytest.mark.parametrize("config, overrides, gpus, message", [
    ("doge_320m", ["parallel.tensor_parallel=8"], 8,
     "model.num_key_value_heads = 4 is not divisible by parallel.tensor_parallel = 8"),
    ("doge_60m", ["parallel.tensor_parallel=2", "parallel.sequence_parallel=true", "data.seq_length=1023"], 2,
     "data.seq_length (1023) must be a multiple of parallel.tensor_parallel (2) with parallel.sequence_parallel=true"),
    ("doge_120m_moe", ["parallel.tensor_parallel=2", "parallel.expert_parallel=2", "model.vocab_size=32767"], 4,
     "model.vocab_size (32767) must be a multiple of parallel.tensor_parallel (2) when expert parallelism is on too"),
])
def test_layouts_the_trainer_refuses_are_refused(config, overrides, gpus, message):
    """The plan approved layouts doge_dist.train.preflight refuses (a model that does not split over the
    tensor-parallel ranks, a sequence-parallel seq_length, the tp x ep grid's vocabulary), and slurm/launch.sh
    then started the job: the plan runs the trainer's check itself."""
    loaded = load_config(str(REPO / "configs" / f"{config}.yaml"), overrides)
    with pytest.raises(ConfigError) as error:
        check_layout(loaded, gpus)
    assert str(error.value).startswith(message), error.value


def test_cli_accumulation_refuses_a_model_tensor_parallel_does_not_split(plan_cli):
    """--accumulation (slurm/launch.sh's question) printed 128 for doge-320m on 8 tensor-parallel ranks, which
    its 4 key/value heads cannot split over, and the job was submitted to fail at the trainer's preflight."""
    for extra in ((), ("--accumulation",)):
        result = plan_cli("--config", "configs/doge_320m.yaml", "--gpus", "8", *extra, "parallel.tensor_parallel=8")
        assert result.returncode == 2 and result.stdout == "", result.stdout
        assert result.stderr.startswith("error: model.num_key_value_heads = 4 is not divisible by "
                                        "parallel.tensor_parallel = 8"), result.stderr


@pytest.mark.parametrize("config, ds_config, override, error", [
    ("doge_60m", "zero0", "parallel.tensor_parallel=2", "ZeRO-0 in bf16 with tensor or expert parallelism is not supported"),
    ("doge_120m_moe", "zero3", "parallel.expert_parallel=2", "ZeRO-3 is not supported with it"),
    ("doge_20m", "zero2", "data.seq_length=8192", "data.seq_length (8192) exceeds model.max_position_embeddings (2048)"),
])
def test_cli_accumulation_makes_every_check_the_full_plan_makes(plan_cli, config, ds_config, override, error):
    """--accumulation checked the layout only: slurm/launch.sh submitted runs the DeepSpeed JSON or the sequence
    length made the trainer refuse on every rank (it printed 16, 16 and 2 for these)."""
    for extra in ((), ("--accumulation",)):
        result = plan_cli("--config", f"configs/{config}.yaml", "--ds_config", f"configs/{ds_config}.json", "--gpus", "8",
                          *extra, override)
        assert result.returncode == 2 and result.stdout == "" and error in result.stderr, result.stderr


@pytest.mark.parametrize("overrides, error", [
    (["parallel.tensor_parallel=2", "model.loss_backend=te"], "transformer-engine's cross entropy does not take a vocabulary split"),
    (["train.freeze_dense_steps=5"], "train.freeze_dense_steps is for MoE models"),
    (["train.decay_groups=bogus"], "train.decay_groups = 'bogus' is not one of"),
    (["train.scheduler=cosine", "train.decay_steps=100"], "train.decay_steps = 100 applies to the wsd scheduler only"),
])
def test_the_plan_refuses_the_settings_the_trainer_refuses(overrides, error):
    """The plan's check (slurm/launch.sh's --accumulation) missed the trainer's checks of the loss backend's
    split, the schedule, freezing and decay groups: such jobs were submitted and refused on every rank."""
    from doge_dist.plan import check_run

    config = load_config(str(REPO / "configs" / "doge_60m.yaml"), overrides)
    with pytest.raises(ConfigError, match=re.escape(error)):
        check_run(config, read_ds_config(str(REPO / "configs" / "zero1.json")), 8, "DeepSpeed config 'zero1.json'")


def test_cli_expands_a_home_tilde_in_ds_config(plan_cli, monkeypatch, tmp_path):
    """--ds_config=~/x (no tilde expansion after "=" in the shell) is expanded, as the trainer expands it."""
    shutil.copy(REPO / "configs" / "zero2.json", tmp_path / "zero2.json")
    monkeypatch.setenv("HOME", str(tmp_path))
    result = plan_cli("--config", "configs/doge_20m.yaml", "--ds_config=~/zero2.json", "--gpus", "1", "--accumulation")
    assert result.returncode == 0 and result.stdout.strip() == "16", result.stderr


def test_cli_prints_the_plan_and_one_paragraph_errors(plan_cli):
    run = plan_cli
    out = run("--config", "configs/doge_160m.yaml", "--gpus", "8", "--gpu-mem-gb", "80")
    assert out.returncode == 0, out.stderr
    assert "ZeRO-2" in out.stdout and "global batch 768 = micro 4 x accumulation 24 x dp 8" in out.stdout
    assert run("--config", "configs/doge_160m.yaml", "--gpus", "8", "--accumulation").stdout.strip() == "24"
    missing = run("--config", "configs/nope.yaml")
    assert missing.returncode == 2 and "Config file 'configs/nope.yaml' does not exist" in missing.stderr
    uneven = run("--config", "configs/doge_20m.yaml", "--gpus", "3", "--accumulation")
    assert uneven.returncode == 2 and "not divisible" in uneven.stderr and "Traceback" not in uneven.stderr


def test_cli_accumulation_an_override_fixes(plan_cli):
    """slurm/launch.sh asks --accumulation with the job's overrides: one that sets train.gradient_accumulation_steps
    is the answer (the trainer takes it), not the one that keeps the recipe's global batch; a --global-batch
    (GLOBAL_BATCH) it does not make is refused, not dropped."""
    fixed = ("--config", "configs/doge_20m.yaml", "--gpus", "8", "--accumulation", "train.micro_batch_size=12",
             "train.gradient_accumulation_steps=2")
    assert plan_cli(*fixed).stdout.strip() == "2"
    assert plan_cli(*fixed, "--global-batch", "192").stdout.strip() == "2"  # 12 x 2 x 8
    other = plan_cli(*fixed, "--global-batch", "256")
    assert other.returncode == 2 and other.stdout == ""
    assert other.stderr.startswith("error: The global batch 256 (--global-batch; GLOBAL_BATCH for slurm/launch.sh) is "
                                   "not the train.micro_batch_size 12 x train.gradient_accumulation_steps 2 x "
                                   "data-parallel size 8 = 192"), other.stderr


@pytest.mark.parametrize("args, message", [
    (("--global-batch", "-256", "--accumulation"), "The global batch must be at least 1 sequence, got -256"),
    (("--global-batch", "0", "--accumulation"), "The global batch must be at least 1 sequence, got 0"),
    (("--global-batch", "0",), "The global batch must be at least 1 sequence, got 0"),
    (("train.micro_batch_size=0", "--accumulation"), "train.micro_batch_size must be at least 1, got 0"),
    (("--gpu-mem-gb", "0"), "--gpu-mem-gb must be a finite number more than 0, got 0.0"),
    (("--gpu-mem-gb", "inf"), "--gpu-mem-gb must be a finite number more than 0, got inf"),
    (("--gpu-mem-gb", "nan"), "--gpu-mem-gb must be a finite number more than 0, got nan"),
    (("--reserve-gb", "-5"), "--reserve-gb must be a finite number, 0 or more (memory the model cannot use), got -5.0"),
    (("--reserve-gb", "nan"), "--reserve-gb must be a finite number, 0 or more (memory the model cannot use), got nan"),
    (("--reserve-gb", "inf"), "--reserve-gb must be a finite number, 0 or more (memory the model cannot use), got inf"),
    (("data.seq_length=0",), "data.seq_length must be positive, got 0"),
])
def test_cli_refuses_batches_and_memory_that_are_not_positive(args, message, plan_cli):
    """GLOBAL_BATCH=-256 in slurm/launch.sh came back as accumulation -1 (and the job started), a zero
    global batch was silently the recipe's, a zero micro-batch or sequence length a ZeroDivisionError, a zero GPU
    "does NOT fit", a negative reserve more memory than the GPU has, a memory of inf or nan a ValueError traceback."""
    result = plan_cli("--config", "configs/doge_160m.yaml", *args)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.strip() == f"error: {message}." or result.stderr.startswith(f"error: {message}"), result.stderr


@pytest.mark.parametrize("ds, settings, message", [
    ({"zero_optimization": {"stage": 4}}, (), "zero_optimization.stage must be 0, 1, 2 or 3"),
    ([2], (), "must hold a JSON object of DeepSpeed keys, got list"),
    ({"bf16": True}, (), "'bf16' must be a JSON object"),
    ({"zero_optimization": 2}, (), "'zero_optimization' must be a JSON object"),
    ({"bf16": {"enabled": "auto"}}, (), 'sets bf16.enabled to "auto"'),
    ({"zero_optimization": {"stage": 3}}, ("model.preset=doge-20m-moe", "parallel.expert_parallel=2"),
     "expert parallelism trains with ZeRO 0-2"),
])
def test_cli_checks_the_deepspeed_json_as_the_trainer_does(ds, settings, message, plan_cli, tmp_path):
    """A JSON the trainer refuses printed a plan (stage 4) or an AttributeError traceback ("bf16": true)."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    result = plan_cli("--config", "configs/doge_160m.yaml", "--gpus", "2", "--ds_config", str(path), *settings)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.startswith(f"error: DeepSpeed config '{path}'") and message in result.stderr, result.stderr


@pytest.mark.parametrize("args, message", [
    (("--ds_config", "configs"), "DeepSpeed config 'configs' is a directory; pass the JSON file"),
    (("--gpus", "4", "parallel.tensor_parallel=3"), "--gpus 4 is not a multiple of parallel.tensor_parallel (3): pass a "
                                                    "multiple of 3 as --gpus"),
    (("--gpus", "4", "--accumulation", "parallel.tensor_parallel=3"), "--gpus 4 is not a multiple of"),
])
def test_cli_names_a_directory_as_ds_config_and_gpus_that_tensor_parallel_does_not_divide(args, message, plan_cli):
    """A directory as --ds_config "does not exist"; a tensor-parallel size not dividing --gpus told the
    planner to "launch a multiple of 3 processes" (the trainer's words), not to change --gpus."""
    result = plan_cli("--config", "configs/doge_20m.yaml", *args)
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert result.stderr.startswith(f"error: {message}"), result.stderr


def test_bf16_under_its_old_name_is_planned_as_bf16():
    """DeepSpeed and the trainer read "bfloat16" as "bf16" (ds_config.bf16_enabled); the plan counted 4-byte weights."""
    config = load_config(str(REPO / "configs" / "doge_20m.yaml"))
    plans = [make_plan(config, config, {key: {"enabled": True}}, 1, 24.0, 1.5) for key in ("bf16", "bfloat16")]
    assert plans[0].states == plans[1].states and plans[0].states.params == 2 * sum(map(sum, parameter_groups_numel(config)))


def test_cli_plans_a_finetuning_recipe_as_the_model_of_its_init_from(plan_cli):
    """The SFT/DPO recipes have no model section: launch/sft.py and dpo.py train the model of
    run.init_from, so the plan counts that one (not ModelConfig's defaults, 403M parameters); before
    init_from exists, the plan says which override stands in for it."""
    from doge_dist.config import ModelConfig
    from doge_dist.convert.hf import save_hf
    from doge_dist.model import build_model
    from doge_dist.model.flops import parameter_count

    run = plan_cli
    pretrained = ModelConfig.from_preset("doge-tiny")
    init_from = scratch() / "pretrained"
    save_hf(build_model(pretrained), str(init_from), None)
    for model_overrides in ((), ("model.attn_backend=eager",)):  # an override changes init_from's model, not the defaults
        out = run("--config", "configs/sft_doge_20m.yaml", f"run.init_from={init_from}", "data.seq_length=256",  # doge-tiny's positions
                  *model_overrides)
        assert out.returncode == 0, out.stderr
        assert f"{parameter_count(pretrained) / 1e6:.1f}M params" in out.stdout
    weightless = scratch() / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((init_from / "config.json").read_text())
    out = run("--config", "configs/sft_doge_20m.yaml", f"run.init_from={weightless}")  # a FileNotFoundError traceback
    assert out.returncode == 2 and "Traceback" not in out.stderr and "safetensors" in out.stderr, out.stderr[-2000:]
    missing = run("--config", "configs/sft_doge_20m.yaml", "run.init_from=runs/no_such_run")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "run.init_from" in missing.stderr and "model.preset=" in missing.stderr
    out = run("--config", "configs/sft_doge_20m.yaml", "run.init_from=runs/no_such_run", "model.preset=doge-20m")
    assert out.returncode == 0 and "13.1M params" in out.stdout, out.stderr
    # --accumulation checks the layout against init_from's model too: doge-tiny's 2 key/value heads do not
    # split over 4 tensor-parallel ranks (ModelConfig's defaults, which it checked, do)
    out = run("--config", "configs/sft_doge_20m.yaml", "--gpus", "4", "--accumulation", f"run.init_from={init_from}",
              "parallel.tensor_parallel=4")
    assert out.returncode == 2 and out.stdout == "", out.stdout
    assert out.stderr.startswith("error: model.num_key_value_heads = 2 is not divisible by parallel.tensor_parallel = 4")


def test_cli_is_quiet_about_transformer_engine_and_apex():
    """megatron-core's import-time "Transformer Engine and Apex are not installed" warnings are filtered
    by the doge_dist package itself, so entry points that reach megatron.core without doge_dist.data
    (plan.py through doge_dist.parallel) print none of them either."""
    quiet = {k: v for k, v in env().items() if k != "PYTHONWARNINGS"}  # env() hides every warning
    out = subprocess.run([PYTHON, "launch/plan.py", "--config", "configs/doge_tiny_cpu.yaml", "--gpus", "1"],
                         cwd=REPO, env=quiet, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "Transformer Engine and Apex" not in out.stderr
    assert "Setting accelerator to CPU" not in out.stdout  # DeepSpeed's, on a machine without a GPU

@pytest.mark.cuda
def test_activation_prediction_matches_cuda_peak():
    """doge-60m, seq 2048, bf16, FlexAttention: the peak of one forward+backward above the model's
    own bytes, within 15% of the prediction, for both of the trainer's loss paths (chunked below
    ZeRO-3, whole logits under it), with and without activation checkpointing."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: activation bytes depend on the CUDA FlexAttention path")
    from doge_dist.model import build_model, shift_labels
    from doge_dist.train.engine import enable_activation_checkpointing

    for checkpointing in (False, True):
        for whole in (False, True):
            config = load_config(str(REPO / "configs" / "doge_60m.yaml"), [f"train.activation_checkpointing={checkpointing}"])
            model = build_model(config.model).cuda().bfloat16()
            if checkpointing:
                enable_activation_checkpointing(model)
            ids = torch.randint(0, config.model.vocab_size, (2, config.data.seq_length), device="cuda")
            labels = shift_labels(ids)
            for _ in range(2):  # the second pass measures: compiled kernels and gradients already exist
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(ids, compute_logits=whole)
                    if whole:
                        loss = model.loss_sum(out.logits, labels)[0]
                    else:
                        loss = model.hidden_loss_sum(out.hidden_states, labels)[0]
                loss.backward()
                del out, loss
                peak = torch.cuda.max_memory_allocated() - base
            predicted = (2 * activation_bytes_per_sequence(config, check_layout(config, 1), checkpointing, whole)
                         + loss_workspace_bytes(config, 2 * config.data.seq_length, whole))
            print(f"checkpointing={checkpointing} whole_logits={whole}: predicted {predicted / GB:.2f} GB, "
                  f"measured {peak / GB:.2f} GB")
            assert peak == pytest.approx(predicted, rel=0.15)


@pytest.mark.parametrize("reference", ["model", "precomputed"])
def test_a_dpo_sample_is_a_pair_with_whole_logits_and_the_reference_model(reference):
    """launch/dpo.py runs chosen and rejected through the policy and reads their whole logits; with
    finetune.reference=model every rank holds the frozen reference in bf16 (planned as SFT, a DPO run
    of the 20M recipe counted a quarter of its activations and no reference)."""
    from doge_dist.model.flops import parameter_count

    config = load_config(str(REPO / "configs" / "dpo_doge_20m.yaml"), ["model.preset=doge-20m", f"finetune.reference={reference}"])
    ds = read_ds_config(str(REPO / config.run.ds_config))
    sft, dpo = make_plan(config, config, ds, 1, 24.0, 1.5), make_plan(config, config, ds, 1, 24.0, 1.5, task="dpo")
    layout = check_layout(config, 1)
    assert dpo.per_sequence == 2 * activation_bytes_per_sequence(config, layout, False, whole_logits=True) > 2 * sft.per_sequence
    assert dpo.loss_workspace == 0.0 and dpo.pairs and not sft.pairs
    assert dpo.states.reference == (2.0 * parameter_count(config.model) if reference == "model" else 0.0)
    assert dpo.states.total == sft.states.total + dpo.states.reference
    with pytest.raises(ConfigError, match="task 'ppo': plan one of pretrain, sft, dpo"):
        make_plan(config, config, ds, 1, 24.0, 1.5, task="ppo")
