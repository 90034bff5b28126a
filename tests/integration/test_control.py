"""The job's control actor: what `prorank scale actors N` writes and the job reads between steps."""

from __future__ import annotations

import pytest

from prorank.driver.control import find_control, start_control, wanted_actors


def test_scale_request_reaches_the_job(ray_local):

    control = start_control("control-test")
    try:
        with pytest.raises(RuntimeError, match="already runs"):
            start_control("control-test")
        assert wanted_actors(control, 0, {}, current=2) == 2  # nothing asked: keep the current count
        assert wanted_actors(control, 3, {"no_such_node": 1}, current=2) == 1  # per-node: waits for a node
        found = find_control("control-test")
        found.report.remote({"actors": 2, "step": 5})
        assert ray_local.get(found.set_actors.remote(4)) == {"actors": 2, "step": 5}
        assert wanted_actors(control, 3, {"no_such_node": 1}, current=2) == 4  # an explicit count wins
        with pytest.raises(LookupError, match="no running job"):
            find_control("no-such-job")
    finally:
        ray_local.kill(control)
