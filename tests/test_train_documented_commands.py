"""The pretraining command lines that the README, the Makefile, launch/pretrain.py and the config
headers show work as written: their overrides fit the lr schedule, and two of them that write the
same run.dir use the same ZeRO family (else the later one stops at the earlier one's checkpoint)."""
import ast
import shlex
from pathlib import Path

from doge_dist.config import load_config
from doge_dist.train.ds_config import read_ds_config, zero_stage
from doge_dist.train.loop import ZERO_FAMILIES
from doge_dist.train.schedule import check_schedule

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "README.md", REPO / "Makefile", REPO / "launch" / "pretrain.py", *sorted((REPO / "configs").glob("doge_*.yaml"))]


def documented_commands() -> list[tuple[str, str, str, list[str]]]:
    """(source, config, ds_config or None, overrides) of every pretraining command with a real config file."""
    commands = []
    for source in SOURCES:
        text = source.read_text().replace("\\\n", " ")  # continued lines
        for line in text.splitlines():
            words = shlex.split(line.lstrip("# "), comments=True) if "launch/pretrain.py" in line else []
            if "--config" not in words or not (REPO / words[words.index("--config") + 1]).is_file():
                continue
            ds_config = words[words.index("--ds_config") + 1] if "--ds_config" in words else None
            overrides = [w for w in words if "=" in w and "." in w.split("=")[0] and not w.startswith(("-", "["))]
            commands.append((source.name, words[words.index("--config") + 1], ds_config, overrides))
    return commands


def test_documented_commands_fit_their_schedules(monkeypatch):
    monkeypatch.chdir(REPO)
    commands = documented_commands()
    assert len(commands) >= 10
    for source, config_path, _, overrides in commands:
        check_schedule(load_config(config_path, overrides).train)  # raises ConfigError naming the steps


def test_documented_commands_sharing_a_run_dir_use_one_zero_family(monkeypatch):
    monkeypatch.chdir(REPO)
    families: dict[str, set[str]] = {}
    for source, config_path, ds_config, overrides in documented_commands():
        config = load_config(config_path, overrides)
        stage = zero_stage(read_ds_config(ds_config or config.run.ds_config))
        families.setdefault(config.run.dir, set()).add(f"{ZERO_FAMILIES[stage]} ({source})")
    shared = {run_dir: found for run_dir, found in families.items() if len({f.split(' (')[0] for f in found}) > 1}
    assert not shared, f"documented commands resume each other's checkpoints across ZeRO families: {shared}"


def test_script_help_keeps_continued_command_lines():
    """``--help`` prints each launch/ and data_tools/ script's docstring, whose example commands continue
    over lines with a backslash: a docstring that is not a raw string swallows backslash-newline and
    prints one long line with a gap in the middle instead of the command as written."""
    for script in sorted([*(REPO / "launch").glob("*.py"), *(REPO / "data_tools").glob("*.py")]):
        text = script.read_text()
        docstring = next(node for node in ast.parse(text).body if isinstance(node, ast.Expr)).value
        if "\\\n" in ast.get_source_segment(text, docstring):
            assert "\\\n" in docstring.value, f"{script.relative_to(REPO)}: make the docstring raw (r\"\"\"...)"
