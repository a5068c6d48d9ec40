"""``--config`` values: a config file path, or the name of a config shipped in tfdpfair/configs.

``--config=demo``, ``--config=demo.py:runlocal=True`` and the repository path
``--config=experiments/configs/demo.py`` (from before the configs moved into the package) all
name tfdpfair/configs/demo.py when no such file exists where the command runs, so a
pip-installed wheel runs a config from any directory. A path that exists is used as it is.
"""

from __future__ import annotations

import os
import pathlib
from typing import Sequence

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped with tfdpfair (without ``.py``)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                  if p.stem not in ("__init__", "common"))


def resolve(value: str) -> str:
    """The config file (with its ``:arg``) that ``value`` names (see module docstring)."""
    path, sep, arg = value.partition(":")
    if os.path.exists(path):
        return value
    packaged = CONFIG_DIR / f"{pathlib.Path(path).stem}.py"
    if packaged.exists() and packaged.stem in packaged_configs():
        return f"{packaged}{sep}{arg}"
    return value  # ml_collections reports the missing file


def resolve_argv(argv: Sequence[str], flag: str = "config") -> list[str]:
    """``argv`` with every ``--config=V`` / ``--config V`` value resolved."""
    out, argv = [], list(argv)
    i = 0
    while i < len(argv):
        item = argv[i]
        if item.startswith(f"--{flag}="):
            item = f"--{flag}=" + resolve(item.split("=", 1)[1])
        elif item == f"--{flag}" and i + 1 < len(argv):
            out.append(item)
            i += 1
            item = resolve(argv[i])
        out.append(item)
        i += 1
    return out


def default_config(name: str = "demo") -> str:
    return str(CONFIG_DIR / f"{name}.py")
