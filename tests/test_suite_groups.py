"""The suite's own scheduling: under `make test` (pytest-xdist, --dist loadgroup) a test that
starts Ray is in the "ray" group, which runs in one worker, one test at a time. With pytest 9.2
the group was silently ignored (pytest-xdist 3.8 marks it in a node attribute pytest no longer
reads), and two Ray runs at once starved each other on 2 cores."""

from __future__ import annotations

import pytest


@pytest.mark.ray
def test_a_test_that_starts_ray_is_scheduled_in_the_ray_group(request: pytest.FixtureRequest) -> None:
    if not getattr(request.config.option, "loadgroup", False):  # what pytest-xdist sets in its workers
        pytest.skip("not run by `make test` (pytest-xdist, --dist loadgroup): no groups to check")
    assert request.node.nodeid.endswith("@ray"), request.node.nodeid
