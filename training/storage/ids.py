"""Ids: model names, versions, aliases and job ids match one strict pattern, never paths."""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

from training.storage.errors import SpecError

ID_PATTERN = r"^[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?$"
_ID = re.compile(ID_PATTERN)
PREDICTION_ID_PATTERN = r"^[0-9]{8}-[0-9]{9}-[0-9a-f]{12}$"
_PREDICTION_ID = re.compile(PREDICTION_ID_PATTERN)


def is_id(value: object) -> bool:
    """Whether a value is a valid id (lowercase letters, digits, ``._-``, 1-64 chars)."""
    # fullmatch: ``$`` alone also matches before a trailing newline ("production\n")
    return isinstance(value, str) and bool(_ID.fullmatch(value)) and ".." not in value


PREDICTION_ID_FIELDS = frozenset({"prediction_id", "after"})
"""Fields that hold a prediction id (``after``: a listing's cursor) rather than an id."""


def check_ids(**ids: str) -> None:
    """SpecError naming the first field whose value is not a valid id (a prediction id for
    the fields of :data:`PREDICTION_ID_FIELDS`): the one check every store module uses before
    a value becomes part of a key."""
    for field, value in ids.items():
        prediction = field in PREDICTION_ID_FIELDS
        if not (is_prediction_id(value) if prediction else is_id(value)):
            kind = "prediction id" if prediction else "id"
            raise SpecError(f"{value!r} is not a valid {kind}", field=field)


def is_prediction_id(value: object) -> bool:
    """Whether a value is a prediction id (:func:`new_prediction_id`'s form)."""
    return isinstance(value, str) and bool(_PREDICTION_ID.fullmatch(value))


def new_version_id(now: datetime | None = None) -> str:
    """A new immutable version id that sorts by creation time: ``20261122-113000-1a2b3c``."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def new_job_id(now: datetime | None = None) -> str:
    """A new job id that sorts by creation time (to the millisecond):
    ``job-20261122-113000123-1a2b3c``."""
    now = now or datetime.now(UTC)
    return f"job-{now:%Y%m%d-%H%M%S}{now.microsecond // 1000:03d}-{secrets.token_hex(3)}"


def new_prediction_id(now: datetime | None = None) -> str:
    """A new prediction id that sorts by time (to the millisecond) and cannot be guessed:
    ``20261122-113000123-1a2b3c4d5e6f``."""
    now = now or datetime.now(UTC)
    return f"{now:%Y%m%d-%H%M%S}{now.microsecond // 1000:03d}-{secrets.token_hex(6)}"
