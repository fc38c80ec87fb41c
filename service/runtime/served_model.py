"""A served model version and the slot that swaps versions between batches.

Loading is off the request path: verify every sha256 (the registry does), build, load weights
strictly, warm up, and check the numeric mode against fp32 on the version's calibration images.
A mode that does not keep top-1 agreement >= ``min_agreement`` falls back to fp32.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from service.runtime.shared_stages import Sharing, shared_stages
from service.settings import NumericMode
from training.backbones import build_with_weights, head_module, stage_runs, structure, trunk
from training.feature_stats import FeatureStats
from training.node_jobs import wait_quiet
from training.openvino_ir import compile_graph, compile_trunk
from training.preprocess import normalize
from training.preprocessing_spec import Preprocessing
from training.stage_digests import prefix_digests, stage_digests
from training.storage.errors import IntegrityError, RefitError
from training.storage.ids import is_id
from training.storage.registry import Manifest, Registry, StageDigest

log = logging.getLogger(__name__)

_JIT_MODES = ("fp32_jit", "bf16_jit")
_BF16_MODES = ("bf16", "bf16_jit")
GRAPH_MODES: tuple[NumericMode, ...] = ("openvino", "int8")
"""Modes that run a graph made at publish time (``training.openvino_ir``)."""

AUTO_TORCH_MODES: tuple[NumericMode, ...] = ("bf16_jit", "fp32_jit")
"""The torch modes ``auto`` weighs against fp32, besides the graphs a version has (the other
torch modes are slower versions of these: eager bf16, channels_last)."""

FallbackKind = Literal["agreement", "speed", "unavailable"]


@dataclass(frozen=True)
class PassedOver:
    """Why ``auto`` did not serve a mode: its kind (a fixed label) and the detail."""

    reason: FallbackKind
    detail: str


# (backbone, crop, mode) -> seconds per forward of a small batch here. Speed depends on the
# architecture, input size and CPU, not on the weights: timed once per replica process, not on
# every hot-load.
_SECONDS: dict[tuple[str, int, str], float] = {}


@dataclass(frozen=True)
class TrunkSplit:
    """A version's eager model as its trunk (every stage but the head) and its head:
    ``head(body(x)) == module(x)``. Versions whose ``key`` is equal compute the same trunk on
    inputs of the same shape (the content of its stages, and the backbone), so one pass of
    either's ``body`` serves both."""

    key: str
    body: nn.Module
    head: nn.Module
    runs: tuple[tuple[str, nn.Module], ...] = ()
    """The trunk stage by stage (empty where the family's trunk is no chain of its stages):
    each stage's prefix key (the backbone and the content of every stage up to it) and its
    runnable piece. Versions whose first k keys are equal compute the same first k stages
    on the same input: one pass of either's pieces serves both."""

    @property
    def root(self) -> str:
        """Versions with the same root share at least their first stage (or, without
        ``runs``, the whole trunk): their merged requests run together."""
        return self.runs[0][0] if self.runs else self.key


