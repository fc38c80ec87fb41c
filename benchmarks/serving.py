"""Serving throughput and latency at concurrency 1, 8 and 32, per numeric mode, against a
raw-torch forward of the same model and mode measured in the same run.

224 px JPEG requests (one image each) on resnet18; decoding and preprocessing happen inside
the service. Refit is measured with each request body of ``--bodies``: JSON with base64 (the
peers' body too), a multipart file, and the Open Inference Protocol's binary tensor extension
(the JPEG's bytes after a JSON header, as tritonclient sends them). The model: a random
resnet18 trunk with a linear head trained on its features of scikit-learn digits (so top-1
answers differ across images and the bf16 agreement check is meaningful; no pretrained
weights can be downloaded here).

    python benchmarks/serving.py [--seconds 12] [--modes fp32,fp32_jit,openvino,int8]
                                 [--layouts 2x1,1x2] [--no-jemalloc] [--no-torchserve]

``--layouts``: serving replicas x CPUs (torch or OpenVINO threads) each. The version is
published with its OpenVINO graphs (``openvino``, ``int8``) made the way the training job
makes them (``training.openvino_ir.ExportChild``, INT8 calibrated on 256 crops), and
agreement is checked again on 244 held-out crops.

TorchServe 0.12 (``benchmarks/torchserve/``: its own venv, Java from Debian) serves the same
weights as TorchScript with the same preprocessing, measured first with the same JPEGs and
client; ``vs_torchserve`` is each row's req/s over TorchServe's best configuration at the same
concurrency. ``top1_agreement`` checks 32 answers of each system against the local model.

NVIDIA Triton (``benchmarks/triton_serving/``: PyTriton's bundled ``tritonserver`` in its own venv,
dynamic batching on) serves the same OpenVINO fp32 and INT8 graphs the version has and a
TorchScript of the fp32 model, with the same JPEGs (base64 in an Open Inference Protocol BYTES
tensor), preprocessing and client; ``vs_best_peer`` is each row's req/s over the best peer
configuration, TorchServe or Triton, at the same concurrency. A peer configuration that cannot
start gets a row saying why (``--no-triton`` leaves Triton out).

``vs_raw`` compares with the raw forward in the same mode; ``vs_raw_fp32`` with raw fp32
eager, the yardstick the goals are stated against. A mode the service refused (agreement
below 99 % or slower than fp32 on this CPU) shows ``served_mode`` fp32.

Where the CPU goes, on every row: ``server_cpu_ms_per_request`` is the CPU of every serving
process (replicas, proxies, Ray; not the client, not the store) per answered request;
``raw_forward_cpu_ms_per_image`` the bare forward's CPU per image in the mode served (batch 16,
same threads); ``path_cpu_ms_per_request`` their difference: what HTTP, decode, preprocessing,
batching and Serve cost around the forward (``--profile`` breaks it down with py-spy).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import report  # also puts the repository on sys.path
from load import (
    digit_jpegs,
    free_port,
    multipart_body,
    oip_binary_body,
    reexec_with_jemalloc,
    run_load,
)

IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


SCRAPE_TOKEN = "bench-scrape"
CACHE = Path(__file__).with_name(".cache")
"""The trained benchmark model, kept between runs (delete it to train afresh)."""


def build_model(threads: int, epochs: int = 4) -> tuple[Any, Any, Any, list[bytes]]:
    """resnet18 trunk (random) + linear head trained on digit features at 224 px. Returns
    the model, preprocessing, the 500 crops it did not train on (uint8) and their JPEGs
    (what an import sends as calibration images: 256 calibrate, 244 are held out)."""
    import torch

    from service.runtime.images import decode_request_images
    from training.backbones import build_backbone, head_module, trunk
    from training.preprocess import normalize
    from training.preprocessing_spec import Preprocessing

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    pre = Preprocessing(resize_size=256, crop_size=224, **IMAGENET)
    model = build_backbone("resnet18", num_classes=10).eval()
    jpegs, labels = digit_jpegs(800)
    crops = decode_request_images(
        jpegs, max_image_bytes=1 << 24, max_pixels=1 << 26, preprocessing=pre
    )
    x = normalize(pre, crops)
    cached = CACHE / f"serving-resnet18-{epochs}-epochs.safetensors"
    if cached.exists():  # the same seed, data and steps: the model a previous run trained
        from safetensors.torch import load_file

        model.load_state_dict(load_file(cached))
        print(f"[bench] model: trained earlier, {cached}", file=sys.stderr, flush=True)
        return model.eval(), pre, crops[300:], jpegs[300:]
    # a short fine-tune of the whole network first (the trunk too): a trained model's
    # answers have margins that a random trunk's do not, and int8 rounding is measured
    # against those (a random trunk with a fitted head flips under any rounding)
    y_all = torch.tensor(labels[:300])
    opt_all = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(300)
        for i in range(0, 300, 30):
            idx = order[i : i + 30]
            opt_all.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y_all[idx]).backward()
            opt_all.step()
        print(
            f"[bench] model: epoch {epoch + 1}/{epochs}, {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
    model.eval()
    body = trunk(model, "resnet18")
    with torch.inference_mode():
        feats = torch.cat([body(x[i : i + 50]).flatten(1) for i in range(0, 300, 50)])
    head = head_module(model, "resnet18")
    y = torch.tensor(labels[:300])
    mu, sd = feats.mean(0), feats.std(0) + 1e-6
    opt = torch.optim.Adam(head.parameters(), lr=0.01)
    for _ in range(300):  # full-batch logistic regression on standardised features
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head((feats - mu) / sd), y)
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold the standardisation into the head
        w = head.weight / sd
        head.bias -= (w * mu).sum(1)
        head.weight.copy_(w)
    from safetensors.torch import save_file

    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, cached)
    return model, pre, crops[300:], jpegs[300:]


GRAPHS: dict[str, Any] = {}
"""The version's OpenVINO graphs by mode, exported once per run."""


