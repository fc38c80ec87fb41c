"""NVIDIA Triton as the serving benchmark's second peer: the same weights as the graphs Refit
serves (its OpenVINO fp32 and INT8 IR, and a TorchScript of the fp32 model), the same JPEGs,
the same closed-loop client, in the same run, with Triton's dynamic batcher on.

``benchmarks/triton_serving/setup.sh`` makes its venv (PyTriton 0.7, whose wheel bundles
``tritonserver``; the same OpenVINO and torch releases as Refit's). Each configuration runs
``benchmarks/triton_serving/server.py`` in a session of its own, stopped by that session's process
group (ours), never by name. A configuration that cannot start is reported as a row saying
why, never skipped in silence.
"""

from __future__ import annotations

import base64
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

HERE = Path(__file__).resolve().parent / "triton_serving"
CONFIGS = (
    {"name": "Triton OpenVINO fp32, 1 instance x 2 threads", "kind": "openvino", "instances": 1},
    {"name": "Triton OpenVINO fp32, 2 instances x 1 thread", "kind": "openvino", "instances": 2},
    {"name": "Triton OpenVINO INT8, 1 instance x 2 threads", "kind": "int8", "instances": 1},
    {"name": "Triton OpenVINO INT8, 2 instances x 1 thread", "kind": "int8", "instances": 2},
    {"name": "Triton TorchScript fp32, 1 instance x 2 threads", "kind": "torch", "instances": 1},
)
CORES = 2
"""Threads of all instances together: the cores the other systems get."""
START_TIMEOUT_S = 180.0


def _threads(config: dict[str, Any]) -> int:
    return max(1, CORES // int(config["instances"]))


def _log_path(work: Path, config: dict[str, Any]) -> Path:
    return work / f"triton-{config['kind']}-{config['instances']}.log"


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _venv() -> Path:
    out = subprocess.run(  # our own script
        [str(HERE / "setup.sh")], capture_output=True, text=True, check=False, timeout=1800
    )
    if out.returncode != 0:
        raise RuntimeError(f"Triton set-up failed: {out.stderr[-2000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def triton_body(b64: str) -> dict[str, Any]:
    """One base64 JPEG as an Open Inference Protocol request (a BYTES tensor)."""
    return {"inputs": [{"name": "images", "shape": [1, 1], "datatype": "BYTES", "data": [b64]}]}


def _label(payload: dict[str, Any]) -> str:
    out = {o["name"]: o["data"] for o in payload["outputs"]}
    return str(int(out["label"][0]))


def _start(venv: Path, work: Path, config: dict[str, Any]) -> tuple[Any, int]:
    http, grpc, metrics = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(_threads(config)),
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
    }
    env.pop("LD_PRELOAD", None)  # OpenVINO aborts under jemalloc; Triton runs the default
    env.pop("PYTHONPATH", None)
    # Triton's Python backend stub links libpython dynamically: it must be the venv
    # interpreter's own (another 3.11 build's, e.g. the system's, breaks its stdlib)
    libdir = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH")) if p)
    proc = start_session(
        [
            str(venv / "bin" / "python"),
            str(HERE / "server.py"),
            f"--model-dir={work}",
            f"--kind={config['kind']}",
            f"--threads={_threads(config)}",
            f"--instances={config['instances']}",
            f"--http-port={http}",
            f"--grpc-port={grpc}",
            f"--metrics-port={metrics}",
        ],
        env=env,
        log=_log_path(work, config),
        cwd=work,
    )
    return proc, http


def _wait_ready(url: str, jpeg: bytes, proc: Any, log: Path) -> None:
    body = triton_body(base64.b64encode(jpeg).decode())
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-1500:]
            raise RuntimeError(f"Triton exited during start-up: {tail}")
        try:
            if requests.post(url, json=body, timeout=30).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(f"Triton did not answer within {START_TIMEOUT_S:.0f} s")


def _agreement(url: str, jpegs: list[bytes], expected: list[str]) -> float:
    same = 0
    for jpeg, want in zip(jpegs, expected, strict=True):
        body = triton_body(base64.b64encode(jpeg).decode())
        same += _label(requests.post(url, json=body, timeout=60).json()) == want
    return same / len(jpegs)


def _write_models(work: Path, model: Any, graphs: dict[str, Any]) -> None:
    import torch

    scripted = torch.jit.trace(model.eval(), torch.zeros(1, 3, 224, 224))
    torch.jit.save(scripted, str(work / "model.pt"))
    for mode, g in graphs.items():
        (work / f"{mode}.xml").write_bytes(g.xml)
        (work / f"{mode}.bin").write_bytes(g.weights)


def triton_rows(
    model: Any,
    graphs: dict[str, Any],
    jpegs: list[bytes],
    expected: list[str],
    levels: list[int],
    seconds: float,
) -> list[dict[str, Any]]:
    """One row per configuration and concurrency (with top-1 agreement with the local fp32
    model), or one row per configuration that could not start, with the reason."""
    rows: list[dict[str, Any]] = []
    try:
        venv = _venv()
    except Exception as exc:  # reported, never skipped in silence
        _log(f"Triton unavailable: {exc}")
        return [{"system": c["name"], "failed": f"set-up: {exc}"[:500]} for c in CONFIGS]
    with tempfile.TemporaryDirectory(prefix="refit-triton-") as tmp:
        work = Path(tmp)
        _write_models(work, model, graphs)
        for config in CONFIGS:
            if config["kind"] != "torch" and config["kind"] not in graphs:
                rows.append({"system": config["name"], "failed": "no such graph this run"})
                continue
            started = time.monotonic()
            proc, port = _start(venv, work, config)
            url = f"http://127.0.0.1:{port}/v2/models/bench/infer"
            try:
                _wait_ready(
                    url, jpegs[0], proc, work / f"triton-{config['kind']}-{config['instances']}.log"
                )
                start_s = time.monotonic() - started
                agreement = _agreement(url, jpegs[:32], expected[:32])
                run_load(url, jpegs, concurrency=4, seconds=3, body=triton_body)  # warm up
                for c in levels:
                    s = run_load(url, jpegs, concurrency=c, seconds=seconds, body=triton_body)
                    rss, procs = tree_rss_bytes(proc.pid)  # tritonserver, its backend stub
                    rss += rss_bytes(proc.pid)  # and the server, where the forward runs
                    rows.append(
                        {
                            "system": config["name"],
                            "layout": f"{config['instances']}x{_threads(config)}",
                            "concurrency": c,
                            **s.summary(),
                            "top1_agreement": agreement,
                            "start_s": start_s,
                            "rss_gib": rss / 2**30,
                            "processes": procs + 1,
                        }
                    )
                    _log(f"{rows[-1]}")
            except Exception as exc:
                _log(f"{config['name']} failed: {exc}")
                rows.append({"system": config["name"], "failed": str(exc)[:500]})
            finally:
                stop_session(proc)
    return rows


__all__ = ["triton_body", "triton_rows"]
