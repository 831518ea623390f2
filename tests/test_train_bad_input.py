"""Bad input fails before any model is built, in one paragraph naming the key or file and the fix."""
import json
import re
import socket
import subprocess

import pytest

from doge_dist.config import ConfigError, load_config
from doge_dist.data import DataError
from doge_dist.train.checkpoint import META, check_model_shape
from doge_dist.train.preflight import check_run
from train_helpers import PYTHON, REPO, base_overrides, env, scratch

ZERO1 = {"bf16": {"enabled": True}, "gradient_clipping": 1.0, "zero_optimization": {"stage": 1}}


def _config(*extra):
    return load_config(None, base_overrides(scratch() / "unused") + list(extra))


def _check(config, ds=ZERO1, world=2):
    return check_run(config, ds, world, "DeepSpeed config 'x.json'")


def test_good_config_passes():
    layout, ds = _check(_config("train.micro_batch_size=2", "train.gradient_accumulation_steps=3"))
    assert layout.dp_size == 2 and ds["train_batch_size"] == 12 and ds["train_micro_batch_size_per_gpu"] == 2


def test_unknown_yaml_key_names_the_closest():
    with pytest.raises(ConfigError, match="Did you mean 'micro_batch_size'"):
        _config("train.micro_batchsize=2")


def test_missing_data_prefix():
    with pytest.raises(DataError, match="missing .*nowhere_text_document.bin"):
        _check(_config(f"data.train_data=[{scratch()}/nowhere_text_document]"))


def test_missing_tokenizer():
    with pytest.raises(DataError, match="does not exist"):
        _check(_config("data.tokenizer=/no/such/tokenizer.model"))


def test_tokenizer_and_model_vocab_mismatch():
    with pytest.raises(ConfigError, match=r"has 512 ids but model.vocab_size is 32768.*model.vocab_size=512"):
        _check(_config("model.vocab_size=32768"))


@pytest.mark.parametrize("split", ["100,0", "'100'", "100"])  # "100" gives the validation split no weight too
def test_evaluation_without_a_validation_split(split):
    with pytest.raises(ConfigError, match="gives the validation split no weight"):
        _check(_config(f"data.split={split}"))