def _prepared(model: Any, mode: str, x: Any, threads: int) -> Any:
    """A copy of ``model`` made ready for ``mode`` exactly as the service does it."""
    import copy

    from service.runtime.served_model import prepare

    # the graph modes are measured in a child process (_graph_in_child), never here
    return prepare(copy.deepcopy(model), mode, x[:8])


def raw_forward(
    model: Any, x: Any, mode: str, seconds: float, threads: int, batch: int = 16
) -> float:
    """Images/s of a bare forward pass (no HTTP, no decode) in ``mode``."""
    import torch

    from service.runtime.served_model import forward

    m = _prepared(model, mode, x, threads)
    xb = x[:batch]
    with torch.inference_mode():
        forward(m, xb, mode)
        n, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            forward(m, xb, mode)
            n += batch
    RAW_CPU_MS[mode] = 1000 * (time.process_time() - cpu) / n
    return n / (time.perf_counter() - start)


RAW_CPU_MS: dict[str, float] = {}
"""CPU ms per image of the bare forward in each mode (every thread of the process that ran
it): what a served request's CPU is compared with, to find what its path costs."""


def _graph_in_child(model: Any, x: Any, mode: str, seconds: float, threads: int) -> tuple:
    """``raw_forward`` and ``agreement`` of a graph mode, in a child process with the system
    allocator (OpenVINO aborts under the jemalloc this script runs with)."""
    import json
    import os
    import subprocess

    import torch
    from safetensors.torch import save_file

    from service.allocator import without_preloaded_allocator

    g = GRAPHS[mode]
    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        work = Path(tmp)
        ref = model(x).argmax(1)
        save_file({"x": x.contiguous(), "ref": ref}, str(work / "x.safetensors"))
        (work / "g.xml").write_bytes(g.xml)
        (work / "g.bin").write_bytes(g.weights)
        env = {**os.environ, **without_preloaded_allocator()}
        argv = [sys.executable, __file__, "--raw-graph", tmp, mode, str(seconds), str(threads)]
        out = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
    RAW_CPU_MS[mode] = got["cpu_ms_per_img"]
    return got["img_per_s"], (got["agreement"], int(ref.unique().numel()))


