"""An import path is a file path, for every tool: `prorank.learner.group` is prorank/learner/group.py, where
prorank/learner is a relative symlink to the role folder learner/. No import hook, no `__path__` edits: the
interpreter, the type checker and the build all read the same files, and the wheel holds each module once."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.roles import ROLES, ROOMS

ROOT = Path(__file__).resolve().parents[2]


def test_the_links_are_the_packages_the_build_lists():
    assert sorted(p.name for p in (ROOT / "prorank").iterdir() if p.is_symlink()) == ROLES


@pytest.mark.parametrize("role", ROLES)
def test_each_role_is_a_relative_link_inside_the_package(role):
    link = ROOT / "prorank" / role
    assert link.is_symlink() and str(link.readlink()) == f"../{role}", link
    spec = importlib.util.find_spec(f"prorank.{role}")
    assert spec and spec.origin == str(link / "__init__.py")
    assert Path(spec.origin).resolve() == ROOT / role / "__init__.py"


def test_the_module_is_the_file_and_nothing_else_is_a_subpackage():
    code = (
        "import importlib, prorank.learner.group as g\n"
        "print(g.__file__)\n"
        "for name in ['prorank.prorank', 'prorank.bench', 'prorank.tests', 'prorank.deploy']:\n"
        "    try:\n        importlib.import_module(name); print('imported', name)\n"
        "    except ModuleNotFoundError:\n        pass\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(ROOT / "prorank" / "learner" / "group.py")], out.stdout


def test_the_type_checker_resolves_a_role_import_to_its_file(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from prorank.learner.group import LearnerGroup\n\nreveal_type(LearnerGroup.__init__)\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            str(probe),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert "import-not-found" not in out.stdout and "Cannot find" not in out.stdout, out.stdout
    assert 'Revealed type is "def (self: prorank.learner.group.LearnerGroup' in out.stdout, out.stdout


def test_the_rooms_of_the_core_are_folders_the_build_lists():
    folders = sorted(
        p.name for p in (ROOT / "prorank").iterdir() if p.is_dir() and not p.is_symlink() and p.name[0] != "_"
    )
    assert folders == sorted(ROOMS), folders