@dataclass
class ServedModel:
    """One loaded, verified, warmed-up version."""

    manifest: Manifest
    module: Any
    """The ``nn.Module``, or its frozen TorchScript trace in the ``_jit`` modes."""
    mode: NumericMode
    agreement: float | None = None
    """Top-1 agreement of ``mode`` with fp32 on the calibration images (None: not checked)."""
    fallback: str | None = None
    """Why the configured mode was refused and fp32 serves instead (None: it was not)."""
    fallback_kind: FallbackKind | None = None
    """The reason as a fixed label: the mode disagreed with fp32, was slower, or the version
    has no graph for it."""
    loaded_at: float = field(default_factory=time.time)
    reference: FeatureStats | None = None
    """The version's penultimate-feature statistics (None: it has none, or drift is off)."""
    trunk: nn.Module | None = None
    """The eager fp32 model without its head, for the drift score off the request path
    (shares the weights of ``module`` in the eager modes; a copy of them in the traced and
    graph modes, whose graphs end at the logits)."""
    passed_over: dict[str, PassedOver] = field(default_factory=dict)
    """``auto``: every other mode weighed, and why it does not serve (it disagreed with
    fp32, the version has no graph for it, or it runs slower here than the one chosen)."""
    split: TrunkSplit | None = None
    """Eager fp32: the model as trunk and head, so that versions with the same trunk run it
    once over their merged requests (None: another mode, or no stage digests)."""
    sharing: Sharing | None = None
    """Eager fp32: the stages it holds together with versions loaded before it (None:
    another mode, or no stage digests)."""
    graph_bytes: int = 0
    """The served trace's or graph's copy of the weights, outside the tensors that
    :meth:`tensors` lists (estimated: the weights' bytes in the mode's precision; 0 in the
    eager modes)."""
    graph_key: int | None = None
    """Which trace or graph ``graph_bytes`` is: versions sharing a traced trunk name the
    same one (counted once)."""

    def tensors(self) -> Iterator[torch.Tensor]:
        """The torch tensors this version holds: its eager model's, its drift trunk's."""
        if _eager_module(self.module):
            yield from self.module.parameters()
            yield from self.module.buffers()
        if self.trunk is not None:
            yield from self.trunk.parameters()
            yield from self.trunk.buffers()

    @property
    def name(self) -> str:
        """Model name."""
        return self.manifest.model

    @property
    def version(self) -> str:
        """Version id."""
        return self.manifest.version

    @property
    def preprocessing(self) -> Preprocessing:
        """How request images are resized, cropped and normalised."""
        return self.manifest.preprocessing

    @torch.inference_mode()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 crops ``[N, 3, H, W]`` -> float32 logits ``[N, classes]``."""
        return forward(self.module, normalize(self.preprocessing, images), self.mode)

    @torch.inference_mode()
    def logits_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """Already preprocessed float32 ``[N, 3, H, W]`` -> float32 logits."""
        return forward(self.module, x, self.mode)

    @torch.inference_mode()
    def feature_distances(self, x: torch.Tensor) -> torch.Tensor | None:
        """Preprocessed ``[N, 3, H, W]`` -> each image's distance from the version's
        reference features (None: no drift reference)."""
        if self.trunk is None or self.reference is None:
            return None
        return self.reference.distances(self.trunk(x))

    def top_k(self, images: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        """Top-k labels and probabilities per image (uint8 crops)."""
        return self.rank(self.logits(images), k)

    def rank(self, logits: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        """Top-k labels and probabilities from logits."""
        probs = logits.softmax(dim=1)
        k = min(k, probs.shape[1])
        scores, idx = probs.topk(k, dim=1)
        names = self.manifest.class_names
        return [
            [
                {"label": names[j], "score": round(float(s), 6)}
                for s, j in zip(row_s, row_i, strict=True)
            ]
            for row_s, row_i in zip(scores.tolist(), idx.tolist(), strict=True)
        ]


def forward(module: Any, x: torch.Tensor, mode: NumericMode) -> torch.Tensor:
    """Logits of normalised ``x`` in a numeric mode (the module already prepared for it by
    :func:`prepare`, or a compiled graph in the graph modes)."""
    if mode in GRAPH_MODES:
        logits: torch.Tensor = module(x.contiguous())
        return logits
    if mode != "fp32":
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode in _BF16_MODES else nullcontext()
    with ctx:
        out: torch.Tensor = module(x)
        return out.float()


def prepare(module: nn.Module, mode: NumericMode, example: torch.Tensor) -> Any:
    """``module`` (eval, contiguous) made ready for ``mode``: channels_last for every mode but
    fp32; traced on ``example`` and frozen for the ``_jit`` modes (under autocast for bf16,
    so the trace holds the casts). No graph is read from storage: the trace is built here
    from the verified weights."""
    if mode == "fp32":
        return module
    module = _memory_format(module, torch.channels_last)
    if mode not in _JIT_MODES:
        return module
    x = example.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if mode in _BF16_MODES else nullcontext()
    with torch.inference_mode(), ctx:
        traced = torch.jit.trace(module, x, check_trace=False)
    return torch.jit.freeze(traced.eval())


class ModeBody(nn.Module):
    """A trunk prepared for a numeric mode (a frozen trace) as a module: normalised fp32
    input in, fp32 features out (the mode's memory format and autocast inside)."""

    def __init__(self, runnable: Any, mode: NumericMode) -> None:
        super().__init__()
        self.runnable, self.mode = runnable, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The features of ``x``."""
        return forward(self.runnable, x, self.mode)


class TrunkAndHead(nn.Module):
    """A version served in a traced mode as a trunk traced once per trunk content and mode
    in this process (shared by the versions with that trunk) and its own eager head, run in
    fp32 on the trunk's features."""

    def __init__(self, key: str, body: ModeBody, head: nn.Module) -> None:
        super().__init__()
        self.key, self.body, self.head = key, body, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of ``x``."""
        features = self.body(x)
        with torch.autocast("cpu", enabled=False):
            out: torch.Tensor = self.head(features.float())
            return out


def _prepare(
    module: nn.Module, manifest: Manifest, mode: NumericMode, example: torch.Tensor
) -> Any:
    """:func:`prepare`, with the trunk shared in the traced modes: a version with stage
    digests runs the trunk traced for its content and mode (traced here by the first version
    that needs it) and its own head (a head-only variant costs its head, and versions of one
    trunk run it once per batch)."""
    backbone, key = manifest.backbone, _trunk_key(manifest)
    if mode not in _JIT_MODES or key is None:
        return prepare(module, mode, example)
    runnable = shared_stages().trace(
        key, mode, lambda: prepare(trunk(module, backbone), mode, example)
    )
    return TrunkAndHead(key, ModeBody(runnable, mode), head_module(module, backbone))


def _graph_trunk(
    registry: Registry,
    manifest: Manifest,
    module: nn.Module,
    x: torch.Tensor,
    mode: NumericMode,
    min_agreement: float,
) -> tuple[TrunkAndHead | None, bool]:
    """A graph mode's trunk shared by the versions of one trunk content, with this version's
    head in torch beside it: the graph a resident version cut before its head, else this
    version's own stored graph cut so (where the cut gives the trunk's features); and
    whether it was cut from this version's graph. None: neither (no stage digests, no graph,
    or a head the cut does not isolate: this version serves its own whole graph)."""
    key = _trunk_key(manifest)
    record = manifest.graphs.get(mode)
    if key is None:
        return None, False
    backbone = manifest.backbone
    own = False

    def cut() -> Any:
        nonlocal own
        source = (
            manifest
            if record is not None
            else _graph_ancestor(registry, manifest, mode, min_agreement)
        )
        if source is None:
            return None
        files = source.graphs[mode].files
        xml, weights = (registry.read_file(source, name) for name in files)
        graph = compile_trunk(xml, weights, threads=torch.get_num_threads())
        if graph is None:
            return None
        with torch.inference_mode():
            expected = trunk(module, backbone)(x[:1]).shape
        if forward(graph, x[:1], mode).shape != expected:
            return None
        own = source is manifest
        return graph

    runnable = shared_stages().trace(key, mode, cut)
    if runnable is None:
        return None, False
    return TrunkAndHead(key, ModeBody(runnable, mode), head_module(module, backbone)), own


_ANCESTORS = 4
"""How far up its parents a version without a graph looks for one of its trunk's."""