def _raw_graph_main(tmp: str, mode: str, seconds: float, threads: int) -> None:
    import json

    import torch
    from safetensors.torch import load_file

    from service.runtime.served_model import forward
    from training.openvino_ir import compile_graph

    work = Path(tmp)
    data = load_file(str(work / "x.safetensors"))
    run = compile_graph(
        (work / "g.xml").read_bytes(), (work / "g.bin").read_bytes(), threads=threads
    )
    x = data["x"]
    agree = float((forward(run, x, mode).argmax(1) == data["ref"]).float().mean())
    xb = x[:16]
    forward(run, xb, mode)
    n, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        forward(run, xb, mode)
        n += 16
    rate = n / (time.perf_counter() - start)
    cpu_ms = 1000 * (time.process_time() - cpu) / n
    got = {"img_per_s": rate, "agreement": agree, "cpu_ms_per_img": cpu_ms}
    print(json.dumps(got | {"threads": torch.get_num_threads()}))


def agreement(model: Any, x: Any, mode: str, threads: int) -> tuple[float, int]:
    """Top-1 agreement of ``mode`` with fp32 on held-out crops, and how many classes fp32
    predicts among them (a collapsed model would agree trivially)."""
    import torch

    from service.runtime.served_model import forward

    with torch.inference_mode():
        ref = forward(model, x, "fp32").argmax(1)
        got = forward(_prepared(model, mode, x, threads), x, mode).argmax(1)
    return float((got == ref).float().mean()), int(ref.unique().numel())


def _scrape(url: str) -> dict[str, float]:
    import requests

    out = {}
    scrape = {"Authorization": f"Bearer {SCRAPE_TOKEN}"}
    for line in requests.get(url + "/metrics", headers=scrape, timeout=30).text.splitlines():
        if line.startswith(("refit_batch_size_sum", "refit_batch_size_count")):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
        if line.startswith("refit_classifier_allocator_info{"):
            out["allocator:" + line.split('allocator="')[1].split('"')[0]] = 1.0
        if line.startswith("refit_model_loaded_info"):
            out["mode:" + line.split('mode="')[1].split('"')[0]] = 1.0
        if line.startswith("refit_model_mode_fallback{"):
            out["refused:" + line.split('reason="')[1].split('"')[0]] = 1.0
        if line.startswith("refit_model_mode_passed_over{"):  # auto: each mode it did not pick
            mode, reason = (line.split(f'{k}="')[1].split('"')[0] for k in ("mode", "reason"))
            out[f"passed:{mode}={reason}"] = 1.0
    return out


def _layouts(text: str) -> list[tuple[int, float]]:
    out = []
    for item in text.split(","):
        replicas, cpus = item.lower().split("x")
        out.append((int(replicas), float(cpus)))
    return out


def _first_answer(predict: str, jpeg: bytes, want: str, timeout: float = 300) -> None:
    import base64

    import requests

    body = {"images": [base64.b64encode(jpeg).decode()], "top_k": 1}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            r = requests.post(predict, json=body, timeout=60)
            if r.status_code == 200 and r.json()["predictions"][0][0]["label"] == want:
                return
        except requests.RequestException:
            pass
        time.sleep(0.1)
    raise RuntimeError("the service gave no correct answer in time")