def test_world_size_not_divisible_by_parallel_sizes():
    with pytest.raises(ConfigError, match=r"world size \(3 processes\) is not a multiple of parallel.tensor_parallel \(2\)"):
        _check(_config("parallel.tensor_parallel=2"), world=3)
    with pytest.raises(ConfigError, match="num_key_value_heads"):  # doge-tiny has 2 key/value heads
        _check(_config("parallel.tensor_parallel=4"), world=4)
    with pytest.raises(ConfigError, match=r"model.vocab_size \(513\) must be a multiple of parallel.tensor_parallel \(2\)"):
        _check(_config("model.preset=doge-tiny-moe", "model.vocab_size=513", "parallel.tensor_parallel=2",
                       "parallel.expert_parallel=2"), world=4)
    with pytest.raises(ConfigError, match="needs a MoE model"):
        _check(_config("parallel.expert_parallel=2"), world=2)
    with pytest.raises(ConfigError, match=r"data.seq_length \(63\) must be a multiple of parallel.tensor_parallel \(2\)"):
        _check(_config("data.seq_length=63", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"), world=2)


def test_impossible_batch_arithmetic_in_the_json():
    with pytest.raises(ConfigError, match="train_batch_size = 64, but the YAML gives 8"):
        _check(_config("train.micro_batch_size=2", "train.gradient_accumulation_steps=2"), {**ZERO1, "train_batch_size": 64})
    with pytest.raises(ConfigError, match=r"train.micro_batch_size must be at least 1, got 0"):  # when the config is read
        _check(_config("train.micro_batch_size=0"))


def test_misspelled_deepspeed_keys_name_the_key():
    """DeepSpeed ignores unknown top-level keys (a misspelled section would train at ZeRO-0) and refuses
    unknown keys in its sections only once the model is built: both fail here, naming the key."""
    with pytest.raises(ConfigError, match="has the key 'zero_optimisation', which DeepSpeed would ignore: did you mean 'zero_optimization'"):
        _check(_config(), {"zero_optimisation": {"stage": 2}})
    with pytest.raises(ConfigError, match=r"x.json'?: zero_optimization.stag: Extra inputs are not permitted"):
        _check(_config(), {**ZERO1, "zero_optimization": {"stag": 2}})
    with pytest.raises(ConfigError, match="bf16.enable: Extra inputs are not permitted"):
        _check(_config(), {**ZERO1, "bf16": {"enable": True}})
    _check(_config(), {**ZERO1, "tensorboard": {"enabled": False}, "comms_logger": {"enabled": False}})  # DeepSpeed's own keys pass


@pytest.mark.parametrize("key, fix", [
    ("zero", "did you mean 'zero_optimization'?"),  # trained at ZeRO-0
    ("max_grad_norm", "did you mean 'gradient_clipping'?"),  # clipped at 1.0, not at the norm given
    ("clip_grad", "did you mean 'gradient_clipping'?"),
    ("notes", r"remove it \(DeepSpeed's keys: https://www.deepspeed.ai/docs/config-json/\)."),
])
def test_keys_deepspeed_does_not_read_are_refused(key, fix):
    """DeepSpeed ignores a top-level key it does not read, without a word; only near-misspellings of its keys
    were refused, so {"zero": {"stage": 2}} trained at ZeRO-0 and {"max_grad_norm": 0.3} clipped at 1.0."""
    with pytest.raises(ConfigError, match=rf"x.json' has the key '{key}', which DeepSpeed would ignore: {fix}"):
        _check(_config(), {**ZERO1, key: {"stage": 2} if key == "zero" else 0.3})


@pytest.mark.parametrize("key, value, fix", [
    ("activation_checkpointing", {"partition_activations": True}, "train.activation_checkpointing=true"),
    ("optimizer", {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95]}}, "train.lr, train.adam_beta1, train.adam_beta2"),
    ("scheduler", {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10}}, "train.scheduler (wsd or cosine), train.warmup_steps"),
    ("fp16", {"enabled": True}, "use \"bf16\": {\"enabled\": true} or train.bf16=true"),
])
def test_deepspeed_sections_doge_dist_does_not_use_name_the_run_config_keys(key, value, fix):
    """DeepSpeed's "activation_checkpointing" configures deepspeed.checkpointing, which doge-dist never calls:
    it was accepted and changed nothing. "optimizer", "scheduler" and "fp16" were refused with one message
    that named none of the run config's keys to use instead."""
    with pytest.raises(ConfigError, match=rf"x.json' sets '{key}', which doge-dist takes from the run config instead: .*"
                                          rf"{re.escape(fix)}.* Remove the key."):
        _check(_config(), {**ZERO1, key: value})


