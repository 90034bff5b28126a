"""The suite's own rules (tests/conftest.py): a test sits in one of the two tiers, a unit test starts nothing
heavy, and every module the scheduling lists name exists (a misspelt one would be silently run elsewhere)."""

from tests.conftest import (
    BESIDE_SERIAL_MODULES,
    INTEGRATION,
    LONGEST_FIRST,
    ROOT,
    SERIAL_MODULES,
    UNIT,
    misplaced,
)


def test_a_test_outside_both_tiers_is_named():
    path = ROOT / "tests" / "test_stray.py"
    assert misplaced(path, "tests/test_stray.py::test_x", []) == (
        f"{path}: a test belongs in tests/unit/ or tests/integration/"
    )


def test_a_unit_test_with_a_heavy_fixture_is_sent_to_the_integration_tier():
    nodeid = "tests/unit/test_x.py::test_y"
    problem = misplaced(UNIT / "test_x.py", nodeid, ["tmp_path", "ray_local", "answering_model"])
    assert problem == f"{nodeid} uses ['answering_model', 'ray_local']: it belongs in tests/integration/"
    assert misplaced(UNIT / "test_x.py", nodeid, ["tmp_path", "scifact_dir"]) is None
    assert misplaced(INTEGRATION / "test_x.py", "tests/integration/test_x.py::test_y", ["ray_local"]) is None


def test_the_scheduled_modules_exist_once_each():
    named = SERIAL_MODULES + BESIDE_SERIAL_MODULES + LONGEST_FIRST
    assert len(named) == len(set(named)), named
    assert [m for m in named if not (INTEGRATION / f"{m}.py").is_file()] == []
