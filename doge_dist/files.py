"""Replacing an output directory so that a crash at any moment leaves a whole one behind.

Written by hand: neither the standard library nor the libraries we use swap a directory that may
already exist in one step (``os.replace`` refuses a non-empty target).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def replace_directory(new: Path, path: Path) -> None:
    """Move the complete directory ``new`` to ``path``. An earlier ``path`` is renamed to ``path.old``
    first and deleted only once the new one has its name: a kill in between leaves it whole there (and
    the next call, finding no ``path``, keeps that copy until its own new directory is in place)."""
    earlier = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(earlier, ignore_errors=True)
        path.rename(earlier)
    os.replace(new, path)
    shutil.rmtree(earlier, ignore_errors=True)