@pytest.mark.parametrize("ds, message", [
    ({"data_efficiency": {"enabled": True, "data_sampling": {"curriculum_learning": {"enabled": True}}}},
     "enables 'data_efficiency': DeepSpeed applies its curriculum and data sampling only in its own data loader"),
    ({"checkpoint": {"load_universal": True}}, "sets checkpoint.load_universal: a resume that changes the parallel sizes"),
    ({"data_types": {"grad_accum_type": "fp32"}},
     "has data_types.grad_accum_type, which DeepSpeed would ignore: did you mean 'data_types.grad_accum_dtype'?"),
    ({"checkpoint": {"use_node_local_storag": True}},
     "has checkpoint.use_node_local_storag, which DeepSpeed would ignore: did you mean 'checkpoint.use_node_local_storage'?"),
    ({"flops_profiler": {"enabeld": True}}, "has flops_profiler.enabeld, which DeepSpeed would ignore: did you mean 'flops_profiler.enabled'?"),
    ({"data_types": {"param_dtype": "bf16"}}, "sets data_types.param_dtype = 'bf16', but the run trains in fp32"),
    ({"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}}, "supports only with ZeRO-Offload's CPU Adam"),
    ({"bf16": {"enabled": True, "bf16_optimizer_states": True}}, "bf16_optimizer_states requires bf16_master_weights_and_grads"),
    ({"zero_optimization": {"stage": 2}, "prescale_gradients": True}, "not support at ZeRO stage 2 with reduce_scatter"),
    ({"zero_optimization": {"stage": 3}, "gradient_predivide_factor": 2.0}, "not support at ZeRO stage 3 with reduce_scatter"),
    ({"data_types": {"param_dtype": "bfloat"}}, "data_types.param_dtype = 'bfloat' is not a dtype DeepSpeed knows"),
    ({"data_types": {"grad_accum_dtype": "fp33"}}, "data_types.grad_accum_dtype = 'fp33' is not a dtype DeepSpeed knows"),
])
def test_deepspeed_settings_that_would_do_nothing_or_fail_in_its_engine_are_refused(ds, message):
    """Each was accepted: a DeepSpeed data-efficiency curriculum changed nothing (doge-dist has its own loader),
    load_universal crashed every resume, a misspelled key inside data_types (or checkpoint, flops_profiler)
    was ignored without a word (gradients accumulated in bf16), and the rest failed in deepspeed.initialize
    with an assertion traceback once the model was built."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        _check(_config(), {**ZERO1, **ds})


def test_deepspeed_settings_it_reads_pass():
    _check(_config(), {**ZERO1, "data_types": {"grad_accum_dtype": "fp32"}, "checkpoint": {"use_node_local_storage": True},
                       "flops_profiler": {"enabled": False}, "data_efficiency": {"enabled": False}, "prescale_gradients": False})
    _check(_config("train.bf16=true"), {**ZERO1, "data_types": {"param_dtype": "bf16"}})
    _check(_config(), {**ZERO1, "data_types": {"keep_in_fp32_modules": "auto"}})  # DeepSpeed's own default, not HF's placeholder


def test_a_monitor_whose_library_is_missing_is_refused(monkeypatch):
    """"wandb": {"enabled": true} without wandb installed failed in deepspeed.initialize (ModuleNotFoundError on
    every rank; torchrun killed the others)."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "wandb" else find_spec(name, *args))
    with pytest.raises(ConfigError, match="enables 'wandb', but wandb is not installed: pip install wandb"):
        _check(_config(), {**ZERO1, "wandb": {"enabled": True, "project": "x"}})


def test_checkpoint_of_another_shape_names_the_tensor():
    tag = scratch() / "shape_ckpt" / "step_00000001"
    tag.mkdir(parents=True, exist_ok=True)
    small = _config().model
    (tag / META).write_text(json.dumps({"step": 1, "dp_size": 1, "model": {**small.to_dict(), "hidden_size": 96, "head_dim": None}}))
    with pytest.raises(ConfigError, match="tensor 'model.embed_tokens.weight' has shape \\(512, 96\\)"):
        check_model_shape(tag.parent, tag.name, small)


def test_checkpoint_of_another_head_dim_names_the_field():
    """A head_dim that does not tile hidden_size is a valid shape: resuming a model.head_dim=8 run
    without that override named only a tensor, not the field that differs nor the override that fixes it."""
    tag = scratch() / "head_dim_ckpt" / "step_00000001"
    tag.mkdir(parents=True, exist_ok=True)
    small = _config().model
    (tag / META).write_text(json.dumps({"step": 1, "dp_size": 1, "model": {**small.to_dict(), "head_dim": 8}}))
    with pytest.raises(ConfigError, match=r"The checkpoint has model.head_dim=8 \(this run 16\): set model.head_dim=8\.$"):
        check_model_shape(tag.parent, tag.name, small)


def test_init_optimizer_without_a_checkpoint_to_take_them_from(tmp_path):
    """run.init_optimizer with no run.init_from, or with a Hugging Face directory (no optimizer states),
    was ignored without a word: the run started with a fresh optimizer."""
    with pytest.raises(ConfigError, match="run.init_optimizer takes the optimizer states of run.init_from's checkpoint, but run.init_from is not set"):
        _check(_config("run.init_optimizer=true"))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=f"run.init_from is '{tmp_path}', a Hugging Face directory"):
        _check(_config(f"run.init_from={tmp_path}", "run.init_optimizer=true"))


def test_a_run_resume_that_is_no_mode_and_no_checkpoint_is_refused_before_any_work(tmp_path):
    """Found by the pre-build checks (and launch/plan.py's), not only once the process group and the run
    directory's lock exist."""
    with pytest.raises(ConfigError, match=r"run.resume = '.*no_such_run' is neither auto, never, nor an existing checkpoint"):
        _check(_config(f"run.resume={tmp_path / 'no_such_run'}"))
    with pytest.raises(ConfigError, match="run.resume = 'Auto' is neither auto, never"):
        _check(_config("run.resume=Auto"))
    _check(_config(f"run.resume={tmp_path}"))


def test_command_line_prints_one_paragraph_and_exits_2():
    cmd = [PYTHON, "launch/pretrain.py", "--ds_config", "configs/zero1.json"] + base_overrides(scratch() / "cli") + ["train.warmup_stepz=3"]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: Unknown key 'warmup_stepz'") and "Did you mean 'warmup_steps'" in result.stderr
    assert "Traceback" not in result.stderr and not (scratch() / "cli").exists()


def test_a_taken_rendezvous_port_is_named():
    """Two runs on one machine with the launcher's default port: the second says so and how to move."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cmd = [PYTHON, "launch/pretrain.py", "--ds_config", "configs/zero0.json"] + base_overrides(scratch() / "port")
        launched = dict(env(), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        result = subprocess.run(cmd, cwd=REPO, env=launched, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: The rendezvous port {port} (MASTER_PORT) is taken" in result.stderr
    assert "deepspeed --master_port N" in result.stderr


def test_overrides_may_come_before_the_options():
    """``launch/pretrain.py --config X train.max_steps=20 --ds_config Y run.dir=Z``: every override is read."""
    cmd = [PYTHON, "launch/pretrain.py"] + base_overrides(scratch() / "cli_mixed") + ["--ds_config", "configs/zero1.json",
                                                                                      "train.warmup_stepz=3"]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    assert result.returncode == 2 and "unrecognized arguments" not in result.stderr
    assert result.stderr.strip().startswith("error: Unknown key 'warmup_stepz'")


def test_the_local_rank_flag_of_torch_distributed_launch_is_accepted():
    """``python -m torch.distributed.launch`` passes --local-rank=N (the deepspeed launcher's --local_rank=N
    runs in every deepspeed-launched test): read and ignored (LOCAL_RANK is in the environment too)."""
    cmd = [PYTHON, "launch/pretrain.py", "--local-rank=0", "--ds_config", "configs/zero1.json"] + base_overrides(scratch() / "cli_local_rank") + ["train.warmup_stepz=3"]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True)
    assert result.returncode == 2 and "unrecognized arguments" not in result.stderr, result.stderr
    assert result.stderr.strip().startswith("error: Unknown key 'warmup_stepz'")


@pytest.mark.parametrize("variables, message", [
    ({"RANK": "1"}, "RANK is set but not WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "RANK=2 is not below WORLD_SIZE=2"),
    ({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"},
     "WORLD_SIZE='two' is not a whole number"),
])
def test_a_launch_environment_set_in_part_is_named(variables, message, monkeypatch):
    """A RANK alone sent DeepSpeed looking for MPI ('No module named mpi4py'); a rank at or above the
    world size, or not a number, was never checked."""
    from doge_dist.train.distributed import LAUNCH_VARIABLES, LaunchEnvironmentError, launcher_world_size

    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(LaunchEnvironmentError, match=message):
        launcher_world_size()


def test_more_ranks_per_node_than_gpus_is_named(monkeypatch):
    """deepspeed --num_gpus 2 on a one-GPU machine (make demo on an RTX 4090) starts a second rank that
    failed in torch.cuda.set_device with 'invalid device ordinal'."""
    import torch

    from doge_dist.train.distributed import LaunchEnvironmentError, launcher_world_size

    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LaunchEnvironmentError, match=re.escape("LOCAL_RANK=1, but this machine shows 1 CUDA device(s)")):
        launcher_world_size()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launcher_world_size() == 2


def test_a_world_size_left_in_the_shell_is_named_before_any_work():
    """WORLD_SIZE=2 under plain python sized the batch for a rank that never came: DeepSpeed's batch
    assertion once the model was built. Now one paragraph, said by every process (the rank that would
    say it is unknown), before any model or run file."""
    cmd = [PYTHON, "launch/pretrain.py", "--ds_config", "configs/zero0.json"] + base_overrides(scratch() / "cli_env")
    result = subprocess.run(cmd, cwd=REPO, env=dict(env(), WORLD_SIZE="2"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().startswith("error: WORLD_SIZE is set but not RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT")
    assert "torchrun" in result.stderr and not (scratch() / "cli_env").exists()


@pytest.mark.parametrize("outcome", ["done", "bad input"])
def test_the_process_group_is_destroyed_before_exit(outcome, monkeypatch):
    """report_errors (behind launch/*.py) destroys the process group a run made, on success and on
    the errors every rank reaches alike, instead of leaving it to the interpreter's teardown."""
    import torch.distributed as dist

    from doge_dist.train.cli import report_errors
    from doge_dist.train.distributed import _free_port

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))

    def run():
        dist.init_process_group("gloo", rank=0, world_size=1)
        if outcome == "bad input":
            raise ConfigError("train.lr = 'abc' is not a number.")

    assert report_errors(run) == (0 if outcome == "done" else 2)
    assert not dist.is_initialized()


@pytest.mark.parametrize("local_rank, said", [("0", True), ("1", False)])
def test_a_node_whose_files_differ_says_why_it_stopped(local_rank, said, monkeypatch, capsys):
    """Only rank 0 printed a bad-input paragraph: a node whose files differ (node-local data, a missing
    tokenizer) ended its ranks with exit code 2 and no word. Each node's local rank 0 now says it, named."""
    import socket

    from doge_dist.train.cli import report_errors

    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", "2")

    def run():
        raise ConfigError("missing tokenizer X")

    assert report_errors(run) == 2
    err = capsys.readouterr().err
    assert err == (f"error (rank 1, {socket.gethostname()}): missing tokenizer X\n" if said else ""), err


def test_torchrun_error_file_holds_the_message(monkeypatch, tmp_path, capsys):
    """torchrun's Root Cause block showed "exitcode: 2 error_file: <N/A>" for a rank it had not heard from;
    the rank's error file (TORCHELASTIC_ERROR_FILE) now carries the paragraph, on every rank."""
    from doge_dist.train.cli import report_errors

    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")

    def run():
        raise ConfigError("missing tokenizer X")

    assert report_errors(run) == 2 and capsys.readouterr().err == ""
    assert json.loads(error_file.read_text())["message"]["message"] == "ConfigError: missing tokenizer X"


def test_sequences_longer_than_the_model_positions_are_refused():
    with pytest.raises(ConfigError, match=r"data.seq_length \(512\) exceeds model.max_position_embeddings \(256\)"):
        _check(_config("data.seq_length=512"))


@pytest.mark.parametrize("ds, message", [
    ({"bf16": True}, r"'bf16' must be a JSON object such as \{\"enabled\": true\}, got True"),
    ({"zero_optimization": 2}, r"'zero_optimization' must be a JSON object"),
    ([1, 2], r"must hold a JSON object"),
    ({"amp": {"enabled": True}}, r"x.json'.*Apex AMP integration has been removed"),
    ({"communication_data_type": "fp8"}, r"x.json'.*Invalid communication_data_type"),
])
def test_deepspeed_json_that_deepspeed_would_refuse_is_named_before_any_work(ds, message):
    with pytest.raises(ConfigError, match=message):
        _check(_config(), ds)


@pytest.mark.parametrize("ds, key", [
    ({"bf16": {"enabled": "auto"}}, "bf16.enabled"),
    ({**ZERO1, "gradient_clipping": "auto"}, "gradient_clipping"),
    ({**ZERO1, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}, "zero_optimization.reduce_bucket_size"),
    ({**ZERO1, "zero_optimization": {"stage": "auto"}}, "zero_optimization.stage"),
    ({**ZERO1, "train_batch_size": "auto"}, "train_batch_size"),
])
def test_hugging_face_auto_values_are_refused_by_key(ds, key):
    """The Hugging Face Trainer's "auto" means nothing to DeepSpeed: bf16.enabled "auto" trained in fp32
    without a word, gradient_clipping "auto" failed at the first optimizer step, a stage "auto" was a ValueError."""
    with pytest.raises(ConfigError, match=rf"x.json' sets {key} to \"auto\", a placeholder that only the Hugging Face "
                                          rf"Trainer fills in. doge-dist sets batch sizes and precision from the run "
                                          rf"config .*: give {key} an explicit value, or remove it"):
        _check(_config(), ds)


@pytest.mark.parametrize("clip", [-1.0, "1.0", True])
def test_gradient_clipping_must_be_a_number_at_least_0(clip):
    with pytest.raises(ConfigError, match=rf"x.json': gradient_clipping must be a number >= 0 .*, got {clip!r}\."):
        _check(_config(), {**ZERO1, "gradient_clipping": clip})
    _check(_config(), {**ZERO1, "gradient_clipping": 0})  # no clipping


@pytest.mark.parametrize("stage", range(4))
def test_a_missing_gradient_clipping_is_deepspeeds_default(stage):
    """Without "gradient_clipping" DeepSpeed clips at its default, 1.0, but a ZeRO-0 fp32 run (whose optimizer
    clips for DeepSpeed) read the missing key as 0 and trained unclipped. The resolved config (the run's
    ds_config.json) states the threshold."""
    from deepspeed.runtime.constants import GRADIENT_CLIPPING_DEFAULT

    _, ds = _check(_config(), {"zero_optimization": {"stage": stage}}, world=1)
    assert ds["gradient_clipping"] == GRADIENT_CLIPPING_DEFAULT == 1.0


@pytest.mark.parametrize("stage", ["3", 2.0, True, 4])
def test_a_zero_stage_that_is_not_the_number_0_to_3_is_refused(stage):
    """``"stage": "3"`` passed DeepSpeed's parser and then failed ``stage > 2`` with a TypeError
    traceback under train.compile or expert parallelism."""
    message = rf"x.json': zero_optimization.stage must be 0, 1, 2 or 3 written as a JSON number, got {stage!r}\."
    for settings, world in ((["train.compile=true"], 1), (["model.preset=doge-tiny-moe", "parallel.expert_parallel=2"], 2)):
        with pytest.raises(ConfigError, match=message):
            _check(_config(*settings), {**ZERO1, "zero_optimization": {"stage": stage}}, world)


def test_zero_offload_of_the_optimizer_is_refused_before_any_work():
    """deepspeed.initialize refuses doge-dist's own torch AdamW under ZeRO-Offload (zero_force_ds_cpu_optimizer),
    once the model is built; parameter offload at ZeRO-3 trains, and stays allowed."""
    zero3 = json.loads((REPO / "configs" / "zero3.json").read_text())
    for offload in ({"offload_optimizer": {"device": "cpu"}}, {"offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}},
                    {"cpu_offload": True}):
        with pytest.raises(ConfigError, match=r"x.json' sets zero_optimization.offload_optimizer \(or the older cpu_offload\) "
                                              r"to device '(cpu|nvme)': ZeRO-Offload is not supported, because doge-dist "
                                              r"builds its own AdamW .* ZeRO-3 without offload \(configs/zero3.json\), a smaller "
                                              r"train.micro_batch_size .* train.activation_checkpointing=true"):
            _check(_config(), {**zero3, "zero_optimization": {**zero3["zero_optimization"], **offload}})
    _check(_config(), {**zero3, "zero_optimization": {**zero3["zero_optimization"], "offload_optimizer": {"device": "none"},
                                                      "offload_param": {"device": "cpu"}}})


def test_fp32_gradient_accumulation_needs_zero_and_works_with_it():
    """DeepSpeed has no bf16 ZeRO-0 optimizer that accumulates in fp32: refused by name, not as a
    NotImplementedError from deepspeed.initialize once the model is built; at ZeRO 1-3 it is fine."""
    fp32_accumulation = {"data_types": {"grad_accum_dtype": "fp32"}}
    with pytest.raises(ConfigError, match=r"x.json' sets data_types.grad_accum_dtype = 'fp32' with bf16 at ZeRO stage 0.*"
                                          r"use ZeRO stage 1"):
        _check(_config("train.bf16=true"), {"zero_optimization": {"stage": 0}, **fp32_accumulation})
    for stage in (1, 2, 3):
        _check(_config("train.bf16=true"), {"zero_optimization": {"stage": stage}, **fp32_accumulation})
    _check(_config("train.bf16=false"), {"zero_optimization": {"stage": 0}, **fp32_accumulation})  # fp32 already


def test_bf16_under_its_old_name_is_bf16():
    """DeepSpeed reads "bfloat16" as "bf16": the trainer must agree (ZeRO-0 fp32 moves clipping into the optimizer)."""
    from doge_dist.train.ds_config import bf16_enabled

    assert bf16_enabled({"bfloat16": {"enabled": True}}) and not bf16_enabled({"bf16": {"enabled": "false"}})


def test_a_run_dir_that_cannot_be_made_is_named(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ConfigError, match=r"run.dir = '.*a_file/run' cannot be created: '.*a_file' is a file"):
        _check(_config(f"run.dir={tmp_path / 'a_file' / 'run'}"))
    with pytest.raises(ConfigError, match=r"data.cache_dir = '.*a_file' cannot be created: '.*a_file' is a file"):
        _check(_config(f"data.cache_dir={tmp_path / 'a_file'}"))


def test_a_lock_left_by_an_interrupted_op_build_is_named_not_waited_on(tmp_path, monkeypatch, capsys):
    """torch waits for ever, silently, on the lock file of a DeepSpeed op build that was killed (Ctrl-C at a
    first start); the trainer names the stale lock, and says that it waits on a recent one."""
    import os
    import time

    from doge_dist.train.distributed import SHM_OP, check_op_build_lock

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    check_op_build_lock(SHM_OP)  # no lock: nothing to say
    lock = tmp_path / SHM_OP / "lock"
    lock.parent.mkdir(exist_ok=True)
    lock.write_text("")
    check_op_build_lock(SHM_OP)
    assert "another process is building (or checking) DeepSpeed's deepspeed_shm_comm op: waiting" in capsys.readouterr().out
    hour_ago = time.time() - 3600
    os.utime(lock, (hour_ago, hour_ago))
    with pytest.raises(ConfigError, match=rf"{lock} is 60 minutes old: .* delete the file \(rm {lock}\)"):
        check_op_build_lock(SHM_OP)


def test_init_from_must_be_a_directory(tmp_path):
    """A plain file (a .pt, a .safetensors) was accepted here and failed only once the process group existed."""
    (tmp_path / "model.safetensors").write_text("")
    with pytest.raises(ConfigError, match=r"run.init_from = '.*model.safetensors' is a file: give a Hugging Face Doge directory"):
        _check(_config(f"run.init_from={tmp_path / 'model.safetensors'}"))
    with pytest.raises(ConfigError, match=r"run.init_from = '.*missing' does not exist"):
        _check(_config(f"run.init_from={tmp_path / 'missing'}"))


def test_bf16_zero0_under_model_parallelism_is_refused():
    """DeepSpeed's ZeRO-0 bf16 optimizer counts the gradient norm without the tensor-parallel marks (they
    are on the parameters, it reads the gradients): TP 2 logged and clipped by 0.59 for one process's 1.21."""
    zero0 = {**ZERO1, "zero_optimization": {"stage": 0}}
    for layout in (["parallel.tensor_parallel=2"], ["model.preset=doge-tiny-moe", "parallel.expert_parallel=2"]):
        with pytest.raises(ConfigError, match=r"ZeRO-0 in bf16 .* ZeRO-1 \(configs/zero1.json"):
            _check(_config("train.bf16=true", *layout), zero0)
    _check(_config("parallel.tensor_parallel=2"), zero0)  # fp32 ZeRO-0: doge-dist's optimizer counts the norm
    _check(_config("train.bf16=true"), zero0)  # data parallel only


def test_a_split_without_tokens_is_refused_before_the_model_is_built(tmp_path):
    """A prefix of one document with data.split 90,10,0: the validation split gets none. megatron-core's
    split was checked only when the datasets were built, after the model and the DeepSpeed engine."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "one_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    builder.add_document(np.arange(4, 200), [196])
    builder.finalize(prefix + ".idx")
    run_dir = tmp_path / "run"
    cmd = [PYTHON, "launch/pretrain.py", "--ds_config", "configs/zero0.json"] + base_overrides(run_dir) + [f"data.train_data=[{prefix}]"]
    result = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "error: The valid split gets no tokens from" in result.stderr
    assert not run_dir.exists()  # refused before the run wrote anything (or built a model)


def test_flex_attention_on_cpu_is_refused_before_the_model_is_built(monkeypatch):
    """PyTorch's FlexAttention has no backward on CPU: a CPU run with model.attn_backend=flex used to build
    the engine and load the data, then die in the first step's backward with a traceback."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"model.attn_backend = 'flex'.*no backward on CPU.*attn_backend=auto"):
        _check(_config("model.attn_backend=flex"))