def _graph_ancestor(
    registry: Registry, manifest: Manifest, mode: NumericMode, min_agreement: float
) -> Manifest | None:
    """The nearest published ancestor (``parent``, then its parent: at most
    :data:`_ANCESTORS`) with the same trunk content and a ``mode`` graph (its graph set's
    included) that its job measured at ``min_agreement`` or more: a head-only variant's graph
    trunk is its parent's. None: none such."""
    key, seen = _trunk_key(manifest), manifest
    for _ in range(_ANCESTORS):
        model, _, version = (seen.parent or "").partition("@")
        if not (is_id(model) and is_id(version)):
            return None
        try:
            seen, _ = registry.read_manifest(model, version)
        except RefitError:  # an ancestor deleted or damaged: no graph from it
            return None
        if _trunk_key(seen) != key:  # stages recorded, the same trunk: or no further
            return None
        if mode not in seen.graphs:
            seen = registry.with_graph_set(seen)
        if mode in seen.graphs:
            return seen if seen.graphs[mode].calibration_agreement >= min_agreement else None
    return None


def _trunk_key(manifest: Manifest) -> str | None:
    """The content of a version's trunk (its backbone and every stage but the head; None:
    no stage digests): versions with the same key compute the same trunk features."""
    if len(manifest.stages) < 2:
        return None
    return f"{manifest.backbone}/{prefix_digests(manifest.stages)[-2]}"


