"""TorchServe as the serving benchmark's peer: the same model (TorchScript of the same
weights), the same JPEGs, the same closed-loop client, in the same run.

``benchmarks/torchserve/setup.sh`` makes its venv (TorchServe 0.12, torch pinned like Refit's)
and checks for Java. Each configuration is started in a session of its own and stopped by
that session's process group (ours), never by name.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
from load import (
    free_port,
    rss_bytes,
    run_load,
    start_session,
    stop_session,
    tree_rss_bytes,
)

HERE = Path(__file__).resolve().parent / "torchserve"
CONFIGS = (
    {"name": "TorchServe 2 workers x 1 thread, batch 8", "workers": 2, "threads": 1},
    {"name": "TorchServe 1 worker x 2 threads, batch 8", "workers": 1, "threads": 2},
)


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _venv() -> Path:
    out = subprocess.run(  # our own script
        [str(HERE / "setup.sh")], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"TorchServe set-up failed: {out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def _archive(
    model: Any, venv: Path, work: Path, name: str = "bench", store: Path | None = None
) -> Path:
    """``model`` traced and archived as ``name.mar`` in ``store`` (default: a new
    ``work/store``); the store."""
    import torch

    scripted = torch.jit.trace(model.eval(), torch.zeros(1, 3, 224, 224))
    torch.jit.save(scripted, str(work / f"{name}.pt"))
    if store is None:
        store = work / "store"
        store.mkdir()
    subprocess.run(  # fixed arguments
        [
            str(venv / "bin" / "torch-model-archiver"),
            f"--model-name={name}",
            "--version=1.0",
            f"--serialized-file={work / f'{name}.pt'}",
            f"--handler={HERE / 'handler.py'}",
            f"--export-path={store}",
            "--force",
        ],
        check=True,
    )
    return store


def _start(
    venv: Path,
    store: Path,
    work: Path,
    config: dict[str, Any],
    names: tuple[str, ...] = ("bench",),
) -> tuple[Any, int]:
    """TorchServe serving the archives ``names`` with ``config``'s workers each."""
    port, mgmt, metrics = free_port(), free_port(), free_port()
    models = {
        name: {
            "1.0": {
                "defaultVersion": True,
                "marName": f"{name}.mar",
                "minWorkers": config["workers"],
                "maxWorkers": config["workers"],
                "batchSize": 8,
                "maxBatchDelay": 5,
                "responseTimeout": 120,
            }
        }
        for name in names
    }
    tag = f"{config['workers']}-{len(names)}"
    props = work / f"config-{tag}.properties"
    props.write_text(
        f"inference_address=http://127.0.0.1:{port}\n"
        f"management_address=http://127.0.0.1:{mgmt}\n"
        f"metrics_address=http://127.0.0.1:{metrics}\n"
        "disable_token_authorization=true\n"
        "enable_envvars_config=false\n"
        "install_py_dep_per_model=false\n"
        f"load_models={','.join(f'{n}.mar' for n in names)}\n"
        f"models={json.dumps(models)}\n"
    )
    threads = str(config["threads"])
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    proc = start_session(
        [
            str(venv / "bin" / "torchserve"),
            "--foreground",
            "--ncs",
            "--disable-token-auth",
            f"--model-store={store}",
            f"--ts-config={props}",
        ],
        env=env,
        log=work / f"torchserve-{tag}.log",
        cwd=work,
    )
    return proc, port


def _wait_ready(url: str, body: dict[str, Any], proc: Any, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("TorchServe exited during start-up")
        try:
            if requests.post(url, json=body, timeout=30).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError("TorchServe did not answer in time")


def top1_agreement(url: str, jpegs: list[bytes], expected: list[str]) -> float:
    """Share of the JPEGs whose top-1 label over HTTP is the locally computed one."""
    same = 0
    for jpeg, want in zip(jpegs, expected, strict=True):
        body = {"images": [base64.b64encode(jpeg).decode()], "top_k": 1}
        got = requests.post(url, json=body, timeout=60).json()["predictions"][0][0]["label"]
        same += got == want
    return same / len(jpegs)


def torchserve_rows(
    model: Any, jpegs: list[bytes], expected: list[str], levels: list[int], seconds: float
) -> list[dict[str, Any]]:
    """One row per configuration and concurrency, with top-1 agreement with the local model."""
    venv = _venv()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="refit-ts-") as tmp:
        work = Path(tmp)
        store = _archive(model, venv, work)
        for config in CONFIGS:
            started = time.monotonic()
            proc, port = _start(venv, store, work, config)
            url = f"http://127.0.0.1:{port}/predictions/bench"
            try:
                _wait_ready(url, {"images": [base64.b64encode(jpegs[0]).decode()]}, proc)
                start_s = time.monotonic() - started
                agreement = top1_agreement(url, jpegs[:32], expected[:32])
                run_load(url, jpegs, concurrency=4, seconds=3)  # warm up
                for c in levels:
                    s = run_load(url, jpegs, concurrency=c, seconds=seconds).summary()
                    # the launcher's whole tree: the Java frontend and its Python workers
                    rss, procs = tree_rss_bytes(proc.pid)
                    rows.append(
                        {
                            "system": config["name"],
                            "layout": f"{config['workers']}x{config['threads']}",
                            "concurrency": c,
                            **s,
                            "top1_agreement": agreement,
                            "start_s": start_s,
                            "rss_gib": (rss + rss_bytes(proc.pid)) / 2**30,
                            "processes": procs + 1,
                        }
                    )
                    _log(f"{rows[-1]}")
            finally:
                stop_session(proc)
    return rows


def torchserve_variant_rows(
    models: dict[str, Any], jpegs: list[bytes], concurrency: int, seconds: float
) -> list[dict[str, Any]]:
    """TorchServe with one registered model (the baseline, 2 workers x 1 thread: its best
    layout at c=32 here), then with every model of ``models`` registered (one worker of one
    thread each, the least a model takes), a model at random per request: req/s, p50/p99
    and the memory of the whole server (the Java frontend and its Python workers)."""
    venv = _venv()
    rows: list[dict[str, Any]] = []
    names = tuple(models)
    runs = (
        (f"TorchServe, one model ({names[0]}), 2 workers x 1 thread", names[:1], 2),
        (f"TorchServe, {len(names)} models, 1 worker x 1 thread each", names, 1),
    )
    with tempfile.TemporaryDirectory(prefix="refit-ts-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        for name, model in models.items():
            _archive(model, venv, work, name=name, store=store)
        for label, served, workers in runs:
            proc, port = _start(venv, store, work, {"workers": workers, "threads": 1}, served)
            urls = [f"http://127.0.0.1:{port}/predictions/{n}" for n in served]
            try:
                for url in urls:
                    _wait_ready(url, {"images": [base64.b64encode(jpegs[0]).decode()]}, proc)
                run_load(urls, jpegs, concurrency=4, seconds=3)  # warm up
                _log(f"{label}: {seconds:.0f} s at c={concurrency}")
                s = run_load(urls, jpegs, concurrency=concurrency, seconds=seconds).summary()
                rss, procs = tree_rss_bytes(proc.pid)
                rows.append(
                    {
                        "run": label,
                        **s,
                        "server_rss_bytes": rss + rss_bytes(proc.pid),
                        "processes": procs + 1,
                    }
                )
            finally:
                stop_session(proc)
    return rows


__all__ = ["top1_agreement", "torchserve_rows", "torchserve_variant_rows"]