def main() -> int:
    """Run the benchmark; print the table; write results/serving.json."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=12.0, help="per concurrency level")
    p.add_argument("--modes", default="fp32,fp32_jit,openvino,int8")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--layouts", default="2x1,1x2", help="replicas x CPUs each")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--no-jemalloc", action="store_true")
    p.add_argument("--no-torchserve", action="store_true", help="skip the TorchServe peer")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton peer")
    p.add_argument(
        "--bodies",
        default="json,multipart,oip-binary",
        help="request bodies Refit is measured with, each at every concurrency: json (v1, "
        "base64; the peers' body), multipart (v1, a file), oip-binary (v2 infer, the binary "
        "tensor extension: no base64)",
    )
    p.add_argument(
        "--ingress",
        default="haproxy",
        help="comma-separated: haproxy (the default: Serve's HAProxy ingress), proxy (Serve's "
        "Python HTTP proxy); each runs every mode and layout on its own Ray",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="after each mode's levels, one more run at the top concurrency under py-spy, "
        "with CPU ms per request of every process (not counted in the table)",
    )
    args = p.parse_args()
    malloc = reexec_with_jemalloc(not args.no_jemalloc)

    import os

    import ray
    import torch

    from service.embedded_store import EmbeddedStore
    from service.runtime.images import decode_request_images
    from service.runtime.served_model import GRAPH_MODES
    from service.settings import RefitSettings, ServeSettings
    from training.openvino_ir import ExportedGraph
    from training.preprocess import normalize
    from training.storage.registry import Registry
    from training.storage.s3 import ObjectStore

    unknown = set(args.bodies.split(",")) - set(BODIES)
    if unknown:
        p.error(f"--bodies: {', '.join(sorted(unknown))} not among {', '.join(BODIES)}")
    modes = args.modes.split(",")
    levels = [int(c) for c in args.concurrency.split(",")]
    layouts = _layouts(args.layouts)
    threads = max(1, int(max(r * c for r, c in layouts)))  # the raw forward: every core
    print(f"[bench] allocator {malloc}; building the model", file=sys.stderr, flush=True)
    model, pre, unseen, unseen_jpegs = build_model(threads)
    x_held = normalize(pre, unseen[256:])
    jpegs, _ = digit_jpegs(64, offset=1000)
    with torch.inference_mode():
        crops = decode_request_images(
            jpegs, max_image_bytes=1 << 24, max_pixels=1 << 26, preprocessing=pre
        )
        expected = [str(int(i)) for i in model(normalize(pre, crops)).argmax(1)]

    rows: list[dict[str, Any]] = []
    peer: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        embedded = EmbeddedStore(Path(tmp))
        conn = stack.enter_context(embedded)
        # the store is not part of the serving stack (TorchServe reads a local directory)
        store_pids = (embedded.process.pid,) if embedded.process else ()
        base = RefitSettings(s3=conn.s3_settings())
        reg = Registry(ObjectStore(base.s3))
        # publish through the import endpoint, as a user brings a model trained elsewhere
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        try:
            import_s, imported = _import_over_http(base, model, pre, unseen_jpegs, expected)
        finally:
            ray.shutdown()
        manifest, _ = reg.load("bench", imported["version"])  # every sha256 verified
        manifest = reg.with_graph_set(manifest)  # the graphs made after the import
        for mode, record in manifest.graphs.items():
            xml, weights = (reg.read_file(manifest, name) for name in record.files)
            GRAPHS[mode] = ExportedGraph(
                mode=mode,  # type: ignore[arg-type]
                xml=xml,
                weights=weights,
                calibration_agreement=record.calibration_agreement,
                held_out_agreement=record.held_out_agreement,
                images=record.images,
                unquantized=tuple(record.unquantized),
            )
        print(
            f"[bench] imported in {import_s:.1f} s, graphs {sorted(GRAPHS)} stored after "
            f"{imported['graphs_s']:.1f} s",
            file=sys.stderr,
        )
        raw = {}
        checks = {}
        # raw fp32 eager: the common yardstick; auto's raw rate is that of the mode it serves
        raw_modes = [m for m in dict.fromkeys(["fp32", *modes]) if m != "auto"]
        if "auto" in modes:  # every mode auto weighs
            raw_modes += [m for m in ("fp32_jit", "bf16_jit", *GRAPH_MODES) if m not in raw_modes]
        for mode in raw_modes:
            if mode in GRAPH_MODES:
                raw[mode], checks[mode] = _graph_in_child(model, x_held, mode, 6, threads)
            else:
                raw[mode] = raw_forward(model, x_held, mode, seconds=6, threads=threads)
                checks[mode] = agreement(model, x_held, mode, threads)
            print(f"[bench] raw {mode}: {raw[mode]:.1f} img/s", file=sys.stderr, flush=True)
        if not args.no_torchserve:
            from torchserve_peer import torchserve_rows

            peer = torchserve_rows(model, jpegs, expected, levels, args.seconds)
        best_ts = {
            c: max((r["req_per_s"] for r in peer if r["concurrency"] == c), default=0.0)
            for c in levels
        }
        if not args.no_triton:
            from triton_peer import triton_rows

            peer += triton_rows(model, GRAPHS, jpegs, expected, levels, args.seconds)
        ran = [r for r in peer if "failed" not in r]
        best_peer = {
            c: max((r["req_per_s"] for r in ran if r["concurrency"] == c), default=0.0)
            for c in levels
        }
        peers = {"torchserve": best_ts, "best": best_peer}
        started = time.perf_counter()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        ray_start_s = time.perf_counter() - started
        try:
            for ingress in args.ingress.split(","):
                # each layout starts its own Serve, whose controller takes the ingress
                base = base.model_copy(update={"serve": ServeSettings(ingress=ingress)})
                for mode in modes:
                    for replicas, cpus in layouts:
                        rows += _serve_rows(
                            base,
                            mode,
                            replicas,
                            cpus,
                            args,
                            jpegs,
                            expected,
                            levels,
                            raw,
                            peers,
                            ray_start_s,
                            store_pids,
                        )
        finally:
            ray.shutdown()
    for r in peer:  # the peers' rows beside ours, in the same table
        if "failed" in r:  # reported, never skipped in silence
            rows.append({"mode": r["system"], "refused_for": f"did not run: {r['failed']}"})
            continue
        triton = r["system"].startswith("Triton")
        best, ts = best_peer[r["concurrency"]], best_ts[r["concurrency"]]
        rows.append(
            {
                "mode": r["system"],
                "layout": r["layout"],
                "ingress": "Triton's HTTP frontend" if triton else "TorchServe's frontend",
                "served_mode": r["system"].split(",")[0].removeprefix("Triton ").lower()
                if triton
                else "torchscript fp32",
                "refused_for": "",
                "replica_allocator": "glibc (the peer's default)",
                "concurrency": r["concurrency"],
                **{k: r[k] for k in ("requests", "req_per_s", "p50_ms", "p99_ms", "errors")},
                "mean_batch": None,
                "raw_img_per_s": raw[_peer_raw(r["system"])],
                "vs_raw": r["req_per_s"] / raw[_peer_raw(r["system"])],
                "vs_raw_fp32": r["req_per_s"] / raw["fp32"],
                "vs_torchserve": r["req_per_s"] / ts if ts else None,
                "vs_best_peer": r["req_per_s"] / best if best else None,
                "top1_agreement": r["top1_agreement"],
                "start_s": r["start_s"],
                "start_phases": None,
                "rss_gib": r["rss_gib"],
                "processes": r["processes"],
            }
        )
    report(
        "serving",
        rows,
        {
            "allocator": malloc,  # of this process and the Ray processes it started
            "raw_threads": threads,
            "agreement_with_fp32_held_out": {m: checks[m][0] for m in checks},
            "fp32_classes_predicted": {m: checks[m][1] for m in checks},
            "graphs": {
                m: {
                    "calibration_agreement": g.calibration_agreement,
                    "held_out_agreement": g.held_out_agreement,
                    "images": g.images,
                    "unquantized": list(g.unquantized),
                }
                for m, g in GRAPHS.items()
            },
            "import_s": import_s,
            "import_graphs_s": imported["graphs_s"],
            "profiles": PROFILES,
            "raw_forward_cpu_ms_per_image": RAW_CPU_MS,
            "held_out_images": int(x_held.shape[0]),
            "ray_start_s": ray_start_s,
            "torchserve_c1_p50_ms": min(
                (
                    r["p50_ms"]
                    for r in ran
                    if r["concurrency"] == 1 and r["system"].startswith("TorchServe")
                ),
                default=None,
            ),
            "best_peer_c1_p50_ms": min(
                (r["p50_ms"] for r in ran if r["concurrency"] == 1), default=None
            ),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
        },
    )
    return 0


ADMIN_TOKEN = "bench-admin"


def _peer_raw(system: str) -> str:
    """The raw forward a peer configuration's rate compares with: the graph it serves, else
    fp32 eager (TorchScript)."""
    if "INT8" in system:
        return "int8"
    return "openvino" if "OpenVINO" in system else "fp32"


def _ratio(ours: float, theirs: float) -> float | None:
    return ours / theirs if theirs else None


def _auto_chosen(url: str, timeout_s: float = 180.0) -> None:
    """Wait until numeric mode auto has chosen (``GET /v1/models`` lists the modes it passed
    over), bounded."""
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:  # the serving runs set no predict token: reads are open
        models = requests.get(f"{url}/v1/models", timeout=10).json()["models"]
        serving = next((m.get("serving") for m in models if m["name"] == "bench"), None)
        if serving and serving.get("passed_over"):
            print(f"[bench] auto serves {serving['mode']}", file=sys.stderr, flush=True)
            return
        time.sleep(1)
    print("[bench] auto had not chosen within the timeout", file=sys.stderr, flush=True)


def _import_over_http(
    base: Any, model: Any, pre: Any, calibration: list[bytes], expected: list[str]
) -> tuple[float, dict[str, Any]]:
    """Serve, then publish the model through ``POST /v1/models/bench/versions`` (what
    ``refit import`` sends): weights as safetensors, 500 calibration JPEGs, promoted.
    Returns the seconds until the version answered and until its graphs (made after it, in
    the replica) were stored, and the answer."""
    import requests
    from safetensors.torch import save

    from service import deployments
    from service.settings import ServeSettings
    from training.storage.registry import Registry
    from training.storage.s3 import ObjectStore

    settings = base.model_copy(
        update={"serve": ServeSettings(port=free_port(), admin_token=ADMIN_TOKEN)}
    )
    deployments.run(settings)
    try:
        url = f"http://127.0.0.1:{settings.serve.port}/v1/models/bench/versions"
        meta = {
            "backbone": "resnet18",
            "class_names": [str(i) for i in range(10)],
            "preprocessing": pre.model_dump(mode="json"),
            "promote": "production",
            "source": "benchmarks/serving.py",
        }
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        files = [("weights", ("bench.safetensors", save(state)))]
        files += [("calibration", (f"{i}.jpg", j)) for i, j in enumerate(calibration)]
        started = time.perf_counter()
        r = requests.post(
            url,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            data={"metadata": json.dumps(meta)},
            files=files,
            timeout=1800,
        )
        took = time.perf_counter() - started
        r.raise_for_status()
        answer: dict[str, Any] = r.json()
        registry = Registry(ObjectStore(base.s3))
        deadline = time.monotonic() + 1800
        while answer["graphs_pending"] and not registry.has_graph_set("bench", answer["version"]):
            if time.monotonic() > deadline:
                raise RuntimeError("the imported version's graphs were not stored in 30 min")
            time.sleep(0.5)
        answer["graphs_s"] = time.perf_counter() - started
        return took, answer
    finally:
        deployments.shutdown()


def _serve_rows(
    base: Any,
    mode: str,
    replicas: int,
    cpus: float,
    args: Any,
    jpegs: list[bytes],
    expected: list[str],
    levels: list[int],
    raw: dict[str, float],
    peers: dict[str, dict[int, float]],
    ray_start_s: float,
    store_pids: tuple[int, ...],
) -> list[dict[str, Any]]:
    """One row per concurrency for one mode and layout, served through Ray Serve."""
    import os

    from load import tree_rss_bytes
    from profiling import cpu_per_request, cpu_seconds
    from torchserve_peer import top1_agreement

    from service import deployments
    from service.settings import ServeSettings

    settings = base.model_copy(
        update={
            "serve": ServeSettings(
                port=free_port(),
                ingress=base.serve.ingress,
                numeric_mode=mode,
                metrics_token=SCRAPE_TOKEN,
                classifier_replicas=replicas,
                classifier_cpus=cpus,
                max_batch_size=args.max_batch_size,
                max_ongoing_requests=128,
                start_job_runner=False,  # a serving-only run: no job runner
            )
        }
    )
    started = time.perf_counter()
    deployments.run(settings)
    deployed = time.perf_counter()
    url = f"http://127.0.0.1:{settings.serve.port}"
    predict = f"{url}/v1/models/bench/predict"
    _first_answer(predict, jpegs[0], expected[0])
    start_s = ray_start_s + time.perf_counter() - started
    # where start-up goes: Ray, then Serve and the replica (process, imports, app), then the
    # first answer (the model's first load: verify, build or compile, the mode gate)
    phases = {
        "ray_s": round(ray_start_s, 2),
        "deploy_s": round(deployed - started, 2),
        "first_load_s": round(time.perf_counter() - deployed, 2),
    }
    rows = []
    try:
        run_load(predict, jpegs, concurrency=4, seconds=3)  # every replica loads, warms up
        if mode == "auto":  # it answers in fp32 first: wait for its choice
            _auto_chosen(url)
        agreement_http = top1_agreement(predict, jpegs[:32], expected[:32])
        state = _scrape(url)
        served_mode = next((k[5:] for k in state if k.startswith("mode:")), "unknown")
        refused = next((k[8:] for k in state if k.startswith("refused:")), "")
        if mode == "auto":  # the modes it passed over, and why
            refused = ", ".join(sorted(k[7:] for k in state if k.startswith("passed:")))
        replica_malloc = next((k[10:] for k in state if k.startswith("allocator:")), "?")
        for body, c in [(b, c) for b in args.bodies.split(",") for c in levels]:
            target, raw_body = BODIES[body]
            before = _scrape(url)
            cpu_before = cpu_seconds(os.getpid(), store_pids)
            res = run_load(
                f"{url}{target}", jpegs, concurrency=c, seconds=args.seconds, raw=raw_body
            )
            cpu_after = cpu_seconds(os.getpid(), store_pids)
            after = _scrape(url)
            s = res.summary()
            # CPU of the serving side (every process this script started but the store; the
            # script itself is the client), per request; less the bare forward's CPU per
            # image in the mode served, what the request path costs
            server_ms = sum(
                r["cpu_ms_per_request"]
                for r in cpu_per_request(cpu_before, cpu_after, len(res.latencies))
                if r["pid"] != os.getpid()
            )
            forward_ms = RAW_CPU_MS.get(served_mode, RAW_CPU_MS.get("fp32", 0.0))
            # /metrics answers from one replica: its batch sizes speak for it alone
            batches = after["refit_batch_size_count"] - before["refit_batch_size_count"]
            reqs = after["refit_batch_size_sum"] - before["refit_batch_size_sum"]
            # every process of the Ray session this script started (the store excluded)
            per_process: dict[str, int] = {}
            rss, procs = tree_rss_bytes(os.getpid(), skip=store_pids, into=per_process)
            if c == levels[-1]:
                print(f"[bench] RSS by process: {per_process}", file=sys.stderr, flush=True)
            rows.append(
                {
                    "mode": mode,
                    "layout": f"{replicas}x{cpus:g}",
                    "ingress": settings.serve.ingress,
                    "served_mode": served_mode,
                    "replica_allocator": replica_malloc,
                    "refused_for": refused,
                    "body": body,
                    "concurrency": c,
                    **s,
                    "mean_batch": reqs / max(1.0, batches) if replicas == 1 else None,
                    "raw_img_per_s": raw.get(served_mode, raw["fp32"]),
                    "vs_raw": s["req_per_s"] / raw.get(served_mode, raw["fp32"]),
                    "vs_raw_fp32": s["req_per_s"] / raw["fp32"],
                    "vs_torchserve": s["req_per_s"] / ts
                    if (ts := peers["torchserve"][c])
                    else None,
                    "vs_best_peer": s["req_per_s"] / b if (b := peers["best"][c]) else None,
                    "top1_agreement": agreement_http,
                    "server_cpu_ms_per_request": round(server_ms, 2),
                    "raw_forward_cpu_ms_per_image": round(forward_ms, 2),
                    "path_cpu_ms_per_request": round(server_ms - forward_ms, 2),
                    "start_s": start_s,
                    "start_phases": phases,
                    "rss_gib": rss / 2**30,
                    "processes": procs,
                }
            )
            print(f"[bench] {rows[-1]}", file=sys.stderr, flush=True)
        if args.profile:
            PROFILES[f"{mode} {replicas}x{cpus:g} {settings.serve.ingress}"] = _profile(
                predict, jpegs, levels[-1], args.seconds, store_pids
            )
    finally:
        deployments.shutdown()
    return rows


PROFILES: dict[str, dict[str, Any]] = {}

BODIES: dict[str, tuple[str, Any]] = {
    "json": ("/v1/models/bench/predict", None),
    "multipart": ("/v1/models/bench/predict", multipart_body),
    "oip-binary": ("/v2/models/bench/infer", oip_binary_body),
}
"""Request body -> (route, how one JPEG becomes that body; None: JSON with base64)."""


def _profile(
    predict: str, jpegs: list[bytes], concurrency: int, seconds: float, skip: tuple[int, ...]
) -> dict[str, Any]:
    """One more load run, with py-spy on every classifier replica and CPU per process."""
    import os

    from profiling import PySpy, cpu_per_request, cpu_seconds
    from ray._private.state import actors  # the GCS table: no dashboard needed

    replicas = [
        int(a["Pid"])
        for a in actors(actor_state_name="ALIVE").values()
        if a["ActorClassName"].endswith(":Classifier")  # our app's replicas, in our own Ray
    ]
    spies = {
        pid: PySpy(pid, seconds, Path(tempfile.gettempdir()) / f"refit-spy-{pid}.txt")
        for pid in replicas
    }
    before = cpu_seconds(os.getpid(), skip)
    res = run_load(predict, jpegs, concurrency=concurrency, seconds=seconds)
    after = cpu_seconds(os.getpid(), skip)
    requests = len(res.latencies)
    out = {
        "concurrency": concurrency,
        "req_per_s_under_profiler": res.summary()["req_per_s"],
        "cpu_ms_per_request": cpu_per_request(before, after, requests),
        "replicas": {str(pid): spy.result() for pid, spy in spies.items()},
    }
    total = sum(r["cpu_ms_per_request"] for r in out["cpu_ms_per_request"])
    print(f"[bench] CPU per request at c={concurrency}: {total:.1f} ms", file=sys.stderr)
    for r in out["cpu_ms_per_request"][:8]:
        print(f"    {r['cpu_ms_per_request']:7.2f} ms  {r['process']}", file=sys.stderr)
    for pid, summary in out["replicas"].items():
        print(f"[bench] py-spy replica {pid}: {summary.get('by_stage', summary)}", file=sys.stderr)
        for leaf, share in list(summary.get("top_leaves", {}).items())[:10]:
            print(f"    {share:6.1%}  {leaf}", file=sys.stderr)
    sys.stderr.flush()
    return out


if __name__ == "__main__":
    if sys.argv[1:2] == ["--raw-graph"]:  # the child of _graph_in_child
        _raw_graph_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5]))
        sys.exit(0)
    sys.exit(main())
