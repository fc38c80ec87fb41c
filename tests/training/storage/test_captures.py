"""Captured predictions on a real SeaweedFS: the layout, record-last writes, pagination by
prediction, and that damaged or foreign objects are refused, never parsed as trusted."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from training.storage.captures import CapturedLabel, CapturePolicy, CaptureRecord, Captures
from training.storage.errors import ConflictError, IntegrityError, NotFoundError, SpecError
from training.storage.ids import new_prediction_id
from training.storage.s3 import ObjectStore


def _record(pid: str, index: int = 0, model: str = "m") -> CaptureRecord:
    return CaptureRecord(
        model=model,
        prediction_id=pid,
        index=index,
        version="v1",
        created_at=datetime.now(UTC),
        reason="random",
        image="png",
        image_bytes=4,
        predictions=[CapturedLabel(label="a", score=0.9)],
    )


def test_put_get_list_and_pages(store: ObjectStore) -> None:
    c = Captures(store)
    pids = sorted(new_prediction_id() for _ in range(3))
    for pid in pids:
        for i in range(2):
            c.put(_record(pid, i), b"\x89PNG")
    assert store.exists(f"captures/m/items/{pids[0]}/1.png")
    assert c.get("m", pids[1], 1).index == 1
    assert c.image(c.get("m", pids[1], 1), max_bytes=100) == b"\x89PNG"
    assert list(c.list("m")) == [(p, i) for p in pids for i in range(2)]
    page = list(c.list("m", limit=2))
    assert page == [(p, i) for p in pids[:2] for i in range(2)]  # whole predictions only
    assert list(c.list("m", after=pids[1])) == [(pids[2], 0), (pids[2], 1)]
    with pytest.raises(ConflictError):  # a record is never overwritten
        c.put(_record(pids[0], 0), b"\x89PNG")


def test_missing_damaged_and_foreign_records(store: ObjectStore) -> None:
    c = Captures(store)
    pid = new_prediction_id()
    with pytest.raises(NotFoundError):
        c.get("m", pid, 0)
    store.put_bytes(f"captures/m/items/{pid}/0.json", b"{not json")
    with pytest.raises(IntegrityError):
        c.get("m", pid, 0)
    other = new_prediction_id()
    store.put_json(f"captures/m/items/{other}/0.json", _record(pid).model_dump(mode="json"))
    with pytest.raises(IntegrityError):  # a record naming another prediction
        c.get("m", other, 0)
    store.put_bytes(f"captures/m/items/{pid}/1.json", b"x" * 70_000)
    with pytest.raises(IntegrityError):
        c.get("m", pid, 1)


def test_ids_are_checked(store: ObjectStore) -> None:
    c = Captures(store)
    for model, pid in (("../m", new_prediction_id()), ("m", "../../models"), ("m", "x")):
        with pytest.raises(SpecError):
            c.get(model, pid, 0)


def test_policies(store: ObjectStore) -> None:
    c = Captures(store)
    assert c.policy("m") is None
    c.set_policy("m", CapturePolicy(rate=0.5))
    assert c.policy("m") == CapturePolicy(rate=0.5)
    store.put_bytes("captures/m/policy.json", b'{"rate": 7}')
    with pytest.raises(IntegrityError):
        c.policy("m")
