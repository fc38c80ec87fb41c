"""CPU per request of the pieces of the predict path that are not the model, each beside the
way it was done before, alternated in one process (this machine's speed drifts by 15 % and
more between runs, so whole-stack benchmarks cannot show a change of a tenth of a
millisecond; these can).

* **API layer**: ``POST /v1/models/{model}/predict`` (JSON, one 224 px digit JPEG, base64)
  through the real app (``create_app``: middleware, auth with a predict token, validation,
  response model) over ``httpx.ASGITransport``, 32 requests at a time, with a data plane
  that answers at once (the model and the decode are measured elsewhere). Baseline: the
  same app with its auth, settings and data-plane dependencies as plain ``def`` functions
  (``app.dependency_overrides``), which FastAPI runs in AnyIO's worker threads - how they
  were before.
* **Decode and crop**: one JPEG to the uint8 crop the lane batches, through
  ``decode_request_images`` (torchvision's kernels) beside the v2 ``Compose`` of the same
  steps and Pillow's ``convert`` copy (how it was before).

* **Decode beside the forward** (what the next cut would change): a forward pass of 16 images
  on two threads back to back, with the 16 images of each pass decoded and cropped meanwhile in
  a pool of 1, 2 or 6 threads (6: ``asyncio.to_thread``'s pool on two cores, as served), or
  serially on the forward's own thread before it; beside the sum of the parts measured alone.
  The forward is resnet18 in fp32 on 96 px inputs, a stand-in costing about what the INT8
  graph costs per image at 224 px here (no graph export in this script).

CPU is the process's (user + system, ``getrusage``) over each window; the client's share of
the API rows is the same in both variants, so their difference is the server side's.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import resource
import statistics
import time
from typing import Annotated, Any

from common import report  # also puts the repository on sys.path
from fastapi import Depends, Request, Security
from load import digit_jpegs

from service.api import auth, params
from service.settings import ServeSettings


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _medians(samples: dict[str, list[tuple[float, float]]], second: str) -> list[dict[str, Any]]:
    """One row per variant: the medians of its windows' (CPU ms, ``second``), and its CPU
    over the first variant's (the baseline)."""
    base = statistics.median(c for c, _ in next(iter(samples.values())))
    return [
        {
            "piece": name,
            "cpu_ms_per_request": round(statistics.median(c for c, _ in s), 3),
            second: round(statistics.median(v for _, v in s), 3),
            "vs_before": round(statistics.median(c for c, _ in s) / base, 3),
        }
        for name, s in samples.items()
    ]


class _AnsweringPlane:
    """A data plane that answers every prediction at once (no model, no decode)."""

    async def predict(self, model: str, images: list[bytes], top_k: int) -> dict[str, Any]:
        return {
            "model": model,
            "model_version": "v1",
            "prediction_id": "p" * 32,
            "predictions": [[{"label": str(i), "score": 0.1} for i in range(top_k)]],
        }


# The app's async dependencies as the plain functions they were (same bodies); module-level,
# so FastAPI resolves the names in their annotations.
def _sync_serve_settings(request: Request) -> ServeSettings:
    settings: ServeSettings = request.app.state.settings
    return settings


def _sync_dataplane(request: Request) -> Any:
    return request.app.state.dataplane


def _sync_require_predict(
    settings: Annotated[ServeSettings, Depends(_sync_serve_settings)],
    credentials: Annotated[auth.Credentials, Security(auth.predict_bearer)],
) -> None:
    if settings.predict_token is None:
        return
    token = auth._token(credentials)
    if not (
        auth._matches(token, settings.predict_token) or auth._matches(token, settings.admin_token)
    ):
        raise auth.InvalidTokenError("not a valid token")


SYNC_OVERRIDES: dict[Any, Any] = {
    auth.serve_settings: _sync_serve_settings,
    params.dataplane: _sync_dataplane,
    auth.require_predict: _sync_require_predict,
}


def api_layer(seconds: float, rounds: int, concurrency: int) -> list[dict[str, Any]]:
    """Alternated windows of the two variants; per variant the median over its windows."""
    import httpx

    from service.api import create_app
    from service.settings import RefitSettings

    settings = RefitSettings.model_validate({"serve": {"predict_token": "p"}})
    app = create_app(settings, _AnsweringPlane())  # type: ignore[arg-type]
    body = {"images": [base64.b64encode(digit_jpegs(1)[0][0]).decode()], "top_k": 5}
    headers = {"Authorization": "Bearer p"}
    variants = {
        "API layer, dependencies plain def (before: AnyIO worker threads)": SYNC_OVERRIDES,
        "API layer, dependencies async (now)": {},
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}

    async def window(client: httpx.AsyncClient) -> tuple[int, float, float]:
        n, cpu0, t0 = 0, _cpu(), time.perf_counter()
        deadline = t0 + seconds

        async def one() -> None:
            nonlocal n
            while time.perf_counter() < deadline:
                r = await client.post("/v1/models/m/predict", json=body, headers=headers)
                if r.status_code != 200:
                    raise RuntimeError(f"{r.status_code}: {r.text}")
                n += 1

        await asyncio.gather(*(one() for _ in range(concurrency)))
        return n, _cpu() - cpu0, time.perf_counter() - t0

    async def run() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            for overrides in variants.values():  # warm-up: threads, caches
                app.dependency_overrides = overrides
                await window(client)
            for r in range(rounds):
                for name, overrides in variants.items():
                    app.dependency_overrides = overrides
                    n, cpu, wall = await window(client)
                    samples[name].append((1000 * cpu / n, n / wall))
                    print(f"[bench] round {r + 1}/{rounds} {name}: {1000 * cpu / n:.3f} ms CPU")

    asyncio.run(run())
    return _medians(samples, "req_per_s")


