"""Hot-loading, in one place: the slot a model serves from, the follower that keeps it on
the alias' version, and the swap between batches.

A follower reads the alias record (version *and* the manifest's sha256), loads that exact
version off the request path (:func:`~service.runtime.served_model.load_served_model`:
every hash verified, warmed up, numeric mode checked), and swaps it into the slot. A batch
takes the slot's reference once and finishes on it, so no batch mixes versions and the old
model is freed after its last batch. A failed load keeps the old model and is counted.

It learns of a change by polling the alias every ``poll_interval_s`` and by :meth:`refresh`,
which the serving edge calls when a registry notice arrives.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import threading

from service.request_errors import NoVersionError
from service.runtime.served_model import (
    GRAPH_MODES,
    QUIET_WAIT_S,
    ServedModel,
    load_served_model,
)
from service.settings import NumericMode
from training.node_jobs import wait_quiet
from training.storage.errors import NotFoundError
from training.storage.registry import AliasRecord, Registry

log = logging.getLogger("refit.hotload")


def trim_heap() -> None:
    """Hand freed model memory back to the OS: glibc keeps it in its heap otherwise, and RSS
    grows with every hot-load (a no-op under jemalloc or musl)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ModelSlot:
    """The current version of one model. A batch takes the reference once (``current``) and
    finishes on it; ``swap`` replaces it atomically, so no batch ever mixes versions and the
    old model is freed once its last batch returns."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._model: ServedModel | None = None
        self.swaps = 0

    @property
    def current(self) -> ServedModel | None:
        """The model to run the next batch on."""
        return self._model

    def swap(self, new: ServedModel) -> ServedModel | None:
        """Install a loaded model; returns the one it replaced."""
        with self._lock:
            old, self._model = self._model, new
            self.swaps += 1
            return old

    def clear(self) -> ServedModel | None:
        """Hold no model (it is parked to free memory); returns the one it held."""
        with self._lock:
            old, self._model = self._model, None
            return old


class Follower:
    """Keeps one model's slot on the alias' version: polls, loads off the request path,
    swaps; a failed load keeps the old model and is counted."""

    def __init__(
        self,
        registry: Registry,
        name: str,
        *,
        alias: str,
        mode: NumericMode,
        poll_interval_s: float,
        drift: bool = False,
    ) -> None:
        """``drift``: load each version with its feature reference (for the drift score)."""
        self.registry, self.name, self.drift = registry, name, drift
        self.alias, self.mode, self.poll_interval_s = alias, mode, poll_interval_s
        self.slot = ModelSlot()
        self.parked = False
        """Its version was dropped to free memory (the replica's byte budget): nothing loads
        until :meth:`resume`."""
        self.failed_loads = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loading = threading.Lock()  # a push and a poll never load the same version twice
        self._graphs_tried: set[str] = set()  # versions loaded again for their graph set
        self._choosing: threading.Thread | None = None  # auto's choice, after fp32 went live

    def load_now(self) -> None:
        """Load the alias' version if it differs from the slot's (raises on failure)."""
        with self._loading:
            self._load()

    def refresh(self) -> None:
        """:meth:`load_now`, with a failure counted and logged instead of raised."""
        try:
            self.load_now()
        except Exception as exc:  # keep serving the old model; report the failure
            self.failed_loads += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("hot-load of %s failed: %s", self.name, self.last_error)

    def park(self) -> None:
        """Drop the loaded version and stop polling until :meth:`resume` (the replica needs
        the memory for models used more recently). A batch that holds the version finishes
        on it; a poll, notice or mode upgrade under way loads nothing after this."""
        self._stop.set()
        with self._loading:
            self.parked = True
            self.slot.clear()

    def resume(self) -> None:
        """Load the alias' version again and poll again (raises as :meth:`load_now`; the
        follower stays parked then)."""
        with self._loading:
            self.parked = False
            try:
                self._load()
            except BaseException:
                self.parked = True
                raise
        self.start()

    def _load(self) -> None:
        if self.parked:
            return
        record, _ = self.registry.get_alias(self.name, self.alias)
        if record is None:
            if not self.registry.list_versions(self.name):
                raise NotFoundError(f"no model named {self.name!r}", field="model")
            raise NoVersionError(
                f"model {self.name!r} has no {self.alias} version yet", field="model"
            )
        current = self.slot.current
        if current is not None and current.version == record.version:
            # a faster mode for what serves, off this call (one such load at a time: with one
            # under way, the next poll looks again)
            if not self._upgrading() and self._graphs_arrived(current):
                self._background(record)
            return
        # auto times and prepares the modes (a trace, a graph compile: seconds on a busy
        # CPU): a new version answers in fp32 first, then in the mode auto chooses
        quick = self.mode == "auto" and (current is None or current.version != record.version)
        del current
        self._swap(record, "fp32" if quick else self.mode)
        if quick:  # off this call: a request waiting for a cold model waits for fp32 alone
            self._background(record)

    def _upgrading(self) -> bool:
        return self._choosing is not None and self._choosing.is_alive()

    def _background(self, record: AliasRecord) -> None:
        """Load the version serving now again in the configured mode, off the caller: auto's
        choice after fp32 went live, or a graph mode once the version's graph set came."""
        self._choosing = threading.Thread(
            target=self._upgrade, args=(record,), daemon=True, name=f"mode-{self.name}"
        )
        self._choosing.start()

    def _upgrade(self, record: AliasRecord) -> None:
        """The configured mode for a version that serves (unless another version came
        first), once no job on this node is on its critical path: the traces, compiles and
        timings take seconds of CPU that a retrain going live needs more, and timings taken
        beside one would be wrong."""
        wait_quiet(QUIET_WAIT_S)
        with self._loading:
            current = self.slot.current
            if current is None or current.version != record.version or current.mode == self.mode:
                return  # parked, or another version came, or nothing to change
            try:
                self._swap(record, self.mode)
            except Exception as exc:  # the version keeps answering as it does
                log.warning(
                    "%s %s: %s serves, %s failed: %s",
                    self.name,
                    record.version,
                    current.mode,
                    self.mode,
                    exc,
                )

    def settled(self, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) for the background load of a faster mode (auto's
        choice for a version that went live in fp32, a graph mode once its graph set came);
        whether none is pending."""
        choosing = self._choosing
        if choosing is not None:
            choosing.join(timeout_s)
        return choosing is None or not choosing.is_alive()

    def _swap(self, record: AliasRecord, mode: NumericMode) -> None:
        served = load_served_model(
            self.registry,
            self.name,
            record.version,
            expect_sha256=record.sha256,
            mode=mode,
            drift=self.drift,
        )
        if served.fallback:
            log.warning(
                "%s %s: fp32 serves, not %s: %s", self.name, record.version, mode, served.fallback
            )
        old = self.slot.swap(served)
        del served
        if old is not None:  # freed once its last batch returns (a first load frees nothing)
            del old
            gc.collect()  # what a failed load before left in cycles (its traceback) goes too
            trim_heap()
        log.info("model %s now serves %s (%s)", self.name, record.version, mode)

    def _graphs_arrived(self, current: ServedModel) -> bool:
        # a version published before its graphs serves fp32 ("unavailable"; auto: the
        # fastest torch mode) until its graph set is stored; then it is loaded again (once),
        # and the mode gate decides as for any graph
        waiting = (self.mode in GRAPH_MODES and current.fallback_kind == "unavailable") or (
            self.mode == "auto" and not current.manifest.graphs
        )
        arrived = (
            waiting
            and current.version not in self._graphs_tried
            and self.registry.has_graph_set(self.name, current.version)
        )
        if arrived:
            self._graphs_tried.add(current.version)
        return arrived

    @property
    def current(self) -> ServedModel | None:
        """The version the next batch runs on."""
        return self.slot.current

    def start(self) -> None:
        """Start polling the alias."""
        # each thread its own stop event: a park then a resume never leaves two polling
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), daemon=True, name=f"follow-{self.name}"
        )
        self._thread.start()

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.poll_interval_s):
            self.refresh()

    @property
    def following(self) -> bool:
        """Whether this follower polls its alias now (not parked, stopped or evicted)."""
        return not self._stop.is_set()

    def stop(self) -> None:
        """Stop polling (the model is evicted)."""
        self._stop.set()

    def __del__(self) -> None:
        # Serve's multiplex LRU drops its reference when it evicts a model.
        self._stop.set()
