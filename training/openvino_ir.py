"""OpenVINO graphs of a version: the only module that touches ``openvino`` and ``nncf``.

Converting a model to OpenVINO IR takes seconds and quantizing it far longer, too long for a
hot-load (<= 2 s), so both happen at publish time, in the training job: the verified module
is converted to IR (fp32, dynamic batch) and quantized to INT8 by NNCF's post-training
quantization on the version's calibration crops. Both graphs are stored as files of the
version, listed with their sha256 in the manifest, with their top-1 agreement with fp32 on the
calibration crops and on held-out crops. A replica compiles only IR that it read through the
registry (verified like the weights). An IR is XML and raw tensor bytes, never a pickle.

OpenVINO aborts ("double free or corruption") in a process with jemalloc or TBB's malloc
preloaded, as ``refit up`` runs its processes: the export runs in a child process with the
system allocator (:class:`ExportChild`), and replicas serving these modes are started
without the preload (``service.allocator``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from training.node_jobs import yielding

IrMode = Literal["openvino", "int8"]
IR_MODES: tuple[IrMode, ...] = ("openvino", "int8")


def ir_files(mode: IrMode) -> tuple[str, str]:
    """The version's file names of ``mode``'s graph: its XML and its weights."""
    return f"{mode}.xml", f"{mode}.bin"


@dataclass(frozen=True)
class ExportedGraph:
    """One graph made at publish time, with how closely it follows fp32."""

    mode: IrMode
    xml: bytes
    weights: bytes
    calibration_agreement: float
    """Top-1 agreement with fp32 on the calibration crops (those INT8 was calibrated on)."""
    held_out_agreement: float | None
    """Top-1 agreement with fp32 on validation crops not used for calibration (None: none)."""
    images: int
    """Calibration crops used."""
    unquantized: tuple[str, ...] = ()
    """INT8: the convolutions and matrix products left in floating point (the classifier
    head always; more where accuracy control restored them to keep the agreement)."""

    def measured(self) -> dict[str, Any]:
        """How closely the graph follows fp32: the fields of a manifest's graph record."""
        return {
            "calibration_agreement": self.calibration_agreement,
            "held_out_agreement": self.held_out_agreement,
            "images": self.images,
            "unquantized": list(self.unquantized),
        }


@lru_cache(maxsize=1)
def _core() -> Any:
    import openvino as ov

    return ov.Core()


def available() -> bool:
    """Whether the OpenVINO runtime imports here."""
    try:
        _core()
    except Exception:
        return False
    return True


def _convert(module: nn.Module, example: torch.Tensor) -> Any:
    import openvino as ov

    size = tuple(example.shape[1:])
    with torch.no_grad():
        return ov.convert_model(module.eval(), example_input=example, input=[(-1, *size)])


def _classifier_layer(graph: Any) -> list[str]:
    """The last MatMul of the graph: the classifier head that turns features into logits."""
    matmuls = [op for op in graph.get_ordered_ops() if op.get_type_name() == "MatMul"]
    return [matmuls[-1].get_friendly_name()] if matmuls else []


def _quantize(graph: Any, calibration: torch.Tensor) -> Any:
    import nncf

    items = [calibration[i : i + 1].numpy() for i in range(calibration.shape[0])]
    # The head stays in fp32 (the usual recipe: it is tiny, and rounding logits is what
    # flips top-1 answers); every convolution of the trunk runs in int8.
    return nncf.quantize(
        graph,
        nncf.Dataset(items),
        subset_size=len(items),
        ignored_scope=nncf.IgnoredScope(names=_classifier_layer(graph), validate=False),
    )


