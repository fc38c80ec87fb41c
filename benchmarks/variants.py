"""Many fine-tuned variants of one backbone served by one process: what they cost.

A locally trained resnet18 (``serving.py``'s benchmark model, 224 px digits) is the base;
``--head-variants`` ``head_only`` fine-tunes of it (each head fitted on its own bootstrap of
the base's trunk features) and ``--layer4-variants`` ``last_n_stages=1`` fine-tunes (a few
steps on ``layer4`` and the head, every other stage frozen and byte-identical) are published
as models of their own, each with its ``production`` alias.

Reported, all from this one run:

* storage: the bytes each kind of variant wrote (stage by stage, each stage written once:
  ``training.storage.stage_files``) beside what separate copies would take;
* serving, in one process (:class:`service.runtime.model_host.ModelHost`, the classifier
  replica's model layer without Ray Serve; ``--mode``, fp32 by default), closed-loop at
  ``--concurrency`` for ``--seconds`` each:

  - ``one model`` (the baseline): every request for the same variant;
  - ``variants, default cache``: a variant picked at random per request, with the
    replica's defaults (``REFIT_SERVE__MODEL_CACHE_MB`` 1024, ``MODELS_PER_REPLICA`` 64),
    every variant loaded before the clock starts (they fit);
  - ``variants, N MB budget``: the same with ``MODEL_CACHE_MB`` = ``--small-budget-mb``
    (default 128: one trunk and a few private ``layer4``s), so the least recently used are
    parked and requests meet cold variants; with the replica's stage cache on (a cold
    variant reads only the stages it does not share with a version read before) and off
    (``STAGE_CACHE_MB=0``: every stage read);

  req/s (and its ratio to ``one model``), p50/p99, loads (cold variants) and their mean read
  time, and the resident model memory: the distinct bytes of every loaded model's tensors
  (a tensor two models share counts once) and, in a traced or graph mode, each trace or graph
  once (estimated from its weights' bytes), beside one model's.

In fp32 a replica holds the stages its versions share once (``service.runtime.shared_stages``)
and runs one trunk pass for the merged requests of versions that differ only in the head
(``shared_trunk_passes``); a fan-out (``POST /v1/variants/predict``'s host call) of one image
to ``--fan-out`` head-only variants is timed against one model's answer to the same image, and
a head-only variant published while its trunk is resident is timed from its first request to
its answer (a cold load that reads only its head).
``--peer-models`` (8) of the variants are served by Refit alone and by TorchServe 0.12 (its own
venv, ``benchmarks/torchserve/setup.sh``), each a registered model there, against TorchServe
serving one model in the same run: req/s and the whole server's memory. A TorchServe that
cannot start is reported in the table.
In ``fp32_jit``/``bf16_jit`` versions of one trunk run one trace of it (each its own head).
Not built yet, so not measured (issue 28): shared trunks in the graph modes (OpenVINO, INT8).

    python benchmarks/variants.py [--head-variants 56] [--layer4-variants 8] [--seconds 15]
                                  [--concurrency 32] [--mode fp32] [--threads 2] [--fan-out 8]
                                  [--small-budget-mb 128]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from typing import Any

from common import digits_store, report  # also puts the repository on sys.path
from load import reexec_with_jemalloc
from serving import build_model


def _log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def head_variant(base: Any, feats: Any, labels: Any, seed: int) -> dict[str, Any]:
    """A head-only fine-tune: the base's head fitted again on a bootstrap of its features."""
    import torch

    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(feats), (len(feats),), generator=g)
    head = torch.nn.Linear(feats.shape[1], base["fc.weight"].shape[0])
    head.load_state_dict({"weight": base["fc.weight"], "bias": base["fc.bias"]})
    opt = torch.optim.Adam(head.parameters(), lr=0.005)
    for _ in range(20):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(feats[idx]), labels[idx]).backward()
        opt.step()
    state = dict(base)
    state["fc.weight"], state["fc.bias"] = head.weight.detach(), head.bias.detach()
    return state