def _graph_mode(
    registry: Registry,
    manifest: Manifest,
    module: nn.Module,
    x: torch.Tensor,
    mode: NumericMode,
    min_agreement: float,
    check_speed: bool,
) -> tuple[Any, float | None, str | None, FallbackKind | None]:
    """The version's stored graph for ``mode``, compiled here, or why fp32 serves instead:
    ``(graph, agreement, fallback, kind)``. The gate is the agreement the training job
    measured on all its calibration crops (>= 200 where the data has them; recorded in the
    manifest that the alias' hash vouches for). Here the graph runs the version's stored
    calibration sample, and may differ from fp32 on at most one image more than the job
    measured (another CPU's kernels round differently; a bigger gap means a wrong graph).

    Versions of one trunk content share its graph (:func:`_graph_trunk`): cut from the
    first one's graph before its head, each version's head in torch beside it. A version
    that takes another's trunk graph (it may have no graph of its own: a head-only variant
    needs none) is gated on the agreement measured here, on its calibration sample."""
    record = manifest.graphs.get(mode)
    if record is not None and record.calibration_agreement < min_agreement:
        return (
            None,
            record.calibration_agreement,
            f"top-1 agreement with fp32 {record.calibration_agreement:.3f} < {min_agreement} "
            f"on {record.images} calibration images",
            "agreement",
        )
    reference = forward(module, x, "fp32").argmax(dim=1)
    graph: Any
    graph, own = _graph_trunk(registry, manifest, module, x, mode, min_agreement)
    if graph is not None and not own:
        here = float((forward(graph, x, mode).argmax(dim=1) == reference).float().mean())
        if here >= min_agreement:
            return graph, here, *_speed(manifest, module, graph, x, mode, check_speed)
        graph = None  # its own graph, where it has one
        if record is None:
            return (
                None,
                here,
                f"with its trunk's {mode} graph (another version's) top-1 agreement with fp32 "
                f"{here:.3f} < {min_agreement} on its {len(x)} calibration images",
                "agreement",
            )
    if record is None:
        return None, None, f"version {manifest.version} has no {mode} graph", "unavailable"
    if graph is None:
        xml, weights = (registry.read_file(manifest, name) for name in record.files)
        graph = compile_graph(xml, weights, threads=torch.get_num_threads())
    here = float((forward(graph, x, mode).argmax(dim=1) == reference).float().mean())
    if here < record.calibration_agreement - 1.0 / len(x) - 1e-9:
        return (
            None,
            here,
            f"{mode} graph agrees with fp32 on {here:.3f} of the stored sample here, "
            f"the job measured {record.calibration_agreement:.3f}",
            "agreement",
        )
    speed = _speed(manifest, module, graph, x, mode, check_speed)
    return graph, record.calibration_agreement, *speed


def _speed(
    manifest: Manifest,
    module: nn.Module,
    graph: Any,
    x: torch.Tensor,
    mode: NumericMode,
    check_speed: bool,
) -> tuple[str | None, FallbackKind | None]:
    fallback = speed_verdict(manifest.backbone, module, graph, x[:8], mode) if check_speed else None
    return fallback, "speed" if fallback else None


def _seconds_per_forward(module: Any, x: torch.Tensor, mode: NumericMode) -> float:
    forward(module, x, mode)  # first call: allocations, oneDNN primitive caches
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        forward(module, x, mode)
        best = min(best, time.perf_counter() - start)
    return best


def _timed(backbone: str, runnable: Any, x: torch.Tensor, mode: NumericMode) -> float:
    """Seconds per forward of ``x`` in ``mode`` here (timed once per architecture, input
    size and mode in this process)."""
    key = (backbone, int(x.shape[-1]), mode)
    if key not in _SECONDS:
        _SECONDS[key] = _seconds_per_forward(runnable, x, mode)
    return _SECONDS[key]


def _slower(mode: str, mode_s: float, than: str, than_s: float, n: int) -> str:
    return (
        f"{mode} is slower than {than} on this CPU ({mode_s * 1e3:.0f} ms vs "
        f"{than_s * 1e3:.0f} ms for {n} images)"
    )


