"""Triton serving the benchmark's classifier, through PyTriton (its bundled ``tritonserver``,
HTTP/JSON Open Inference Protocol, Triton's dynamic batcher): the same JPEGs in (base64 in a
BYTES tensor, as Refit and TorchServe take them in JSON), the same preprocessing (short side to
256, centre crop 224, ImageNet normalisation), a batched forward of the same weights: the
OpenVINO graph Refit serves (fp32 or INT8, compiled with the same settings) or a TorchScript of
the fp32 model. Runs inside its own venv (``benchmarks/triton_serving/setup.sh``); started and
stopped by ``benchmarks/triton_peer.py``.

    server.py --model-dir DIR --kind openvino|int8|torch --threads N --instances K
              --http-port P --grpc-port P --metrics-port P [--max-batch 16] [--delay-us 2000]
"""

from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(3, 1, 1)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(3, 1, 1)
RESIZE, CROP = 256, 224


def _crop(raw: bytes) -> np.ndarray:
    """The same resize, crop and normalisation as the TorchServe handler."""
    img = Image.open(io.BytesIO(raw)).convert("RGB")
    w, h = img.size
    scale = RESIZE / min(w, h)
    img = img.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    w, h = img.size
    left, top = (w - CROP) // 2, (h - CROP) // 2
    img = img.crop((left, top, left + CROP, top + CROP))
    x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
    return (x - MEAN) / STD


def _forward(model_dir: Path, kind: str, threads: int) -> Any:
    """A function from a float32 batch [N, 3, 224, 224] to logits [N, C]."""
    if kind == "torch":
        import torch

        torch.set_num_threads(threads)
        module = torch.jit.load(str(model_dir / "model.pt")).eval()

        def run_torch(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

        return run_torch
    import openvino as ov

    core = ov.Core()
    graph = core.read_model(str(model_dir / f"{kind}.xml"))
    config = {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",  # as Refit compiles it (training.openvino_ir)
        "INFERENCE_NUM_THREADS": threads,
    }
    compiled = core.compile_model(graph, "CPU", config)
    request = compiled.create_infer_request()

    def run_graph(x: np.ndarray) -> np.ndarray:
        result = request.infer({0: np.ascontiguousarray(x)})
        return np.array(result[compiled.output(0)], dtype=np.float32)

    return run_graph


def main() -> None:
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    p = argparse.ArgumentParser()
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--kind", choices=("openvino", "int8", "torch"), required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--instances", type=int, default=1)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument("--metrics-port", type=int, required=True)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--delay-us", type=int, default=2000)
    args = p.parse_args()

    def make_infer() -> Any:
        forward = _forward(args.model_dir, args.kind, args.threads)

        @batch
        def infer(images: np.ndarray) -> dict[str, np.ndarray]:
            x = np.stack([_crop(base64.b64decode(bytes(row[0]))) for row in images])
            logits = forward(x)
            e = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs = e / e.sum(axis=1, keepdims=True)
            top = probs.argmax(axis=1)
            return {
                "label": top.astype(np.int64).reshape(-1, 1),
                "score": probs[np.arange(len(top)), top].astype(np.float32).reshape(-1, 1),
            }

        return infer

    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        exit_on_error=True,
    )
    with Triton(config=config) as triton:
        triton.bind(
            model_name="bench",
            infer_func=[make_infer() for _ in range(args.instances)],
            inputs=[Tensor(name="images", dtype=bytes, shape=(1,))],
            outputs=[
                Tensor(name="label", dtype=np.int64, shape=(1,)),
                Tensor(name="score", dtype=np.float32, shape=(1,)),
            ],
            config=ModelConfig(
                max_batch_size=args.max_batch,
                batcher=DynamicBatcher(max_queue_delay_microseconds=args.delay_us),
            ),
            strict=False,
        )
        triton.serve()


if __name__ == "__main__":
    main()
