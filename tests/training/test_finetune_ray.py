"""Fine-tune jobs end to end on a real local Ray and a real SeaweedFS."""

from __future__ import annotations

import os
import signal
import threading
import time
from datetime import datetime
from typing import Any

import pytest
import torch

from conftest import png_bytes, train_worker_pids, write_imagefolder
from service.settings import RefitSettings
from training.backbones import build_backbone
from training.data import DatasetIndex, index_dataset
from training.feature_stats import FeatureStats, collect_outputs
from training.finetune import run_finetune
from training.node_jobs import others_critical
from training.scoring import Scores, evaluate_model, score_parts
from training.spec import parse_spec
from training.stage_digests import stage_digests
from training.storage.errors import DataError, ResourceError
from training.storage.jobs import JobStore
from training.storage.registry import Manifest, Registry
from training.storage.s3 import ObjectStore

pytestmark = [pytest.mark.ray, pytest.mark.trains, pytest.mark.usefixtures("ray_session")]
SMALL = {"resize_size": 32, "crop_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}


def _spec(store: ObjectStore, dataset: str, **over: Any):
    raw = {
        "model": "synth",
        "base": {"backbone": "resnet18"},
        "dataset": store.uri(f"datasets/{dataset}/"),
        "freeze": {"policy": "full"},
        "epochs": 2,
        "batch_size": 8,
        "lr": 0.003,
        "workers": 2,
        "preprocess": SMALL,
        "augment": {"hflip": False},
    }
    raw.update(over)
    return parse_spec(raw)


def test_two_worker_ddp_publishes_then_finetunes_from_it(
    store: ObjectStore, settings: RefitSettings
) -> None:
    write_imagefolder(store, "synth", classes=3, train=16, val=6)
    # both graphs, whatever the serving mode (these settings derive none from fp32)
    graphs = settings.training.model_copy(update={"export_graphs": ("openvino", "int8")})
    announced: list[str] = []
    first = run_finetune(
        _spec(store, "synth"), s3=settings.s3, training=graphs, on_published=announced.append
    )
    assert first["published"]
    # live first (fp32), announced again once its graphs are stored
    assert announced == ["synth", "synth"]
    assert first["graphs_after_publish"] == ["int8", "openvino"]
    assert first["promoted"]
    assert first["epochs_run"] == 2
    reg = Registry(store)
    manifest, _ = reg.load("synth", "production")  # verifies every sha256
    assert manifest.version == first["version"]
    assert manifest.class_names == ["c0", "c1", "c2"]
    assert manifest.hyperparameters["workers"] == 2
    calibration = reg.load_calibration(manifest)  # verified validation crops for serving
    assert calibration.dtype == torch.uint8
    assert tuple(calibration.shape) == (18, 3, 32, 32)
    # OpenVINO graphs made after publishing: calibrated on 14 of the 18 validation crops,
    # measured again on the 4 held out, stored as the version's verified graph set
    assert manifest.graphs == {}
    full = reg.with_graph_set(manifest)
    assert set(full.graphs) == {"openvino", "int8"}
    for graph in full.graphs.values():
        assert (graph.images, graph.held_out_agreement is not None) == (14, True)
        assert set(graph.files) <= set(full.files)
        reg.read_file(full, graph.files[1])  # sha256-checked
    # the drift reference: fitted on the candidate's penultimate features of the 48 training
    # images, its threshold measured on the 18 validation images (held out of the fit)
    assert manifest.drift is not None
    drift = manifest.drift
    assert (drift.images, drift.held_out, drift.features) == (48, 18, 512)
    assert 1 <= manifest.drift.classes <= 3
    stats = FeatureStats.from_bytes(reg.read_file(manifest, manifest.drift.file), manifest.drift)
    assert stats.threshold > 0
    assert manifest.dataset["fingerprint"]
    assert manifest.job_id == first["job_id"]
    assert store.exists(f"jobs/{first['job_id']}/progress.json")
    record = store.get_json(f"jobs/{first['job_id']}.json")
    assert record["state"] == "succeeded"
    assert record["result"]["gate"]["passed"] is True

    second = run_finetune(
        _spec(
            store,
            "synth",
            base={"version": f"synth@{first['version']}"},
            freeze={"policy": "head_only"},
            epochs=3,
            gate={"max_regression": 1.0},
        ),
        s3=settings.s3,
        training=settings.training,
    )
    assert second["parent"] == f"synth@{first['version']}"
    assert second["gate"]["incumbent_version"] == first["version"]
    assert second["published"]
    alias, _ = reg.get_alias("synth", "production")
    assert alias.version == second["version"]
    assert alias.history[0] == first["version"]


def test_worker_killed_mid_run_resumes_and_publishes(
    store: ObjectStore, settings: RefitSettings
) -> None:
    write_imagefolder(store, "big", classes=3, train=60, val=8)
    spec = _spec(store, "big", epochs=4, batch_size=16, model="resume")
    out: dict[str, Any] = {}
    job_id = "job-resume-test"

    every_epoch = settings.training.model_copy(update={"checkpoint_interval_s": 0})

    def run() -> None:
        try:
            out["result"] = run_finetune(spec, s3=settings.s3, training=every_epoch, job_id=job_id)
        except Exception as exc:  # surfaced by the assertion below
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 300
    killed = None
    while time.monotonic() < deadline and thread.is_alive():
        # progress.json is written by the controller after it registered the checkpoint
        progress = store.head(f"jobs/{job_id}/progress.json")
        if progress is not None and store.get_json(f"jobs/{job_id}/progress.json")["epoch"] >= 1:
            pids = train_worker_pids()
            if pids:
                killed = pids[0]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.2)
    thread.join(timeout=600)
    assert killed is not None, "never saw a checkpoint to kill after"
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert result["resumed_from_epoch"] > 0
    assert result["published"]
    assert result["epochs_run"] == 4
    Registry(store).load("resume", result["version"])


