"""jobs/runtime/ray_stages.py without a cluster: what a worker's ModscanError looks like on the driver.

The run on a real cluster (an actor that fails in ``__init__``, read by the CLI) is
``test_run_inputs.py::test_a_modscan_error_raised_in_an_actor_reaches_the_cli_as_its_own_line``.
"""

from __future__ import annotations

import pickle

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from jobs.runtime.ray_stages import StageError, worker_error
from pipeline.errors import InputError


def _remote(cause: BaseException) -> RayTaskError:
    """The exception Ray raises on the driver for a task that raised ``cause``."""
    return RayTaskError("MapBatches(Moderator)", "Traceback (most recent call last): ...", cause,
                        proctitle="ray::MapWorker", pid=1, ip="127.0.0.1")


@pytest.mark.parametrize("dual", [False, True])
def test_the_error_a_stage_raised_is_read_from_the_cause_unchanged(dual: bool) -> None:
    error = InputError("gallery g: checksum mismatch (refusing to load)")
    carried = StageError(error)
    carried.args = carried.args + ("Failed to apply UDF transform after 1/1 attempts ...",)  # what Ray Data appends
    e = _remote(pickle.loads(pickle.dumps(carried)))  # the cause crossed a process boundary
    if dual:
        e = e.as_instanceof_cause()  # what Ray raises: both a RayTaskError and a StageError
    got = worker_error(e)
    assert type(got) is InputError and str(got) == "gallery g: checksum mismatch (refusing to load)"


def test_driver_errors_pass_and_other_failures_are_not_modscan_errors() -> None:
    driver = InputError("input x does not exist")
    assert worker_error(driver) is driver
    assert worker_error(_remote(ValueError("a bug"))) is None
    assert worker_error(ActorDiedError()) is None  # a dead actor: only Ray's text, nothing to recover
    try:
        raise RuntimeError("wrapped") from _remote(StageError(driver))
    except RuntimeError as e:
        assert worker_error(e) is driver


def test_raise_worker_error_raises_the_stage_error_chained_or_the_failure_itself() -> None:
    from jobs.runtime.ray_stages import raise_worker_error

    error = InputError("gallery g: checksum mismatch (refusing to load)")
    remote = _remote(StageError(error))
    with pytest.raises(InputError) as got:
        raise_worker_error(remote)
    assert got.value is error and got.value.__cause__ is remote
    driver = InputError("input x does not exist")
    with pytest.raises(InputError) as got:
        raise_worker_error(driver)
    assert got.value is driver and got.value.__cause__ is None  # never chained to itself
    bug = _remote(ValueError("a bug"))
    with pytest.raises(RayTaskError) as got:
        raise_worker_error(bug)
    assert got.value is bug