def speed_verdict(
    backbone: str, module: nn.Module, candidate: Any, x: torch.Tensor, mode: NumericMode
) -> str | None:
    """None if ``candidate`` (``module`` prepared for ``mode``) runs ``x`` faster than fp32
    here, else why not. bf16 is emulated, and slower than fp32, on CPUs without
    AVX512-BF16/AMX: such a mode must not be served."""
    if (backbone, int(x.shape[-1]), "fp32") not in _SECONDS:
        # a contiguous copy: the non-jit modes turned ``module`` itself channels_last
        reference = _memory_format(copy.deepcopy(module), torch.contiguous_format)
        _timed(backbone, reference, x, "fp32")
        del reference
    fp32_s = _timed(backbone, module, x, "fp32")
    mode_s = _timed(backbone, candidate, x, mode)
    return None if mode_s < fp32_s else _slower(mode, mode_s, "fp32", fp32_s, len(x))


QUIET_WAIT_S = 120.0
"""How long each step of auto's choice (a mode's trace or compile, its timing) waits while a
job on this node is on its critical path (``training.node_jobs``): the choice runs in the
background, after the version went live in fp32."""


def _auto_mode(
    registry: Registry, manifest: Manifest, module: nn.Module, x: torch.Tensor, min_agreement: float
) -> tuple[Any, NumericMode, float, dict[str, PassedOver]]:
    """``auto``: the fastest mode here, among fp32, :data:`AUTO_TORCH_MODES` and the graphs
    the version has, that keeps top-1 agreement >= ``min_agreement`` with fp32 on its
    calibration images: ``(runnable, mode, agreement, passed_over)``. The first load of an
    architecture in this process times every mode; later loads prepare the modes fastest
    first and stop at the first that agrees. ``module`` stays the contiguous fp32 model."""
    backbone, sample = manifest.backbone, x[:8]
    reference = forward(module, x, "fp32").argmax(dim=1)
    passed_over: dict[str, PassedOver] = {}
    prepared: dict[str, tuple[Any, float]] = {}

    def ready(mode: NumericMode) -> tuple[Any, float] | None:
        """The mode's runnable and agreement, or None (why: in ``passed_over``)."""
        if mode in prepared:
            return prepared[mode]
        wait_quiet(QUIET_WAIT_S)  # a trace or a compile: seconds a job going live needs more
        if mode in GRAPH_MODES:
            graph, agreement, why, kind = _graph_mode(
                registry, manifest, module, x, mode, min_agreement, check_speed=False
            )
            if why is not None or graph is None or agreement is None:
                passed_over[mode] = PassedOver(kind or "unavailable", why or f"no {mode} graph")
                return None
            prepared[mode] = (graph, agreement)
            return prepared[mode]
        runnable = _prepare(module, manifest, mode, sample)
        _memory_format(module, torch.contiguous_format)  # prepare turned it channels_last
        agreement = float((forward(runnable, x, mode).argmax(dim=1) == reference).float().mean())
        if agreement < min_agreement:
            why = f"top-1 agreement with fp32 {agreement:.3f} < {min_agreement}"
            passed_over[mode] = PassedOver("agreement", why)
            return None
        prepared[mode] = (runnable, agreement)
        return prepared[mode]

    fp32_s = _timed(backbone, module, sample, "fp32")
    candidates: list[NumericMode] = [*AUTO_TORCH_MODES]
    for mode in GRAPH_MODES:
        if mode in manifest.graphs or _graph_trunk_available(
            registry, manifest, mode, min_agreement
        ):
            candidates.insert(0, mode)
        else:
            why = f"version {manifest.version} has no {mode} graph"
            passed_over[mode] = PassedOver("unavailable", why)
    seconds: dict[NumericMode, float] = {}
    for mode in candidates:  # timed once per architecture here; a refused mode is not timed
        key = (backbone, int(sample.shape[-1]), mode)
        got = None if key in _SECONDS else ready(mode)
        if key in _SECONDS or got is not None:
            if key not in _SECONDS:
                wait_quiet(QUIET_WAIT_S)  # a timing beside a job would be wrong
            seconds[mode] = _timed(backbone, got[0] if got else None, sample, mode)
    chosen: tuple[Any, NumericMode, float] = (module, "fp32", 1.0)
    for mode in sorted(seconds, key=seconds.__getitem__):
        if seconds[mode] >= fp32_s:
            break
        got = ready(mode)
        if got is not None:
            chosen = (got[0], mode, got[1])
            break
    chosen_s = seconds.get(chosen[1], fp32_s)
    for mode, mode_s in [*seconds.items(), ("fp32", fp32_s)]:
        if mode != chosen[1] and mode not in passed_over:
            why = _slower(mode, mode_s, chosen[1], chosen_s, len(sample))
            passed_over[mode] = PassedOver("speed", why)
    return chosen[0], chosen[1], chosen[2], dict(sorted(passed_over.items()))