def test_all_corrupt_fails_and_publishes_nothing(
    store: ObjectStore, settings: RefitSettings
) -> None:
    write_imagefolder(store, "junk", classes=2, train=4, val=0)
    for c in range(2):
        for i in range(2):
            store.put_bytes(f"datasets/junk/val/c{c}/{i}.png", b"not an image")
        for i in range(4):
            store.put_bytes(f"datasets/junk/train/c{c}/{i:03d}.png", b"\x89PNG broken")
    with pytest.raises(DataError) as err:
        run_finetune(
            _spec(store, "junk", model="junk", workers=1),
            s3=settings.s3,
            training=settings.training,
        )
    assert err.value.field == "dataset"
    assert "unreadable" in err.value.message
    assert Registry(store).list_versions("junk") == []
    assert Registry(store).get_alias("junk", "production") == (None, None)
    records = [o.key for o in store.list("jobs/") if o.key.endswith(".json")]
    failed = [store.get_json(k) for k in records if store.get_json(k).get("state") == "failed"]
    assert failed[0]["error"]["code"] == "invalid_dataset"


def test_more_workers_than_cluster(store: ObjectStore, settings: RefitSettings) -> None:
    write_imagefolder(store, "w", classes=2, train=3, val=1)
    with pytest.raises(ResourceError) as err:
        run_finetune(_spec(store, "w", workers=16), s3=settings.s3, training=settings.training)
    assert err.value.field == "workers"
    assert err.value.status == 422
    with pytest.raises(ResourceError):
        run_finetune(
            _spec(store, "w", workers=1, use_gpu=True), s3=settings.s3, training=settings.training
        )


def test_the_legacy_path_makes_graphs_before_publishing(
    store: ObjectStore, settings: RefitSettings
) -> None:
    """``legacy_job_path``: a one-worker job on Ray Train, the graphs in the manifest."""
    write_imagefolder(store, "synth", classes=3, train=8, val=4)
    legacy = settings.training.model_copy(
        update={"legacy_job_path": True, "export_graphs": ("int8",)}
    )
    result = run_finetune(
        _spec(store, "synth", workers=1, epochs=1), s3=settings.s3, training=legacy
    )
    assert result["published"]
    assert result["graphs_after_publish"] == []
    assert "ray_processes_s" in result["phase_details"]  # Ray Train ran it
    _phases_add_up(result, JobStore(store).get(result["job_id"]))
    reg = Registry(store)
    manifest, _ = reg.load("synth", "production")
    assert set(manifest.graphs) == {"int8"}
    assert not reg.has_graph_set("synth", manifest.version)


def _scored_on_images(
    store: ObjectStore, settings: RefitSettings, version: str
) -> tuple[torch.nn.Module, Manifest, DatasetIndex, Scores]:
    """A published ``synth`` version, scored by a pass over the validation images."""
    manifest, state = Registry(store).load("synth", version)
    model = build_backbone("resnet18", num_classes=3)
    model.load_state_dict(state)
    index = index_dataset(store, store.uri("datasets/synth/"))
    on_images = score_parts(
        model, index.val, store, manifest.preprocessing, index.classes, settings.training
    )
    return model, manifest, index, on_images


