"""Every error class: its HTTP status and the JSON body shape."""

from __future__ import annotations

from http import HTTPStatus

import pytest

import service.request_errors
import training.storage.errors
import training.storage.job_lease
from training.storage.errors import RefitError

EXPECTED = {
    "SpecError": 422,
    "DataError": 422,
    "NotFoundError": 404,
    "ConflictError": 409,
    "IntegrityError": 409,
    "WeightsUnavailableError": 424,
    "StorageError": 503,
    "ResourceError": 422,
    "TrainingError": 500,
    "TooManyJobsError": 429,
    "BadRequestError": 400,
    "InvalidImageError": 422,
    "UnsupportedImageError": 415,
    "UnsupportedMediaTypeError": 415,
    "TooLargeError": 413,
    "NoVersionError": 503,
    "OverloadedError": 503,
    "AuthError": 401,
    "ForbiddenError": 403,
    "InvalidTokenError": 401,
    "HeadersTooLargeError": 431,
    "ReplicaUnavailableError": 503,
    "LeaseLostError": 409,
    "JobCancelledError": 409,
}


def _classes() -> list[type[RefitError]]:
    found = {}
    for module in (training.storage.errors, training.storage.job_lease, service.request_errors):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, RefitError) and obj is not RefitError:
                found[obj.__name__] = obj
    return list(found.values())


def test_every_class_is_pinned() -> None:
    assert sorted(c.__name__ for c in _classes()) == sorted(EXPECTED)


@pytest.mark.parametrize("cls", _classes(), ids=lambda c: c.__name__)
def test_status_and_body(cls: type[RefitError]) -> None:
    err = cls("something is off", field="images[2]")
    assert isinstance(err.status, HTTPStatus)
    assert int(err.status) == EXPECTED[cls.__name__]
    body = err.to_dict()
    assert set(body) == {"error"}
    assert body["error"] == {"code": cls.code, "message": "something is off", "field": "images[2]"}
    assert cls.code.islower()
    assert " " not in cls.code
    assert "field" not in cls("no field").to_dict()["error"]
