"""Records on the store (real SeaweedFS): one read path for every kind - the byte cap
declared beside the model, the self-name check, damage as IntegrityError."""

from __future__ import annotations

from typing import ClassVar

import pytest
from pydantic import BaseModel

from training.spec import parse_spec
from training.storage.errors import IntegrityError, NotFoundError
from training.storage.jobs import JobStore
from training.storage.s3 import ObjectStore


class Note(BaseModel):
    MAX_BYTES: ClassVar[int] = 200
    name: str
    text: str


def test_a_record_round_trips_with_its_etag(store: ObjectStore) -> None:
    etag = store.put_record("notes/a.json", Note(name="a", text="hi"))
    record, read_etag = store.get_record_with_etag("notes/a.json", Note, names={"name": "a"})
    assert record == Note(name="a", text="hi")
    assert read_etag == etag
    with pytest.raises(NotFoundError):
        store.get_record("notes/none.json", Note)


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b'{"name": "a", "text": "' + b"x" * 300 + b'"}', "exceeds 200"),  # over the cap
        (b'{"name": "a"}', "not a Note"),  # does not parse as the model
        (b"\xff\xfe not json", "not a Note"),
        (b'{"name": "b", "text": "hi"}', "names another name"),  # another record's content
    ],
)
def test_damage_is_an_integrity_error_naming_the_field(
    store: ObjectStore, body: bytes, why: str
) -> None:
    store.put_bytes("notes/a.json", body)
    with pytest.raises(IntegrityError, match=why) as exc:
        store.get_record("notes/a.json", Note, names={"name": "a"}, field="note")
    assert exc.value.field == "note"


def test_a_damaged_job_record_is_a_409_and_hides_no_other_job(store: ObjectStore) -> None:
    jobs = JobStore(store)
    spec = parse_spec(
        {"model": "cats", "base": {"backbone": "resnet18"}, "dataset": store.uri("d/")}
    )
    good, _ = jobs.create(spec)
    bad, _ = jobs.create(spec)
    store.put_bytes(jobs.key(bad.job_id), b'{"job_id": "' + bad.job_id.encode() + b'"}')
    with pytest.raises(IntegrityError):
        jobs.get(bad.job_id)
    assert [r.job_id for r in jobs.list_jobs()] == [good.job_id]
    assert [r.job_id for r in jobs.unfinished()] == [good.job_id]