def test_a_head_only_retrain_scores_on_stored_features(
    store: ObjectStore, settings: RefitSettings
) -> None:
    """A head-only job in its own process stores its features; its retrain from the version
    it published finds every validation feature stored and scores both itself and the
    serving version on them (same trunk), with the metrics scoring on the images gives."""
    write_imagefolder(store, "synth", classes=3, train=8, val=4)
    head = {"freeze": {"policy": "head_only"}, "workers": 1, "epochs": 3, "lr": 0.01}
    first = run_finetune(_spec(store, "synth", **head), s3=settings.s3, training=settings.training)
    assert first["published"]
    assert first["scored_on"] == "stored features"  # its own run stored them
    retrain = run_finetune(
        _spec(store, "synth", base={"version": "synth@production"}, **head),
        s3=settings.s3,
        training=settings.training,
    )
    assert retrain["scored_on"] == "stored features"
    _phases_add_up(retrain, JobStore(store).get(retrain["job_id"]))
    assert retrain["gate"]["incumbent_version"] == first["version"]
    # the serving version's score on the stored features is its score on the images
    model, manifest, index, on_images = _scored_on_images(store, settings, first["version"])
    assert abs(retrain["gate"]["incumbent_top1"] - on_images.all["top1"]) < 1e-6
    assert abs(first["metrics"]["top1"] - on_images.all["top1"]) < 1e-6
    # its drift reference, fitted on its training images' stored features (no pass over the
    # images): the statistics a pass over the images gives
    v2, state2 = Registry(store).load("synth", retrain["version"])
    # each stage's content recorded at publish: a head-only retrain shares every stage but
    # the head with the version it started from, byte for byte, and stores only its head
    assert [(d.name, d.sha256) for d in v2.stages] == [
        (d.name, d.sha256) for d in stage_digests(state2, "resnet18", 3)
    ]
    assert [a == b for a, b in zip(manifest.stages, v2.stages, strict=True)] == [True] * 5 + [False]
    written = [o.key for o in store.list(f"models/synth/versions/{v2.version}/stages/")]
    assert [k.rsplit("/", 1)[1] for k in written] == ["head.safetensors"]
    assert retrain["weights"]["written_stages"] == ["head"]
    assert retrain["weights"]["shared_with"] == [f"synth@{first['version']}"]
    assert v2.drift is not None
    assert (v2.drift.images, v2.drift.held_out) == (24, 12)
    stats = FeatureStats.from_bytes(Registry(store).read_file(v2, v2.drift.file), v2.drift)
    model.load_state_dict(state2)
    passes = []
    for samples in (index.train, index.val):
        with collect_outputs(model, "resnet18") as seen:
            evaluate_model(
                model,
                samples,
                store=store,
                preprocessing=v2.preprocessing,
                classes=index.classes,
                training=settings.training,
            )
        passes.append((torch.cat([f for f, _ in seen]), torch.cat([o.argmax(1) for _, o in seen])))
    expected = FeatureStats.fit(*passes[0], passes[1][0])
    assert expected is not None
    assert torch.allclose(stats.centroids, expected.centroids, atol=1e-4)
    assert abs(stats.threshold - expected.threshold) < 1e-3


def _phases_add_up(result: dict[str, Any], record: Any) -> None:
    """A job's phases add up to its seconds, none negative, and those to the record's
    started -> finished (the lease taken before, the final write after: well under 2 s)."""
    phases = result["phases"]
    assert all(v >= -0.01 for v in phases.values()), phases
    assert abs(sum(phases.values()) - result["seconds"]) < 0.01, phases
    wall = (
        datetime.fromisoformat(record.finished_at) - datetime.fromisoformat(record.started_at)
    ).total_seconds()
    assert 0 <= wall - result["seconds"] < 2.0, (wall, result["seconds"])


