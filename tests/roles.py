"""The role folders, as the build lists them (pyproject.toml's [tool.setuptools] packages, `prorank.<role>`):
the one list behind the tests of the import paths and of the wheel."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
ROLES = sorted(name.split(".")[1] for name in PACKAGES if name.count(".") == 1)