def _graph_trunk_available(
    registry: Registry, manifest: Manifest, mode: NumericMode, min_agreement: float
) -> bool:
    """Whether a version without a ``mode`` graph of its own can run one of its trunk's: a
    resident version holds one, or an ancestor of the same trunk has one."""
    key = _trunk_key(manifest)
    if key is None:
        return False
    if shared_stages().trace(key, mode) is not None:
        return True
    return _graph_ancestor(registry, manifest, mode, min_agreement) is not None


def _memory_format(module: nn.Module, fmt: torch.memory_format) -> nn.Module:
    out: nn.Module = module.to(memory_format=fmt)  # type: ignore[call-overload]  # stubs lack it
    return out


@functools.lru_cache(maxsize=64)
def _reference_state(backbone: str, num_classes: int) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shape and dtype of every tensor of the architecture, built once per architecture (on
    the meta device where the builder allows it: tens of milliseconds each time)."""
    state = structure(backbone, num_classes=num_classes).state_dict()
    return {k: (tuple(v.shape), v.dtype) for k, v in state.items()}


def architecture_problems(
    backbone: str, num_classes: int, state: dict[str, torch.Tensor]
) -> list[str]:
    """What keeps ``state`` from being exactly the weights of ``backbone`` with a
    ``num_classes`` head: missing or unexpected tensors, the first wrong shape or dtype.
    Empty when it loads. ValueError when the architecture cannot be built."""
    try:
        expected = _reference_state(backbone, num_classes)
    except Exception as exc:  # an unknown backbone, or too few classes
        raise ValueError(f"cannot build {backbone}: {exc}") from None
    problems = []
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        problems.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} unexpected tensors (e.g. {extra[0]})")
    for key in sorted(set(expected) & set(state)):
        (shape, dtype), got = expected[key], state[key]
        if tuple(got.shape) != shape or got.dtype != dtype:
            problems.append(f"{key} is {got.dtype} {list(got.shape)}, needs {dtype} {list(shape)}")
            break
    return problems


def check_loadable(manifest: Manifest, state: dict[str, torch.Tensor]) -> None:
    """IntegrityError naming what is wrong unless ``state`` is exactly the weights of the
    manifest's backbone and head: the same key set, shapes and dtypes. Hashes alone do not
    say so (a version can hash correctly and still not load)."""
    what = f"{manifest.model}@{manifest.version}"
    try:
        problems = architecture_problems(manifest.backbone, manifest.num_classes, state)
    except ValueError as exc:
        raise IntegrityError(f"{what}: {exc}", field="version") from None
    if problems:
        raise IntegrityError(
            f"{what} does not load into {manifest.backbone} "
            f"with {manifest.num_classes} classes: {'; '.join(problems)}",
            field="version",
        )


def _stage_digests(manifest: Manifest, state: dict[str, torch.Tensor]) -> list[StageDigest]:
    """The digests of a version that has none recorded (empty when its tensors do not fit
    the backbone's stages: such a version shares nothing)."""
    try:
        return stage_digests(state, manifest.backbone, manifest.num_classes)
    except ValueError as exc:
        log.warning("%s@%s: no stage digests: %s", manifest.model, manifest.version, exc)
        return []


def load_served_model(
    registry: Registry,
    name: str,
    ref: str,
    *,
    expect_sha256: str | None = None,
    mode: NumericMode = "fp32",
    min_agreement: float = 0.99,
    check_speed: bool = True,
    drift: bool = False,
) -> ServedModel:
    """Load, verify, warm up and mode-check one version: ``ref`` is a version id whose
    manifest must hash to ``expect_sha256`` (the alias' record) when that is given, else a
    version id or alias name. ``auto``: the fastest mode here that keeps the agreement
    (:func:`_auto_mode`; ``passed_over`` says why each other mode does not serve). A mode
    other than fp32 is served only if it keeps top-1
    agreement >= ``min_agreement`` with fp32 on the version's calibration images and
    (``check_speed``) runs faster than fp32 here; otherwise fp32 serves, and ``fallback``
    says why. ``drift``: keep the version's feature statistics and an eager trunk for the
    drift score (a damaged statistics file only turns drift off for the version)."""
    if expect_sha256 is None:
        ref, expect_sha256 = registry.resolve(name, ref)
    manifest, _ = registry.read_manifest(name, ref, expect_sha256=expect_sha256)
    held = None
    if mode == "fp32" and manifest.stages:
        # stages a resident version holds with the same content: not read (adopted below;
        # only eager fp32 shares, and it never changes a tensor in place)
        held = shared_stages().held(manifest.backbone, manifest.num_classes, manifest.stages)
    state = registry.read_weights(manifest, held=held)
    check_loadable(manifest, state)
    if not manifest.stages:  # published before stage digests were recorded
        manifest = manifest.model_copy(update={"stages": _stage_digests(manifest, state)})
    if (mode in GRAPH_MODES and mode not in manifest.graphs) or (
        mode == "auto" and not manifest.graphs
    ):
        manifest = registry.with_graph_set(manifest)  # graphs made after it was published
    module = build_with_weights(manifest.backbone, state, num_classes=manifest.num_classes)
    module.eval()
    calibration = registry.load_calibration(manifest)
    if calibration is None:
        size = manifest.preprocessing.crop_size
        calibration = torch.randint(0, 256, (8, 3, size, size), dtype=torch.uint8)
    x = normalize(manifest.preprocessing, calibration)
    agreement, fallback, served = None, None, module
    kind: FallbackKind | None = None
    passed_over: dict[str, PassedOver] = {}
    with torch.inference_mode():
        if mode == "auto":
            served, mode, agreement, passed_over = _auto_mode(
                registry, manifest, module, x, min_agreement
            )
        elif mode in GRAPH_MODES:
            served, agreement, fallback, kind = _graph_mode(
                registry, manifest, module, x, mode, min_agreement, check_speed
            )
            if fallback is not None:
                served, mode = module, "fp32"
        elif mode != "fp32":
            reference = forward(module, x, "fp32").argmax(dim=1)
            served = _prepare(module, manifest, mode, x[:8])
            candidate = forward(served, x, mode).argmax(dim=1)
            agreement = float((candidate == reference).float().mean())
            if agreement < min_agreement:
                fallback = f"top-1 agreement with fp32 {agreement:.3f} < {min_agreement}"
                kind = "agreement"
            elif check_speed:
                fallback = speed_verdict(manifest.backbone, module, served, x[:8], mode)
                kind = "speed" if fallback else None
            if fallback is not None:
                served, mode = _memory_format(module, torch.contiguous_format), "fp32"
        # warm-up in the final mode, and a sanity check: a version that yields NaN or inf
        # never goes live (the old one keeps serving)
        sharing, split = None, None
        if mode == "fp32" and _eager_module(served) and manifest.stages:
            sharing, split = _share_checked(served, manifest, x[:4])
        elif not torch.isfinite(forward(served, x[:4], mode)).all():
            raise IntegrityError(f"{name} {manifest.version} produces non-finite logits")
        if isinstance(served, TrunkAndHead):
            split = TrunkSplit(served.key, served.body, served.head)
    # what holds weights outside the torch tensors listed: a trace or graph (one per trunk
    # content and mode for versions that share a traced trunk)
    graph_key = None
    if isinstance(served, TrunkAndHead):
        graph_key = id(served.body.runnable)
    elif not _eager_module(served):
        graph_key = id(served)
    stats = _drift_reference(registry, manifest) if drift else None
    drift_trunk = trunk(module, manifest.backbone) if stats is not None else None
    if stats is not None and served is not module and manifest.stages:
        # the drift score's eager trunk beside a trace or graph: the fp32 stages resident
        # versions hold with the same content, held once (this model is not changed after)
        shared = shared_stages()
        module = _memory_format(module, torch.contiguous_format)
        shared.adopt(module, manifest.backbone, manifest.num_classes, manifest.stages)
        drift_trunk = trunk(module, manifest.backbone)
        # what stays alive is the trunk: it offers the stages before the head
        shared.offer(drift_trunk, manifest.backbone, manifest.stages[:-1])
    return ServedModel(
        manifest=manifest,
        module=served,
        mode=mode,
        agreement=agreement,
        fallback=fallback,
        fallback_kind=kind,
        reference=stats,
        trunk=drift_trunk,
        passed_over=passed_over,
        split=split,
        sharing=sharing,
        graph_bytes=_graph_bytes(manifest, mode) if graph_key is not None else 0,
        graph_key=graph_key,
    )


def _eager_module(module: Any) -> bool:
    """Whether ``module`` holds its weights as torch tensors one can list (not a trace, not
    a compiled graph)."""
    return isinstance(module, nn.Module) and not isinstance(module, torch.jit.ScriptModule)


_GRAPH_WEIGHT_SHARE = {"int8": 0.25, "bf16_jit": 0.5}
"""A trace's or graph's copy of the weights against their stored (fp32) bytes: INT8 keeps a
byte per weight, the bf16 trace two; the other modes keep them in fp32."""


def _graph_bytes(manifest: Manifest, mode: NumericMode) -> int:
    """An estimate of the memory a version's trace or graph holds: its weights' stored bytes,
    in the mode's precision."""
    shapes = _reference_state(manifest.backbone, manifest.num_classes)
    stored = sum(math.prod(shape) * dtype.itemsize for shape, dtype in shapes.values())
    return int(stored * _GRAPH_WEIGHT_SHARE.get(mode, 1.0))


def _share_checked(
    module: nn.Module, manifest: Manifest, x: torch.Tensor
) -> tuple[Sharing, TrunkSplit | None]:
    """An eager fp32 version's stages shared with resident versions of the same content,
    then checked: a version whose whole trunk is resident checks its head on features that
    trunk computed before (its trunk was checked with the version that brought it: a head-only
    variant goes live in milliseconds); any other runs ``x`` through. Only a version that
    passed offers its stages to the next."""
    shared = shared_stages()
    backbone, stages = manifest.backbone, manifest.stages
    sharing = shared.adopt(module, backbone, manifest.num_classes, stages)
    split = _split(module, manifest)
    trunk_out: tuple[str, torch.Tensor] | None = None
    if split is None:
        finite = bool(torch.isfinite(forward(module, x, "fp32")).all())
    else:
        resident = len(sharing.stages) == len(stages) - 1
        features = shared.features(split.key) if resident else None
        if features is None:
            features = split.body(x)
        trunk_out = (split.key, features)
        finite = bool(torch.isfinite(features).all() and torch.isfinite(split.head(features)).all())
    if not finite:
        raise IntegrityError(
            f"{manifest.model} {manifest.version} produces non-finite logits", field="model"
        )
    shared.offer(module, backbone, stages, trunk_out)
    return sharing, split


def _split(module: Any, manifest: Manifest) -> TrunkSplit | None:
    """The trunk and head of an eager fp32 version with stage digests (its trunk's key: the
    backbone and the prefix digest of every stage but the head), and its stages' pieces."""
    if not isinstance(module, nn.Module) or len(manifest.stages) < 2:
        return None
    backbone = manifest.backbone
    keys = [f"{backbone}/{p}" for p in prefix_digests(manifest.stages)][:-1]
    pieces = stage_runs(module, backbone)
    runs = tuple(zip(keys, pieces, strict=True)) if pieces and len(pieces) == len(keys) else ()
    return TrunkSplit(keys[-1], trunk(module, backbone), head_module(module, backbone), runs)


def _drift_reference(registry: Registry, manifest: Manifest) -> FeatureStats | None:
    record = manifest.drift
    if record is None:
        return None
    try:
        return FeatureStats.from_bytes(registry.read_file(manifest, record.file), record)
    except RefitError as exc:  # the weights verified: serve them, without a drift score
        log.warning("%s %s: no drift score: %s", manifest.model, manifest.version, exc)
        return None