def test_an_in_process_run_reserves_its_cpus_on_its_own_node(store: ObjectStore) -> None:
    """The placement group of a one-worker run sits on the node of the process that trains,
    holds its CPUs while it runs, is recorded for the runner, and is gone after."""
    import ray
    from ray.util.placement_group import placement_group_table

    from training.ray_train import _reserved

    free = ray.available_resources().get("CPU", 0)
    with _reserved(store, "job-reserve", 1.0):
        groups = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
        assert len(groups) == 1
        assert set(groups[0]["bundles_to_node_id"].values()) == {
            ray.get_runtime_context().get_node_id()
        }
        # pinned there (one node here places it anywhere the same: the bundle must ask)
        (bundle,) = groups[0]["bundles"].values()
        assert f"node:{ray.util.get_node_ip_address()}" in bundle
        assert ray.available_resources().get("CPU", 0) <= free - 1
        assert list(store.list(JobStore.placement_groups_prefix("job-reserve")))
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < free:
        assert time.monotonic() < deadline, "the reservation was not freed"
        time.sleep(0.1)


def test_a_one_worker_job_scores_on_its_validation_pass_and_a_refused_one_leaves_nothing(
    store: ObjectStore, settings: RefitSettings
) -> None:
    """A one-worker job (its own process) scores its candidate on the best epoch's
    validation pass: the top-1 a pass over the images gives. Its weights are written while
    it is scored; a candidate the gate refuses leaves no file under ``models/``."""
    write_imagefolder(store, "synth", classes=3, train=8, val=4)
    one = {"workers": 1, "epochs": 2}
    critical: list[bool] = []  # on the node's critical path until live (exports yield)
    first = run_finetune(
        _spec(store, "synth", **one),
        s3=settings.s3,
        training=settings.training,
        on_published=lambda model: critical.append(others_critical()),
    )
    assert first["published"]
    assert critical == [True]
    assert not others_critical()  # released
    assert first["scored_on"] == "validation pass"
    *_, on_images = _scored_on_images(store, settings, first["version"])
    assert abs(first["metrics"]["top1"] - on_images.all["top1"]) < 1e-6
    _phases_add_up(first, JobStore(store).get(first["job_id"]))
    # every validation image labelled as its neighbour class: refused by construction
    for c in range(3):
        for i in range(4):
            data = png_bytes((c + 1) % 3, seed=500 + i)
            store.put_bytes(f"datasets/wrong/val/c{c}/{i:03d}.png", data)
            store.put_bytes(f"datasets/wrong/train/c{c}/{i:03d}.png", png_bytes(c, seed=i))
    before = {o.key for o in store.list("models/")}
    refused = run_finetune(
        _spec(store, "wrong", gate={"min_accuracy": 0.9}, **one),
        s3=settings.s3,
        training=settings.training,
    )
    assert not refused["published"]
    assert {o.key for o in store.list("models/")} == before


def test_a_retrain_scores_the_serving_version_on_its_kept_logits(
    store: ObjectStore, settings: RefitSettings
) -> None:
    """A published version's logits on its validation images are kept from its own run's
    validation pass: a retrain from it forwards the serving version over the validation
    images added since only, and scores it as a pass over all the images does; with the
    store off (``feature_store_mb`` 0) every image is forwarded."""
    write_imagefolder(store, "synth", classes=3, train=8, val=4)
    one = {"workers": 1, "epochs": 1, "gate": {"max_regression": 1.0}}
    first = run_finetune(_spec(store, "synth", **one), s3=settings.s3, training=settings.training)
    assert first["scored_on"] == "validation pass"
    assert first["serving_images_forwarded"] is None  # nothing served yet
    for c in range(3):  # one new validation image per class since
        store.put_bytes(f"datasets/synth/val/c{c}/100.png", png_bytes(c, seed=900 + c))
    retrain = _spec(store, "synth", base={"version": "synth@production"}, **one)
    second = run_finetune(retrain, s3=settings.s3, training=settings.training)
    assert second["gate"]["incumbent_version"] == first["version"]
    assert second["serving_images_forwarded"] == 3
    *_, on_images = _scored_on_images(store, settings, first["version"])
    assert on_images.all["images"] == 15
    assert abs(second["gate"]["incumbent_top1"] - on_images.all["top1"]) < 1e-6
    assert second["published"]
    off = settings.training.model_copy(update={"feature_store_mb": 0})
    third = run_finetune(retrain, s3=settings.s3, training=off)
    assert third["gate"]["incumbent_version"] == second["version"]
    assert third["serving_images_forwarded"] == 15
    *_, on_images = _scored_on_images(store, settings, second["version"])
    assert abs(third["gate"]["incumbent_top1"] - on_images.all["top1"]) < 1e-6
