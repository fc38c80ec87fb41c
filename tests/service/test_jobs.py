"""Job records (real SeaweedFS), progress views, the training curve and the CLI's bar."""

from __future__ import annotations

import io
from typing import Any

import pytest
from PIL import Image

from service.cli.client import Client, ClientError, progress_line
from service.dataplane.curve import render_curve
from service.metrics import batch_histogram
from training.spec import parse_spec
from training.storage.errors import ConflictError, NotFoundError
from training.storage.jobs import JobStore, progress_view
from training.storage.s3 import ObjectStore


def _spec(store: ObjectStore, **over: Any):
    raw = {
        "model": "cats",
        "base": {"backbone": "resnet18"},
        "dataset": store.uri("datasets/cats/"),
        "epochs": 2,
    }
    return parse_spec({**raw, **over})


def test_create_get_list_newest_first(store: ObjectStore) -> None:
    jobs = JobStore(store)
    a, created_a = jobs.create(_spec(store))
    b, _ = jobs.create(_spec(store, model="dogs"))
    assert created_a
    assert a.state == "queued"
    assert a.model == "cats"
    assert jobs.get(a.job_id) == a
    listed = [r.job_id for r in jobs.list_jobs()]
    assert listed == sorted([a.job_id, b.job_id], reverse=True)
    assert [r.job_id for r in jobs.list_jobs(state="queued", limit=1)] == listed[:1]
    assert jobs.list_jobs(state="running") == []
    with pytest.raises(NotFoundError) as exc:
        jobs.get("job-nope")
    assert exc.value.field == "job_id"
    with pytest.raises(NotFoundError):
        jobs.get("../models/x")  # never a path


def test_active_markers_follow_unfinished_jobs(
    store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    jobs = JobStore(store)
    a, _ = jobs.create(_spec(store))
    b, _ = jobs.create(_spec(store, model="dogs"))
    c, _ = jobs.create(_spec(store, model="owls"))
    jobs.transition(b.job_id, "running")
    jobs.transition(c.job_id, "succeeded")
    assert store.exists(f"jobs/active/{a.job_id}")
    assert not store.exists(f"jobs/active/{c.job_id}")  # removed when the record ended
    assert [r.job_id for r in jobs.unfinished()] == [a.job_id, b.job_id]  # oldest first
    # markers a crash left: one without a record, one whose record already ended
    store.put_bytes("jobs/active/job-20000101-000000000-dead", b"")
    jobs.transition(b.job_id, "failed")
    store.put_bytes(f"jobs/active/{b.job_id}", b"")
    assert [r.job_id for r in jobs.unfinished()] == [a.job_id]
    assert [o.key for o in store.list("jobs/active/")] == [f"jobs/active/{a.job_id}"]
    # the queued listing reads the marked records only, not every job ever run
    read: list[str] = []
    real_get = store.get_with_etag

    def counting_get(key: str, **kw: Any) -> Any:
        read.append(key)
        return real_get(key, **kw)

    monkeypatch.setattr(store, "get_with_etag", counting_get)
    assert [r.job_id for r in jobs.list_jobs(state="queued")] == [a.job_id]
    assert read == [f"jobs/{a.job_id}.json"]
    assert {r.job_id for r in jobs.list_jobs(state="failed")} == {b.job_id}


def test_idempotency_key_returns_the_same_job(store: ObjectStore) -> None:
    jobs = JobStore(store)
    first, created = jobs.create(_spec(store), idempotency_key="k-1")
    again, created_again = jobs.create(_spec(store), idempotency_key="k-1")
    assert created
    assert not created_again
    assert again.job_id == first.job_id
    assert len(jobs.list_jobs()) == 1
    with pytest.raises(ConflictError) as exc:
        jobs.create(_spec(store, epochs=3), idempotency_key="k-1")
    assert exc.value.field == "Idempotency-Key"
    other, created_other = jobs.create(_spec(store), idempotency_key="k-2")
    assert created_other
    assert other.job_id != first.job_id


def test_transitions_stamp_times_and_terminal_is_final(store: ObjectStore) -> None:
    jobs = JobStore(store)
    record, _ = jobs.create(_spec(store))
    running = jobs.transition(record.job_id, "running")
    assert running.state == "running"
    assert running.started_at
    done = jobs.transition(record.job_id, "succeeded", reason="published v1")
    assert done.finished_at
    assert done.terminal
    # a late cancel (or a second writer) cannot move a finished job
    after = jobs.transition(record.job_id, "cancelled", reason="late")
    assert after.state == "succeeded"
    assert after.reason == "published v1"
    assert jobs.get(record.job_id).state == "succeeded"


def test_update_is_compare_and_swap(store: ObjectStore) -> None:
    jobs = JobStore(store)
    record, _ = jobs.create(_spec(store))
    calls = []

    def change(r):
        calls.append(1)
        if len(calls) == 1:  # a concurrent writer changes the record under us
            jobs.transition(record.job_id, "running")
        return r.model_copy(update={"reason": f"seen {r.state}"})

    out = jobs.update(record.job_id, change)
    assert len(calls) == 2  # the first write lost and was retried on the fresh record
    assert out.reason == "seen running"
    assert jobs.get(record.job_id).state == "running"


def test_progress_view_merges_epochs_and_steps() -> None:
    epoch = {
        "epoch": 2,
        "epochs": 5,
        "steps_per_epoch": 10,
        "images_per_s": 100.0,
        "eta_s": 30.0,
        "val_top1": 0.8,
        "train_loss": 0.5,
        "history": [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "val_top1": 0.5}],
    }
    view = progress_view({"progress": epoch, "step": {"epoch": 2, "step": 4, "images_per_s": 90}})
    assert (view["epoch"], view["step"], view["epochs"]) == (3, 4, 5)
    assert view["images_per_s"] == 90
    assert view["metrics"] == {"val_top1": 0.8, "train_loss": 0.5}
    # a step report from an epoch already finished does not move the view back
    old = progress_view({"progress": epoch, "step": {"epoch": 1, "step": 9}})
    assert (old["epoch"], old["step"]) == (2, None)
    assert progress_view({})["epochs"] is None