def layer4_variant(model: Any, x: Any, labels: Any, seed: int) -> dict[str, Any]:
    """A ``last_n_stages=1`` fine-tune: a few steps on ``layer4`` and the head, everything
    else frozen (eval mode: BatchNorm statistics of the frozen stages unchanged)."""
    import copy

    import torch

    net = copy.deepcopy(model).eval()
    trainable = [*net.layer4.parameters(), *net.fc.parameters()]
    for p in net.parameters():
        p.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.SGD(trainable, lr=0.01)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        idx = torch.randint(0, len(x), (16,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[idx]), labels[idx]).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def publish_variants(
    settings: Any, store: Any, args: argparse.Namespace
) -> tuple[list[str], list[bytes], dict[str, Any]]:
    """The base and its variants as published models; their names, the request JPEGs and
    what their weights wrote."""
    import torch

    from training.backbones import trunk
    from training.preprocess import normalize
    from training.stage_digests import split_stages
    from training.storage.registry import Registry
    from training.storage.stage_files import StageCache

    model, pre, crops, jpegs = build_model(args.threads)
    x = normalize(pre, crops[:200])
    with torch.inference_mode():
        labels = model(x).argmax(1)
        feats = trunk(model, "resnet18")(x).flatten(1)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    writer = Registry(store, cache=StageCache(512 * 1024 * 1024))
    fields = {
        "backbone": "resnet18",
        "num_classes": 10,
        "class_names": [str(d) for d in range(10)],
        "preprocessing": pre,
    }

    graph_modes = args.mode in ("openvino", "int8", "auto")
    if graph_modes:  # each version's gate needs its calibration crops (real ones)
        fields["calibration"] = crops[200:216]

    def publish(name: str, state: dict[str, Any], parent: str | None, **extra: Any) -> dict:
        m = writer.publish(
            split_stages(state, "resnet18", 10), model=name, parent=parent, **fields, **extra
        )
        writer.set_alias(name, "production", m.version)
        return m.weights_storage()

    # the graph modes: the base's graphs, as its job makes them; its variants make none
    # (each cuts its trunk from the base's graph, its head in torch)
    graphs = _base_graphs(model, x, normalize(pre, crops[216:280])) if graph_modes else {}
    first = publish("base", base, None, **graphs)
    parent = f"base@{writer.serving('base', 'production').version}"
    names, written = [], {"head_only": [], "last_n_stages_1": []}
    started = time.perf_counter()
    for i in range(args.head_variants):
        state = head_variant(base, feats, labels, seed=i)
        names.append(f"head-{i:02d}")
        written["head_only"].append(publish(names[-1], state, parent)["written_bytes"])
    for i in range(args.layer4_variants):
        state = layer4_variant(model, x, labels, seed=1000 + i)
        names.append(f"layer4-{i:02d}")
        written["last_n_stages_1"].append(publish(names[-1], state, parent)["written_bytes"])
    _log(f"published {len(names)} variants in {time.perf_counter() - started:.1f} s")
    one = first["written_bytes"]
    storage = {
        "one_model_bytes": one,
        "variants": len(names),
        "written_bytes_head_only_each": max(written["head_only"], default=0),
        "written_bytes_last_n_stages_1_each": max(written["last_n_stages_1"], default=0),
        "written_bytes_all_variants": sum(sum(v) for v in written.values()),
        "separate_copies_bytes": one * len(names),
    }
    request_jpegs = jpegs[200:328]
    del base, model  # only the store's copies from here
    return names, request_jpegs, storage


def _base_graphs(model: Any, x: Any, held_out: Any) -> dict[str, Any]:
    """The base's OpenVINO and INT8 graphs made as a job makes them (a child process, NNCF
    with the agreement gate; ``x`` calibration crops, normalised), as ``publish``
    arguments."""
    from training.openvino_ir import ExportChild, ir_files

    _log("exporting the base's graphs (OpenVINO, INT8): setup, not timed")
    with ExportChild() as child:
        graphs = child.export(
            model.state_dict(),
            backbone="resnet18",
            num_classes=10,
            calibration=x,
            held_out=held_out,
            min_agreement=0.99,
        )
    files, records = {}, {}
    for g in graphs:
        xml, weights = ir_files(g.mode)
        files[xml], files[weights] = g.xml, g.weights
        records[g.mode] = {"files": [xml, weights], **g.measured()}
        _log(f"{g.mode}: agreement {g.calibration_agreement:.3f} on {g.images} crops")
    return {"extra_files": files, "graphs": records}


