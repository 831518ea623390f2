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