def test_curve_png() -> None:
    history = [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_top1": 0.5 + e / 20}
        for e in range(1, 6)
    ]
    img = Image.open(io.BytesIO(render_curve(history)))
    assert img.format == "PNG"
    assert img.size == (640, 420)
    colors = {c for _, c in img.getcolors(1 << 16) or []}
    assert (44, 160, 44) in colors
    assert (31, 119, 180) in colors
    empty = Image.open(io.BytesIO(render_curve([])))
    assert empty.format == "PNG"


def test_batch_histogram_is_cumulative() -> None:
    buckets, total = batch_histogram({"1": 3, "4": 2, "100": 1})
    as_dict = dict(buckets)
    assert as_dict["1"] == 3
    assert as_dict["2"] == 3
    assert as_dict["4"] == 5
    assert as_dict["64"] == 5
    assert as_dict["128"] == 6
    assert as_dict["+Inf"] == 6
    assert total == 3 + 8 + 100


def test_progress_line() -> None:
    job = {
        "state": "running",
        "progress": {
            "epochs": 4,
            "epoch": 2,
            "epochs_done": 1,
            "step": 5,
            "steps_per_epoch": 10,
            "images_per_s": 120.4,
            "eta_s": 40,
            "metrics": {"val_top1": 0.9},
        },
    }
    line = progress_line(job, width=8)
    assert line.startswith("[###.....]  38%")
    assert "epoch 2/4" in line
    assert "step 5/10" in line
    assert "120 img/s" in line
    assert "eta 40s" in line
    assert line.endswith("running")
    done = progress_line({"state": "succeeded", "progress": {"epochs": 4}}, width=4)
    assert done.startswith("[####] 100%")


def test_client_refuses_non_http_urls() -> None:
    with pytest.raises(ClientError):
        Client("file:///etc/passwd", None)


def test_mode_fallback_metric_uses_fixed_reasons_only() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from service.metrics import ScrapeCollector

    collector = ScrapeCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    collector.classifier = {
        "models": {
            "a": {"version": "v1", "mode": "fp32", "fallback_kind": "speed", "agreement": 1.0},
            "b": {"version": "v2", "mode": "fp32", "fallback_kind": "agreement"},
            "c": {"version": "v3", "mode": "fp32_jit", "fallback_kind": None},
            "d": {"version": "v4", "mode": "fp32", "fallback_kind": "made up by a bug"},
            "e": {
                "version": "v5",
                "mode": "openvino",
                "passed_over": {
                    "int8": {"reason": "agreement", "detail": "0.988 < 0.99"},
                    "fp32": {"reason": "speed", "detail": "slower"},
                    "bf16_jit": {"reason": "made up", "detail": "x"},
                },
            },
        }
    }
    text = generate_latest(registry).decode()
    assert 'refit_model_mode_fallback{model="a",reason="speed"} 1.0' in text
    assert 'refit_model_mode_fallback{model="b",reason="agreement"} 1.0' in text
    assert 'model="c",reason' not in text
    assert "made up" not in text
    assert 'refit_model_loaded_info{mode="fp32_jit",model="c",version="v3"} 1.0' in text
    # auto: each mode it passed over, with a fixed reason
    passed = 'refit_model_mode_passed_over{mode="%s",model="e",reason="%s"} 1.0'
    assert passed % ("int8", "agreement") in text
    assert passed % ("fp32", "speed") in text
    assert 'mode="bf16_jit",model="e"' not in text
