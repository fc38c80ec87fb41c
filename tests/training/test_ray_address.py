"""Refit reaches its own Ray cluster by address, never by discovery (issue 10, class 11): a
local start ignores a ``RAY_ADDRESS`` naming another cluster, and leaves ``RAY_ADDRESS`` naming
the one it started, for what it starts (Ray Train's helpers look a cluster up through it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.ray

PROBE = """
import json, os, ray
from training.job_settings import RaySettings
from training.ray_train import cluster_env, ensure_ray
started = ensure_ray(RaySettings(num_cpus=1))
@ray.remote(num_cpus=0)
class Probe:
    def env(self):
        return os.environ.get("RAY_ADDRESS")
probe = Probe.options(runtime_env={"env_vars": cluster_env()}).remote()
print(json.dumps({
    "started": started,
    "env": os.environ["RAY_ADDRESS"],
    "own": ray.get_runtime_context().gcs_address,
    "actor": ray.get(probe.env.remote()),
}))
ray.shutdown()
"""


def test_a_local_start_ignores_another_clusters_address() -> None:
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # "another cluster" (nothing there)
    out = subprocess.run(  # fixed arguments; its Ray stops with it (ray.shutdown)
        [sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=180
    )
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["started"] is True
    assert seen["env"] == seen["own"] == seen["actor"]
    assert seen["own"] != "127.0.0.1:1"


def test_ray_train_runs_without_its_placement_group_cleaner(tmp_path) -> None:
    """Ray Train's cleaner watches its controller through the State API (the dashboard, off
    here) and logs a failure at every check; Refit's trainer leaves it out (the job runner
    frees placement groups itself), keeping every other default callback."""
    import ray.train.torch
    from ray.train import RunConfig, ScalingConfig
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )

    from training.ray_train import _Trainer

    kw = {
        "scaling_config": ScalingConfig(num_workers=2),
        "run_config": RunConfig(name="x", storage_path=str(tmp_path)),
    }
    ours = [type(c) for c in _Trainer(lambda _: None, **kw)._create_default_callbacks()]
    theirs = [
        type(c)
        for c in ray.train.torch.TorchTrainer(lambda _: None, **kw)._create_default_callbacks()
    ]
    assert PlacementGroupCleanerCallback in theirs
    assert ours == [c for c in theirs if c is not PlacementGroupCleanerCallback]
