"""The wheel built from the tree holds each module once: `prorank.learner.group` as prorank/learner/group.py
(the build follows prorank/'s relative links), and nothing outside prorank/."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.roles import ROLES, ROOMS

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_each_module_once(tmp_path):
    # Built from a copy (links kept as links): pip builds a local folder in place, leaving build/ behind.
    tree = tmp_path / "tree"
    for name in ["pyproject.toml", "README.md", "prorank", *ROLES]:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, tree / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            tree.mkdir(exist_ok=True)
            shutil.copy(ROOT / name, tree / name)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(tree),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("prorank_rl-*.whl")
    names = [n for n in zipfile.ZipFile(wheel).namelist() if n.endswith((".py", ".proto", ".pyi"))]
    assert len(names) == len(set(names)) and all(n.startswith("prorank/") for n in names), names
    expected = {f"prorank/{p.relative_to(ROOT / 'prorank')}" for p in (ROOT / "prorank").glob("*.py")}
    for room in ROOMS:
        expected |= {
            f"prorank/{room}/{p.relative_to(ROOT / 'prorank' / room)}" for p in (ROOT / "prorank" / room).rglob("*.py")
        }
    for role in ROLES:
        expected |= {f"prorank/{role}/{p.relative_to(ROOT / role)}" for p in (ROOT / role).rglob("*.py")}
    assert set(n for n in names if n.endswith(".py")) == expected
