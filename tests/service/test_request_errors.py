"""Errors crossing a Ray boundary reach the one error table as what they mean (issue 10,
class 4): our own errors as themselves, a dead replica or actor as a 503 to retry."""

from __future__ import annotations

from http import HTTPStatus

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

from service.request_errors import ReplicaUnavailableError, unwrap_remote
from training.storage.errors import ConflictError


def test_our_error_inside_a_replica_comes_out_as_itself() -> None:
    raised = ConflictError("version v1 does not load", field="version")
    crossed = RayTaskError("load", "Traceback ...", raised)
    assert unwrap_remote(crossed) is raised


def test_a_dead_or_restarting_replica_is_a_503() -> None:
    for exc in (ActorDiedError(), ActorUnavailableError("restarting", None)):
        out = unwrap_remote(exc)
        assert isinstance(out, ReplicaUnavailableError)
        assert out.status == HTTPStatus.SERVICE_UNAVAILABLE


def test_anything_else_stays_a_bug() -> None:
    crossed = RayTaskError("forward", "Traceback ...", ZeroDivisionError("x"))
    assert unwrap_remote(crossed) is crossed  # the table answers 500: a bug, not the client's