def _quantize_to_agreement(
    graph: Any,
    calibration: torch.Tensor,
    reference: torch.Tensor,
    min_agreement: float,
    max_restored: int,
) -> Any:
    """INT8 that keeps ``min_agreement`` top-1 agreement with fp32 (``reference``, its
    answers) on the calibration crops: NNCF's accuracy control quantizes, ranks the
    quantized layers by the agreement each costs, and returns them to floating point one by
    one until the agreement holds, at most ``max_restored`` of them."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    items = [(calibration[i : i + 1].numpy(), int(reference[i])) for i in range(len(reference))]

    def agreement(compiled: Any, data: Any) -> tuple[float, list[float]]:
        agrees = [float(int(np.argmax(compiled(x)[0])) == label) for x, label in data]
        return float(np.mean(agrees)), agrees

    def crop(item: tuple[np.ndarray, int]) -> np.ndarray:
        return item[0]

    return nncf.quantize_with_accuracy_control(
        graph,
        nncf.Dataset(items, crop),
        nncf.Dataset(items, crop),
        agreement,
        max_drop=max(0.0, 1.0 - min_agreement),
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(items),
        ignored_scope=nncf.IgnoredScope(names=_classifier_layer(graph), validate=False),
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            max_num_iterations=max(1, max_restored)
        ),
    )


def _quantized_weights(op: Any) -> bool:
    """Whether a layer's weights come through quantization: a FakeQuantize, or the int8
    constant NNCF folds one into, among the few nodes above its weights input (its
    activations' quantizer may sit above a MaxPool or a Reshape, so those are not looked
    at)."""
    frontier, looked = [op.input_value(1).get_node()], 0
    while frontier and looked < 8:
        node = frontier.pop()
        looked += 1
        kind = node.get_type_name()
        if kind == "FakeQuantize" or (
            kind == "Constant"
            and node.get_output_element_type(0).get_type_name() in {"i8", "u8", "i4", "u4"}
        ):
            return True
        frontier += [node.input_value(i).get_node() for i in range(node.get_input_size())]
    return False


def _layers(graph: Any) -> list[Any]:
    """The convolutions and matrix products of a graph (what INT8 quantizes)."""
    kinds = {"Convolution", "GroupConvolution", "MatMul"}
    return [op for op in graph.get_ordered_ops() if op.get_type_name() in kinds]


def unquantized_layers(graph: Any) -> list[str]:
    """The convolutions and matrix products of a graph that run in floating point."""
    return [op.get_friendly_name() for op in _layers(graph) if not _quantized_weights(op)]


def _serialize(graph: Any) -> tuple[bytes, bytes]:
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.xml"
        ov.save_model(graph, str(path), compress_to_fp16=False)
        return path.read_bytes(), path.with_suffix(".bin").read_bytes()


def _top1(run: Any, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    return torch.cat([run(x[i : i + batch]).argmax(1) for i in range(0, x.shape[0], batch)])


def export_graphs(
    module: nn.Module,
    calibration: torch.Tensor,
    held_out: torch.Tensor | None,
    modes: tuple[IrMode, ...] = IR_MODES,
    min_agreement: float | None = None,
) -> list[ExportedGraph]:
    """``module``'s OpenVINO graphs for ``modes``, each with its agreement with fp32.
    ``calibration`` and ``held_out``: normalised float32 crops ``[N, 3, H, W]``. INT8 that
    misses ``min_agreement`` on the calibration crops is made again with accuracy control
    (:func:`_quantize_to_agreement`); the held-out crops measure what it reached."""
    module = module.eval()
    with torch.inference_mode():
        ref_cal = _top1(module, calibration)
        ref_held = None if held_out is None or not len(held_out) else _top1(module, held_out)
    fp32 = _convert(module, calibration[:1])
    out = []
    for mode in modes:
        graph = fp32 if mode == "openvino" else _quantize(fp32, calibration)
        xml, weights = _serialize(graph)
        run = compile_graph(xml, weights, threads=0)
        cal = float((_top1(run, calibration) == ref_cal).float().mean())
        if mode == "int8" and min_agreement is not None and cal < min_agreement:
            # at most half the quantized layers back in floating point: past that an INT8
            # graph is not worth its mode; one that still misses keeps the plain graph (the
            # replicas' gate refuses it, and says why)
            quantized = len(_layers(graph)) - len(unquantized_layers(graph))
            tried = _quantize_to_agreement(
                fp32, calibration, ref_cal, min_agreement, quantized // 2
            )
            t_xml, t_weights = _serialize(tried)
            t_run = compile_graph(t_xml, t_weights, threads=0)
            t_cal = float((_top1(t_run, calibration) == ref_cal).float().mean())
            if t_cal >= min_agreement:
                graph, xml, weights, run, cal = tried, t_xml, t_weights, t_run, t_cal
        held = (
            None
            if ref_held is None or held_out is None
            else float((_top1(run, held_out) == ref_held).float().mean())
        )
        unquantized = tuple(unquantized_layers(graph)) if mode == "int8" else ()
        out.append(
            ExportedGraph(mode, xml, weights, cal, held, int(calibration.shape[0]), unquantized)
        )
    return out


class CompiledGraph:
    """A compiled OpenVINO graph called like a module: normalised float32 ``[N, 3, H, W]``
    in, float32 logits out."""

    def __init__(self, compiled: Any) -> None:
        self._compiled = compiled
        self._lock = threading.Lock()  # one infer request: calls take turns
        self._request = compiled.create_infer_request()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = np.ascontiguousarray(x.detach().float().numpy())
        with self._lock:
            result = self._request.infer({0: batch})
            logits = np.array(result[self._compiled.output(0)], dtype=np.float32, copy=True)
        return torch.from_numpy(logits)


class ExportChild:
    """The child process that makes a version's graphs, started ahead: it imports torch,
    OpenVINO and NNCF (seconds) while the job trains, then waits for the one export it is
    handed (:meth:`export`). Closing it unused ends it."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        # the child imports this package from where this process found it (a Ray worker's
        # working directory need not be the checkout)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "training.openvino_ir"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def export(
        self,
        state: dict[str, torch.Tensor],
        *,
        backbone: str,
        num_classes: int,
        calibration: torch.Tensor,
        held_out: torch.Tensor | None,
        modes: tuple[IrMode, ...] = IR_MODES,
        min_agreement: float | None = None,
        timeout_s: float = 1800.0,
    ) -> list[ExportedGraph]:
        """:func:`export_graphs` of the ``backbone`` with ``state``, in the child with the
        system allocator. Tensors go through safetensors files, results come back as IR files
        and JSON: nothing is pickled either way."""
        from safetensors.torch import save_file

        with tempfile.TemporaryDirectory(prefix="refit-export-") as tmp:
            work = Path(tmp)
            save_file(
                {k: v.contiguous() for k, v in state.items()}, str(work / "state.safetensors")
            )
            crops = {"calibration": calibration.contiguous()}
            if held_out is not None and len(held_out):
                crops["held_out"] = held_out.contiguous()
            save_file(crops, str(work / "crops.safetensors"))
            job = {
                "backbone": backbone,
                "num_classes": num_classes,
                "modes": list(modes),
                "min_agreement": min_agreement,
            }
            (work / "job.json").write_text(json.dumps(job))
            try:
                with yielding(self._proc):  # stopped while another job is critical
                    out, err = self._proc.communicate(f"{work}\n", timeout=timeout_s)
            finally:
                self.close()
            if self._proc.returncode != 0:
                tail = (err or out).strip().splitlines()[-3:]
                raise RuntimeError(
                    f"OpenVINO export failed ({self._proc.returncode}): {' | '.join(tail)}"
                )
            records = json.loads((work / "graphs.json").read_text())
            return [
                ExportedGraph(
                    mode=r["mode"],
                    xml=(work / f"{r['mode']}.xml").read_bytes(),
                    weights=(work / f"{r['mode']}.bin").read_bytes(),
                    calibration_agreement=r["calibration_agreement"],
                    held_out_agreement=r["held_out_agreement"],
                    images=r["images"],
                    unquantized=tuple(r["unquantized"]),
                )
                for r in records
            ]

    def close(self) -> None:
        """End the child (at once when it still waits for its export)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        for stream in (self._proc.stdin, self._proc.stdout, self._proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> ExportChild:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _export_main() -> None:
    """The child of :class:`ExportChild`: import, read the work directory's path from stdin
    (none: nothing to do), export, write the results there."""
    import nncf  # noqa: F401  # imported before the job comes: the point of starting early
    from safetensors.torch import load_file

    from training.backbones import build_backbone

    line = sys.stdin.readline().strip()
    if not line:
        return
    work = Path(line)
    job = json.loads((work / "job.json").read_text())
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    module = build_backbone(job["backbone"], num_classes=job["num_classes"])
    module.load_state_dict(load_file(str(work / "state.safetensors")), strict=True)
    crops = load_file(str(work / "crops.safetensors"))
    graphs = export_graphs(
        module,
        crops["calibration"],
        crops.get("held_out"),
        tuple(job["modes"]),
        job["min_agreement"],
    )
    for g in graphs:
        (work / f"{g.mode}.xml").write_bytes(g.xml)
        (work / f"{g.mode}.bin").write_bytes(g.weights)
    records = [{"mode": g.mode, **g.measured()} for g in graphs]
    (work / "graphs.json").write_text(json.dumps(records))


def _read(xml: bytes, weights: bytes) -> Any:
    import openvino as ov

    return _core().read_model(
        model=xml.decode(), weights=ov.Tensor(np.frombuffer(weights, np.uint8))
    )


def _compile(graph: Any, threads: int) -> CompiledGraph:
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = threads
    return CompiledGraph(_core().compile_model(graph, "CPU", config))


def compile_graph(xml: bytes, weights: bytes, *, threads: int) -> CompiledGraph:
    """Compile a stored IR for this CPU: ``threads`` inference threads (0: OpenVINO's
    choice), latency-oriented, and fp32 precision wherever a layer is not quantized (on CPUs
    with bf16 OpenVINO would otherwise run fp32 graphs in bf16, which the agreement of the
    ``openvino`` mode was not measured with)."""
    return _compile(_read(xml, weights), threads)


def compile_trunk(xml: bytes, weights: bytes, *, threads: int) -> CompiledGraph | None:
    """A stored IR cut before its classifier head, compiled as :func:`compile_graph`: the
    graph up to the activation input of its last MatMul (what the head's linear layer
    takes; INT8 leaves that layer in fp32, so the cut loses nothing quantized). None for a
    graph without one. The caller checks that the cut is the trunk (a head of several layers
    ends in a MatMul whose input is not the trunk's output)."""
    import openvino as ov

    graph = _read(xml, weights)
    matmuls = [op for op in graph.get_ordered_ops() if op.get_type_name() == "MatMul"]
    if not matmuls:
        return None
    features = matmuls[-1].input_value(0)
    return _compile(ov.Model([features], graph.get_parameters(), "trunk"), threads)


EXPORT_NICENESS = 10
"""The export child runs below the serving replicas and the jobs in CPU priority: a version's
graphs come after it is live (a conversion and an INT8 calibration: seconds of every core),
and must not slow the answers nor the next retrain (measured on 2 cores: a head-only retrain
beside the previous version's export took 6.6 s instead of 3.6 s)."""


if __name__ == "__main__":
    import logging

    os.nice(EXPORT_NICENESS)
    logging.getLogger("nncf").setLevel(logging.WARNING)
    _export_main()
