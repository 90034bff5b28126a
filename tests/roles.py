"""The role folders and the core's rooms, as the build lists them (pyproject.toml's [tool.setuptools]
packages, `prorank.<name>`): the one list behind the tests of the import paths and of the wheel. A role is
a folder at the top of the repository, linked into prorank/; a room is a folder of prorank/ itself."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
SUBPACKAGES = sorted(name.split(".")[1] for name in PACKAGES if name.count(".") == 1)
ROLES = [name for name in SUBPACKAGES if (ROOT / "prorank" / name).is_symlink()]
ROOMS = [name for name in SUBPACKAGES if name not in ROLES]
