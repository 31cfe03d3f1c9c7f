"""The row store's crash-point enumeration (tests/test_crash_points.py) with the store on S3 (moto's
server on 127.0.0.1): the same scenario, a kill or a failed request at its I/O points, a bit-identical
finish, and the same rows as the scenario on a local store.

On S3 every mutation is one request (PUT or DELETE), atomic: a kill at a point means that request never
happened (there is no torn object), and a kill after it is the kill at the next point. CI runs an evenly
spaced sample of the points (5 kills, 3 failed requests of the 351; one point costs about 15 s on 2
shared cores, most of it moto answering); ``PICSTREAM_S3_CRASH_POINTS=all`` enumerates every one.
"""
from __future__ import annotations

import os
import signal

import fsspec
import numpy as np
import pytest

import test_crash_points as C



@pytest.fixture(scope="module")
def on_s3(s3, tmp_path_factory):
    """(local reference, S3 reference, the S3 scenario's I/O kinds per command); the scenario's stores
    go to S3 while the fixture lives."""
    local_root = tmp_path_factory.mktemp("local-reference")
    C.recorded_points(local_root)
    local = C.final_state(local_root)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(C, "store_url", lambda root: f"{s3}/{str(root).strip('/').replace('/', '-')}/rows.zarr")
        root = tmp_path_factory.mktemp("s3-reference")
        kinds = C.recorded_points(root)
        yield local, C.final_state(root), kinds


def points(total: int, sample: int) -> list[int]:
    """1..total, or ``sample`` of them evenly spaced (first and last included)."""
    if os.environ.get("PICSTREAM_S3_CRASH_POINTS") == "all":
        return list(range(1, total + 1))
    return sorted(set(np.linspace(1, total, sample).round().astype(int).tolist()))


def test_the_scenario_on_s3_gives_the_local_rows(on_s3):
    local, ref, kinds = on_s3
    C.assert_same(ref, local)
    assert {"set", "delete"} <= {k for command in kinds for k in command} and min(map(len, kinds)) > 50
    print(f"I/O points of the scenario on S3: {sum(map(len, kinds))}")


@pytest.mark.slow
def test_kill_at_io_points_on_s3_resumes_bit_identical(on_s3, tmp_path):
    local, ref, kinds = on_s3
    counts = [len(k) for k in kinds]
    chosen = points(sum(counts), 5)
    for n in chosen:
        root = tmp_path / f"n{n}"
        status = C.in_child(root, C.Counter(n, C.die))
        assert status == -signal.SIGKILL, f"point {n}: the child did not die there ({status})"
        C.recover(root, C.command_of(n, counts))
        C.assert_same(C.final_state(root), ref)
    print(f"crash points run on S3: {len(chosen)} of {sum(counts)}")


@pytest.mark.slow
def test_a_failed_request_at_io_points_on_s3_is_clear_and_resumes(on_s3, tmp_path):
    local, ref, kinds = on_s3
    counts = [len(k) for k in kinds]
    store_points = [i + 1 for i, kind in enumerate(sum(kinds, [])) if kind == "set"]
    chosen = [store_points[i - 1] for i in points(len(store_points), 3)]
    for n in chosen:
        root = tmp_path / f"n{n}"
        assert C.in_child(root, C.Counter(n, C.no_space)) == 3, f"point {n}: no clear error naming a key"
        C.recover(root, C.command_of(n, counts))
        C.assert_same(C.final_state(root), ref)
        assert not [p for p in fsspec.filesystem("s3").find(C.store_url(root)) if p.endswith(".tmp")]