class _CountingRegistry:
    """The registry's reads of a version's weights, counted and timed (each is one cold
    variant; stages a resident version holds are not read)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self.loads: list[float] = []
        original = registry.read_weights

        def read_weights(*a: Any, **kw: Any) -> Any:
            started = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                self.loads.append(time.perf_counter() - started)

        registry.read_weights = read_weights


async def _drive(
    host: Any, names: list[str], jpegs: list[bytes], concurrency: int, seconds: float
) -> dict[str, Any]:
    import numpy as np

    rng = random.Random(0)
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors
        while time.perf_counter() < end:
            name, jpeg = rng.choice(names), rng.choice(jpegs)
            started = time.perf_counter()
            try:
                follower = await host.follower(name)
                await host.predict(follower, [jpeg], 1)
                latencies.append(time.perf_counter() - started)
            except Exception as exc:  # counted: a benchmark reports failures, never hides them
                errors += 1
                _log(f"{name}: {type(exc).__name__}: {exc}")

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([float("nan")])
    return {
        "requests": len(latencies),
        "req_per_s": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "errors": errors,
    }


def serve_row(
    label: str,
    settings: Any,
    names: list[str],
    jpegs: list[bytes],
    args: argparse.Namespace,
    *,
    model_cache_mb: int,
    stage_cache_mb: int,
    preload: bool,
) -> dict[str, Any]:
    """One closed-loop run on a fresh model host (its own stage cache)."""
    from service.runtime.model_host import ModelHost
    from service.settings import ServeSettings
    from training.storage.registry import Registry
    from training.storage.s3 import ObjectStore
    from training.storage.stage_files import StageCache

    serve = ServeSettings(
        numeric_mode=args.mode,
        model_cache_mb=model_cache_mb,
        poll_interval_s=600,  # no alias moves here: no polling beside the load
        stage_cache_mb=stage_cache_mb,
    )
    registry = Registry(ObjectStore(settings.s3), cache=StageCache(stage_cache_mb * 1024 * 1024))
    counting = _CountingRegistry(registry)
    host = ModelHost(serve, registry)

    async def run() -> dict[str, Any]:
        if preload:  # loaded before the clock starts
            for name in names:
                await host.follower(name)
            counting.loads.clear()
        else:
            await host.follower(names[0])  # the first load is no one's cold start
        result = await _drive(host, names, jpegs, args.concurrency, args.seconds)
        # the replica's own figure: distinct tensor bytes of its eager models
        # the replica's own figure (what its byte budget counts): distinct tensor bytes of
        # its models, plus each trace or graph once (estimated from the weights' bytes)
        result["resident_model_bytes"] = host.stats()["model_cache"]["bytes"]
        result["parks"] = host.stats()["model_cache"]["parks"]
        return result

    _log(f"{label}: {args.seconds:.0f} s at c={args.concurrency}")
    result = asyncio.run(run())
    for follower in list(host.followers.values()):
        follower.stop()
    loads = counting.loads
    return {
        "run": label,
        **result,
        "model_cache_mb": model_cache_mb,
        "stage_cache_mb": stage_cache_mb,
        "cold_loads": len(loads),
        "mean_read_ms": round(1000 * sum(loads) / len(loads), 1) if loads else None,
        "stage_reads_memory": registry.cache.hits,
        "stage_reads_store": registry.cache.misses,
        "shared_trunk_passes": host.stats()["shared_trunk_passes"],
        "mean_batch": _mean_batch(host.stats()["batch_sizes"]),
    }


def _mean_batch(sizes: dict[int, int]) -> float | None:
    n = sum(sizes.values())
    return round(sum(k * v for k, v in sizes.items()) / n, 2) if n else None


def fan_out_row(
    settings: Any, names: list[str], jpegs: list[bytes], args: argparse.Namespace
) -> dict[str, Any]:
    """One image to ``--fan-out`` head-only variants in one request, against one model's
    answer to the same image (c=1, alternated, the mean of ``--fan-out-rounds`` each)."""
    from service.runtime.model_host import ModelHost
    from service.settings import ServeSettings
    from training.storage.registry import Registry
    from training.storage.s3 import ObjectStore
    from training.storage.stage_files import StageCache

    heads = [n for n in names if n.startswith("head-")][: args.fan_out]
    serve = ServeSettings(
        numeric_mode=args.mode, models_per_replica=len(heads), poll_interval_s=600
    )
    host = ModelHost(serve, Registry(ObjectStore(settings.s3), cache=StageCache(256 << 20)))

    async def run() -> dict[str, Any]:
        followers = [await host.follower(n) for n in heads]
        one, many = [], []
        for i in range(args.fan_out_rounds + 2):  # the first two warm up
            jpeg = jpegs[i % len(jpegs)]
            started = time.perf_counter()
            await host.predict(followers[0], [jpeg], 1)
            middle = time.perf_counter()
            await host.predict_many(followers, [jpeg], 1)
            if i >= 2:
                one.append(middle - started)
                many.append(time.perf_counter() - middle)
        late, reads_before = _publish_late_head(settings), host.registry.cache.misses
        started = time.perf_counter()
        follower = await host.follower(late)
        await host.predict(follower, [jpegs[0]], 1)
        late_ms = 1000 * (time.perf_counter() - started)
        followers.append(follower)
        for f in followers:
            f.stop()
        mean_one, mean_many = sum(one) / len(one), sum(many) / len(many)
        return {
            "run": f"fan-out: 1 image to {len(heads)} variants vs 1 model",
            "one_model_ms": round(1000 * mean_one, 2),
            "fan_out_ms": round(1000 * mean_many, 2),
            "fan_out_vs_one_forward": round(mean_many / mean_one, 3),
            "shared_trunk_passes": host.stats()["shared_trunk_passes"],
            "new_head_variant_first_answer_ms": round(late_ms, 1),
            "new_head_variant_stage_files_read": host.registry.cache.misses - reads_before,
        }

    _log(f"fan-out to {len(heads)} variants, {args.fan_out_rounds} rounds")
    return asyncio.run(run())


def _publish_late_head(settings: Any) -> str:
    """One more head-only variant of the base, published now (its trunk is resident in the
    host that loads it next)."""
    from training.stage_digests import split_stages
    from training.storage.registry import Registry
    from training.storage.s3 import ObjectStore

    registry = Registry(ObjectStore(settings.s3))
    manifest, state = registry.load("base", "production")
    state["fc.bias"] = state["fc.bias"] + 0.01
    published = registry.publish(
        split_stages(state, manifest.backbone, manifest.num_classes),
        model="late-head",
        backbone=manifest.backbone,
        num_classes=manifest.num_classes,
        class_names=manifest.class_names,
        preprocessing=manifest.preprocessing,
        parent=f"base@{manifest.version}",
    )
    registry.set_alias("late-head", "production", published.version)
    return "late-head"


def _peer_set(names: list[str], n: int) -> list[str]:
    """The variants both servers serve in the side-by-side rows: head-only ones and one
    ``last_n_stages=1`` variant (its own ``layer4``)."""
    if n <= 0:
        return []
    layer4 = [x for x in names if x.startswith("layer4-")][:1]
    heads = [x for x in names if x.startswith("head-")][: n - len(layer4)]
    return heads + layer4


def _torchserve(
    settings: Any, names: list[str], jpegs: list[bytes], args: argparse.Namespace
) -> list[dict[str, Any]]:
    """TorchServe serving ``names[0]`` alone, then the variants ``names[1:]``: every one a
    registered model (TorchScript of its weights, read from the store), the same JPEGs and
    closed-loop client. A TorchServe that cannot start is reported, not skipped silently."""
    from torchserve_peer import torchserve_variant_rows

    from training.backbones import build_with_weights
    from training.storage.registry import Registry
    from training.storage.s3 import ObjectStore

    registry = Registry(ObjectStore(settings.s3))
    models = {}
    for name in dict.fromkeys(names):
        manifest, state = registry.load(name, "production")
        net = build_with_weights(manifest.backbone, state, num_classes=manifest.num_classes)
        models[name.replace("-", "_")] = net.eval()
    try:
        return torchserve_variant_rows(models, jpegs, args.concurrency, args.seconds)
    except Exception as exc:  # reported in the table, never a silent skip
        _log(f"TorchServe could not run: {type(exc).__name__}: {exc}")
        return []


def _released() -> None:
    """The last run's models freed before the next run starts."""
    import gc

    from service.runtime.hotload import trim_heap

    gc.collect()
    trim_heap()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--head-variants", type=int, default=56)
    p.add_argument("--layer4-variants", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--mode", default="fp32", help="REFIT_SERVE__NUMERIC_MODE of the host")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fan-out", type=int, default=8, help="variants one image goes to (1: skip)")
    p.add_argument("--fan-out-rounds", type=int, default=30)
    p.add_argument("--small-budget-mb", type=int, default=128)
    p.add_argument(
        "--peer-models",
        type=int,
        default=8,
        help="variants registered in TorchServe beside Refit serving the same (0: no peer)",
    )
    p.add_argument("--no-jemalloc", action="store_true")
    args = p.parse_args()
    # the graph modes run as their replicas do: OpenVINO aborts under a preloaded jemalloc
    graph_mode = args.mode in ("openvino", "int8", "auto")
    allocator = reexec_with_jemalloc(not args.no_jemalloc and not graph_mode)
    import torch

    torch.set_num_threads(args.threads)
    with digits_store() as (settings, store):
        names, jpegs, storage = publish_variants(settings, store, args)
        _log(f"storage: {storage}")
        small = args.small_budget_mb
        peer_set = _peer_set(names, args.peer_models)
        # (label, variants served, model cache MB, stage cache MB, loaded before the clock)
        runs = [
            ("one model", names[:1], 1024, 256, True),
            ("variants, default cache", names, 1024, 256, True),
            (f"variants, {small} MB budget, stage cache on", names, small, 256, False),
            (f"variants, {small} MB budget, stage cache off", names, small, 0, False),
        ]
        if peer_set:
            label = f"{len(peer_set)} variants (the TorchServe set), default cache"
            runs.append((label, peer_set, 1024, 256, True))
        rows = []
        for label, served, budget, cache_mb, preload in runs:
            rows.append(
                serve_row(
                    label,
                    settings,
                    served,
                    jpegs,
                    args,
                    model_cache_mb=budget,
                    stage_cache_mb=cache_mb,
                    preload=preload,
                )
            )
            _released()
        fan_out = fan_out_row(settings, names, jpegs, args) if args.fan_out > 1 else None
        peer = _torchserve(settings, names[:1] + peer_set, jpegs, args) if peer_set else []
        one = rows[0]
        for row in rows:
            row["vs_one_model"] = round(row["req_per_s"] / one["req_per_s"], 3)
            row["memory_vs_one_model"] = (
                round(row["resident_model_bytes"] / one["resident_model_bytes"], 2)
                if one["resident_model_bytes"]
                else None
            )
    if peer:
        base_ts = peer[0]
        for row in peer:
            row["vs_one_model"] = round(row["req_per_s"] / base_ts["req_per_s"], 3)
            row["memory_vs_one_model"] = round(
                row["server_rss_bytes"] / base_ts["server_rss_bytes"], 2
            )
        rows += peer
    elif peer_set:
        rows.append({"run": "TorchServe: could not start (see the log above)"})
    report(
        "variants" if args.mode == "fp32" else f"variants-{args.mode}",
        rows,
        {
            "fan_out": fan_out,
            "storage": storage,
            "mode": args.mode,
            "allocator": allocator,
            "concurrency": args.concurrency,
            "variants": {"head_only": args.head_variants, "last_n_stages_1": args.layer4_variants},
            "not_built": "shared trunks in the graph modes (OpenVINO, INT8)",
            "memory_note": "Refit rows: distinct tensor bytes of the loaded models; TorchServe "
            "rows: resident memory of the whole server (frontend and workers)",
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
