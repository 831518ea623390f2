"""How launch/pretrain.py, sft.py and dpo.py end a finished run (cli.run_launcher)."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

LAUNCHER = textwrap.dedent('''
    import atexit, os, sys
    from doge_dist.train.cli import run_launcher

    class HeldByALibraryGlobal:
        """What the interpreter's teardown may destroy badly: here it aborts, as a gloo group did."""
        def __del__(self):
            os.abort()

    held = HeldByALibraryGlobal()

    def main(config, ds_config, overrides):
        atexit.register(print, "exit handlers ran", flush=True)
        print("the run's last line, not flushed:", overrides)
        return int(overrides[0].split("=")[1])

    run_launcher("a launcher", "YAML", main)
''')


def _launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", LAUNCHER, *args], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})


def test_a_finished_run_exits_with_its_code_without_the_interpreter_teardown():
    """A finished run's exit code is the run's, whatever the teardown of library objects would do; its
    output and the exit handlers are not lost."""
    for code in (0, 3):
        result = _launch(f"train.code={code}")
        assert result.returncode == code, result.stderr[-2000:]
        assert "the run's last line, not flushed: ['train.code=" in result.stdout
        assert "exit handlers ran" in result.stdout


LATE_REPORTER = textwrap.dedent('''
    import os, time
    from doge_dist.config import ConfigError
    from doge_dist.train.cli import exit_without_teardown, report_errors

    def run():
        if os.environ["RANK"] == "0":
            time.sleep(3)  # a busy node: rank 0 meets the error last
        raise ConfigError("model.num_experts = 6 is not a perfect square")

    exit_without_teardown(report_errors(run))
''')


def test_a_bad_input_error_is_printed_when_the_reporting_rank_is_late(tmp_path):
    """Only rank 0 prints an error every rank meets; rank 1 exited at once, the launcher then stopped rank 0
    before it got there, and the job ended with exit code 2 and no word of why."""
    script = tmp_path / "late_reporter.py"
    script.write_text(LATE_REPORTER)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "0",
                             str(script)], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "\nerror: model.num_experts = 6 is not a perfect square\n" in "\n" + result.stderr, result.stderr[-3000:]