def decode_and_crop(images: int, rounds: int) -> list[dict[str, Any]]:
    """Per image CPU of the request decode now and as before, alternated."""
    import torch

    from service.runtime.images import decode_request_images
    from training.data import decode_image
    from training.preprocess import crop_transform
    from training.preprocessing_spec import Preprocessing

    torch.set_num_threads(2)
    jpegs, _ = digit_jpegs(images)
    pre = Preprocessing()
    compose = crop_transform(pre)

    def before(data: bytes) -> torch.Tensor:
        img = decode_image(data, max_pixels=1 << 24, draft_to=pre.resize_size)
        return compose(img.convert("RGB"))  # convert() copied even an RGB image

    def now(data: bytes) -> torch.Tensor:
        return decode_request_images(
            [data], max_image_bytes=1 << 24, max_pixels=1 << 24, preprocessing=pre
        )[0]

    for data in jpegs:  # the same crops, bit for bit
        if not torch.equal(before(data), now(data)):
            raise AssertionError("the two decode paths disagree")
    variants = {"decode + crop, v2 Compose (before)": before, "decode + crop, kernels (now)": now}
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            cpu0 = _cpu()
            for data in jpegs:
                fn(data)
            samples[name].append(1000 * (_cpu() - cpu0) / len(jpegs))
    base = statistics.median(next(iter(samples.values())))
    return [
        {
            "piece": name,
            "cpu_ms_per_request": round(statistics.median(s), 3),
            "vs_before": round(statistics.median(s) / base, 3),
        }
        for name, s in samples.items()
    ]


def decode_beside_forward(rounds: int, passes: int) -> list[dict[str, Any]]:
    """CPU and wall time per image of a forward with its batch's decode beside it (a pool of
    threads) or before it (the same thread), and of the parts alone; medians over rounds."""
    import concurrent.futures as cf

    import torch

    from service.runtime.images import decode_request_images
    from training.backbones import build_backbone
    from training.preprocessing_spec import Preprocessing

    torch.set_num_threads(2)
    pre = Preprocessing()
    jpegs, _ = digit_jpegs(256)
    model = build_backbone("resnet18", num_classes=10).eval()
    x = torch.randn(16, 3, 96, 96)

    def decode(data: bytes) -> torch.Tensor:
        return decode_request_images(
            [data], max_image_bytes=1 << 24, max_pixels=1 << 24, preprocessing=pre
        )

    def timed(fn: Any) -> tuple[float, float]:
        cpu0, t0 = _cpu(), time.perf_counter()
        fn()
        n = 16 * passes
        return 1000 * (_cpu() - cpu0) / n, 1000 * (time.perf_counter() - t0) / n

    def forward_alone() -> None:
        for _ in range(passes):
            model(x)

    def decode_alone() -> None:
        for i in range(16 * passes):
            decode(jpegs[i % len(jpegs)])

    def serial() -> None:
        for i in range(passes):
            for k in range(16):
                decode(jpegs[(16 * i + k) % len(jpegs)])
            model(x)

    def pooled(pool: cf.ThreadPoolExecutor) -> None:
        for i in range(passes):
            futures = [pool.submit(decode, jpegs[(16 * i + k) % len(jpegs)]) for k in range(16)]
            model(x)
            for f in futures:
                f.result()

    samples: dict[str, list[tuple[float, float]]] = {}
    pools = {w: cf.ThreadPoolExecutor(w) for w in (1, 2, 6)}
    try:
        with torch.inference_mode():
            forward_alone()  # warm-up
            for r in range(rounds):
                parts = [timed(forward_alone), timed(decode_alone)]
                samples.setdefault("sum of the parts, each alone (baseline)", []).append(
                    (parts[0][0] + parts[1][0], parts[0][1] + parts[1][1])
                )
                samples.setdefault("decode serially on the forward's thread", []).append(
                    timed(serial)
                )
                for w, pool in pools.items():
                    name = f"decode in a pool of {w} beside the forward"
                    samples.setdefault(name, []).append(timed(lambda pool=pool: pooled(pool)))
                print(f"[bench] decode beside the forward: round {r + 1}/{rounds}")
    finally:
        for pool in pools.values():
            pool.shutdown()
    return _medians(samples, "wall_ms_per_image")


def main() -> int:
    """Run both parts; print the table; write results/request_path.json."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seconds", type=float, default=5.0, help="per API window")
    p.add_argument("--rounds", type=int, default=5, help="alternations of each part")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--images", type=int, default=200, help="JPEGs per decode window")
    p.add_argument("--passes", type=int, default=20, help="forward passes per window")
    args = p.parse_args()
    rows = api_layer(args.seconds, args.rounds, args.concurrency)
    rows += decode_and_crop(args.images, args.rounds)
    rows += decode_beside_forward(args.rounds, args.passes)
    report(
        "request_path",
        rows,
        {
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "seconds_per_window": args.seconds,
            "cpu_count": len(__import__("os").sched_getaffinity(0)),
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
