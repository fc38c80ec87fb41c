"""``refit up``'s console: each job's start, epochs and end from the records (real
SeaweedFS), and Ray's driver loggers sent to a file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from service.cli.console import JobConsole, ray_output_to_files
from training.backbones import build_backbone
from training.preprocessing_spec import Preprocessing
from training.spec import parse_spec
from training.stage_digests import split_stages
from training.storage.jobs import JobStore
from training.storage.registry import Registry
from training.storage.s3 import ObjectStore


def _spec(store: ObjectStore, model: str) -> Any:
    raw = {
        "model": model,
        "base": {"backbone": "resnet18"},
        "dataset": store.uri("datasets/cats/"),
        "epochs": 2,
    }
    return parse_spec(raw)


def _epoch(jobs: JobStore, job_id: str, epoch: int) -> None:
    history = [
        {"epoch": e, "train_loss": 1.0 / e, "val_top1": 0.5 + e / 10, "images_per_s": 100.0}
        for e in range(1, epoch + 1)
    ]
    jobs.store.put_json(
        jobs.progress_key(job_id), {"epoch": epoch, "epochs": 2, "history": history}
    )


def test_job_console_reports_start_epochs_and_end_once(store: ObjectStore) -> None:
    jobs = JobStore(store)
    old, _ = jobs.create(_spec(store, "old"))
    jobs.transition(old.job_id, "succeeded")  # history before the console started
    waiting, _ = jobs.create(_spec(store, "owls"))  # queued before it started: news
    lines: list[str] = []
    console = JobConsole(jobs, emit=lines.append)
    read: list[str] = []
    real_get = jobs.get

    def counting_get(job_id: str) -> Any:
        read.append(job_id)
        return real_get(job_id)

    jobs.get = counting_get  # type: ignore[method-assign]
    console.poll()
    assert lines == [f"job {waiting.job_id} (owls) queued"]
    assert old.job_id not in read  # history is not read at start-up
    jobs.transition(waiting.job_id, "cancelled", reason="test")
    console.poll()
    assert lines[1:] == [f"job {waiting.job_id} (owls) cancelled: test"]  # it never started
    del lines[:]

    a, _ = jobs.create(_spec(store, "cats"))
    console.poll()
    assert lines == [f"job {a.job_id} (cats) queued"]
    jobs.transition(a.job_id, "running")
    _epoch(jobs, a.job_id, 1)
    console.poll()
    console.poll()  # nothing new: nothing printed twice
    assert lines[1:] == [
        f"job {a.job_id} (cats) started",
        f"job {a.job_id} (cats) epoch 1/2 loss 1.0000 val top1 0.6000 100 img/s",
    ]
    _epoch(jobs, a.job_id, 2)
    jobs.transition(
        a.job_id, "succeeded", result={"published": True, "version": "v2"}, reason="gate passed"
    )
    # a job that started and ended between two polls is still reported, in full
    b, _ = jobs.create(_spec(store, "dogs"))
    jobs.transition(b.job_id, "running")
    jobs.transition(b.job_id, "failed", error={"message": "no images"})
    console.poll()
    assert lines[3:] == [
        f"job {a.job_id} (cats) epoch 2/2 loss 0.5000 val top1 0.7000 100 img/s",
        f"job {a.job_id} (cats) succeeded: version v2 is live",
        f"job {b.job_id} (dogs) queued",
        f"job {b.job_id} (dogs) started",
        f"job {b.job_id} (dogs) failed: no images",
    ]
    console.poll()
    assert len(lines) == 8


def test_ray_driver_loggers_go_to_a_file(tmp_path: Path) -> None:
    ray_logger = logging.getLogger("ray.refit_test")
    ray_logger.propagate = False
    console = logging.StreamHandler()
    ray_logger.addHandler(console)
    names = [n for n in logging.root.manager.loggerDict if n == "ray" or n.startswith("ray.")]
    before = {n: list(logging.getLogger(n).handlers) for n in names}
    session = tmp_path / "session-logs"
    session.mkdir()
    try:
        path = ray_output_to_files(tmp_path / "logs", session)
        path = ray_output_to_files(tmp_path / "logs", session)  # again: one file handler
        assert console not in ray_logger.handlers
        ray_logger.warning("chatter")
        files = [h for h in ray_logger.handlers if isinstance(h, logging.FileHandler)]
        assert len(files) == 1
        files[0].flush()
        assert "chatter" in path.read_text()
        assert (tmp_path / "logs" / "ray").resolve() == session.resolve()
    finally:  # this test session's Ray loggers as they were
        for name, handlers in before.items():
            logger = logging.getLogger(name)
            for h in list(logger.handlers):
                if h not in handlers:
                    logger.removeHandler(h)
                    h.close()
            for h in handlers:
                if h not in logger.handlers:
                    logger.addHandler(h)
        ray_logger.removeHandler(console)


def test_a_retrain_says_what_its_weights_wrote_and_share(store: ObjectStore) -> None:
    """The end line of a retrain that shares its parent's frozen stages says how much it
    wrote and what it shares (from the version's manifest, as the job's result keeps it)."""
    reg = Registry(store)
    net = build_backbone("resnet18", num_classes=3)
    fields = {
        "backbone": "resnet18",
        "num_classes": 3,
        "class_names": ["a", "b", "c"],
        "preprocessing": Preprocessing(),
    }
    parent = reg.publish(split_stages(net.state_dict(), "resnet18", 3), model="cats", **fields)
    state = dict(net.state_dict(), **{"fc.bias": net.state_dict()["fc.bias"] + 1})
    child = reg.publish(split_stages(state, "resnet18", 3), model="cats", **fields)
    weights = child.weights_storage()
    assert weights["written_stages"] == ["head"]
    assert weights["shared_with"] == [f"cats@{parent.version}"]
    assert weights["written_bytes"] + weights["shared_bytes"] == sum(
        s.file.size for s in parent.stages if s.file
    )
    assert parent.weights_storage()["shared_stages"] == []

    jobs = JobStore(store)
    lines: list[str] = []
    console = JobConsole(jobs, emit=lines.append)
    job, _ = jobs.create(_spec(store, "cats"))
    console.poll()
    jobs.transition(job.job_id, "running")
    result = {"published": True, "version": child.version, "weights": weights}
    jobs.transition(job.job_id, "succeeded", result=result, reason="gate passed")
    console.poll()
    kb = weights["written_bytes"] / 1e3
    mb = weights["shared_bytes"] / 1e6
    assert lines[-1] == (
        f"job {job.job_id} (cats) succeeded: version {child.version} is live; its weights "
        f"wrote {kb:.1f} KB (head) and share {mb:.1f} MB (stem, layer1, layer2, layer3, "
        f"layer4) with cats@{parent.version}"
    )
