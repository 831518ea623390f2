"""The Makefile's install step: `make test` reuses a venv made with the same settings and makes it
again when TORCH or VENV_FLAGS differ (the README's GPU command did nothing once a CPU venv existed)."""
import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _dry_run(venv: Path, *settings: str) -> str:
    """``make -n test`` as a user types it: not as a sub-make of the ``make test`` that runs this suite (CI),
    whose MAKELEVEL and MAKEFLAGS would add "Entering directory" lines and the outer make's settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS", "MAKEOVERRIDES")}
    result = subprocess.run(["make", "-n", "test", f"VENV={venv}", *settings], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_install_settings_decide_whether_the_venv_is_made_again(tmp_path):
    venv = tmp_path / "venv"
    assert "-m venv" in _dry_run(venv) and "--clear" not in _dry_run(venv)  # none yet: made, nothing to clear
    venv.mkdir()
    stamp = venv / ".doge_dist_installed"
    stamp.write_text("torch=torch==2.13.0 venv_flags=\n")
    assert _dry_run(venv).splitlines() == [f"{venv}/bin/python -m pytest"]  # same settings: reused
    gpu = _dry_run(venv, "TORCH=torch", "VENV_FLAGS=--system-site-packages")
    assert f"-m venv --clear --system-site-packages {venv}" in gpu and 'pip install --quiet "torch"' in gpu
    assert "torch=torch venv_flags=--system-site-packages" in gpu  # what the stamp then says
