"""The S3 model registry: immutable versions, verified loads, compare-and-swap aliases.

Layout (relative to the configured prefix)::

    models/{model}/versions/{version}/stages/{stage}.safetensors   weights, stage by stage
    models/{model}/versions/{version}/model.safetensors   weights in one file (before stages)
    models/{model}/versions/{version}/manifest.json       written LAST: the version exists
    models/{model}/aliases/{alias}.json                   {"version", "sha256", "history"}

A version's stage that an earlier published version already stores is not written again:
its manifest names that version's file (``training.storage.stage_files``).

A loader never discovers versions by listing: it reads the alias, then the manifest (whose
sha256 the alias records), then checks every file's sha256 and refuses what does not verify.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from training.preprocessing_spec import Preprocessing
from training.storage.errors import ConflictError, IntegrityError, NotFoundError, SpecError
from training.storage.ids import check_ids, is_id, new_version_id
from training.storage.s3 import ObjectStore
from training.storage.stage_files import (
    StageCache,
    StageFile,
    StageTensors,
    stage_blob,
    stage_key,
)

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
CALIBRATION_FILE = "calibration.safetensors"
GRAPH_SET_FILE = "graphs/set.json"
"""A version's graph set, made after it was published (written last: it makes the set exist)."""
_GRAPH_FILE = re.compile(r"graphs/[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Up to 32 validation crops (uint8, before normalisation): load-time checks of numeric modes."""
log = logging.getLogger(__name__)

_HISTORY = 20

Verify = Callable[["Manifest", dict[str, torch.Tensor]], None]
"""A check of a version's weights before an alias may point at it (the service passes one
that builds the backbone and compares key set, shapes and dtypes)."""


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


class FileEntry(BaseModel):
    """A file of a version and its expected hash."""

    sha256: str
    size: int


class Manifest(BaseModel):
    """Everything needed to rebuild, verify and explain a published version."""

    model_config = ConfigDict(extra="forbid")
    MAX_BYTES: ClassVar[int] = 1024 * 1024
    """Largest manifest read: anything larger is damaged, never parsed."""

    schema_version: int = 1
    model: str
    version: str
    backbone: str
    num_classes: int
    class_names: list[str]
    preprocessing: Preprocessing
    freeze: dict[str, Any] = Field(default_factory=dict)
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    dataset: dict[str, Any] = Field(default_factory=dict)
    parent: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    gate: dict[str, Any] = Field(default_factory=dict)
    job_id: str | None = None
    created_at: str
    files: dict[str, FileEntry]
    graphs: dict[str, GraphRecord] = Field(default_factory=dict)
    """Graphs for accelerated numeric modes, by mode (``openvino``, ``int8``)."""
    drift: DriftReference | None = None
    """Penultimate-feature statistics of the validation split: the drift score's reference
    (``training.feature_stats``; None for versions with too few validation images)."""
    stages: list[StageDigest] = Field(default_factory=list)
    """The sha256 of each stage's tensors, in stage order, head last
    (``training.stage_digests``): versions whose leading stages hash the same share them
    exactly. Empty for versions published before they were recorded (computed at load)."""

    def weights_storage(self) -> dict[str, Any]:
        """How the version's weights are stored: the stages it wrote (their bytes) and the
        stages whose files published versions stored before it (``shared_with``)."""
        mine = [
            s
            for s in self.stages
            if s.file is None or (s.file.model, s.file.version) == (self.model, self.version)
        ]
        theirs = [s for s in self.stages if s.file is not None and s not in mine]
        written = sum(s.file.size for s in mine if s.file is not None)
        if not any(s.file for s in self.stages) and WEIGHTS_FILE in self.files:
            written = self.files[WEIGHTS_FILE].size  # one file, before stages
        return {
            "written_stages": [s.name for s in mine],
            "written_bytes": written,
            "shared_stages": [s.name for s in theirs],
            "shared_bytes": sum(s.file.size for s in theirs if s.file is not None),
            "shared_with": sorted({f"{s.file.model}@{s.file.version}" for s in theirs if s.file}),
        }


class GraphRecord(BaseModel):
    """A compiled-runtime graph of the version (an OpenVINO IR made at publish time) and how
    closely it follows fp32."""

    model_config = ConfigDict(extra="forbid")

    files: list[str]
    """Its files in ``Manifest.files`` (graph, weights), verified like the weights."""
    calibration_agreement: float
    """Top-1 agreement with fp32 on the calibration crops."""
    held_out_agreement: float | None = None
    """Top-1 agreement with fp32 on validation crops not used for calibration."""
    images: int
    """Calibration crops it was measured (and, for INT8, calibrated) on."""
    unquantized: list[str] = Field(default_factory=list)
    """INT8: the layers left in floating point (the classifier head; more where accuracy
    control restored them to keep the agreement)."""


class StageDigest(BaseModel):
    """One stage of a version's backbone and the sha256 of its tensors."""

    model_config = ConfigDict(extra="forbid")

    name: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    file: StageFile | None = None
    """The file holding the stage's tensors (the first version that stored this content);
    None: the version's weights are one file, ``model.safetensors``."""


class DriftReference(BaseModel):
    """The version's feature statistics file and the outlier threshold it was fitted with."""

    model_config = ConfigDict(extra="forbid")

    file: str
    """Its file in ``Manifest.files`` (class means and the spread of each feature)."""
    images: int
    """Images the class means and spreads were fitted on."""
    held_out: int | None = None
    """Images, not fitted on, the threshold was measured on (None: versions published before
    the threshold was held out, fitted and measured on the same validation images)."""
    features: int
    classes: int
    """Class means in the file (the classes the version predicted on its validation split)."""
    quantile: float
    """Share of those images within ``threshold``."""
    threshold: float
    """Distance (RMS of standardised features) beyond which a live input is an outlier."""


class GraphSet(BaseModel):
    """Graphs made for a version after it was published (an immutable addition: files under
    ``graphs/``, this record last). It names the sha256 of the version's manifest, so a set
    belongs to exactly one version's content."""

    model_config = ConfigDict(extra="forbid")
    MAX_BYTES: ClassVar[int] = 1024 * 1024

    manifest_sha256: str
    files: dict[str, FileEntry]
    graphs: dict[str, GraphRecord]
    created_at: str


class AliasRecord(BaseModel):
    """An alias pointer; ``sha256`` is the manifest's, ``history`` the earlier versions."""

    MAX_BYTES: ClassVar[int] = 64 * 1024
    """A version, a digest and at most 20 earlier versions: well under this."""

    version: str
    sha256: str
    updated_at: str
    history: list[str] = Field(default_factory=list)


def _tensors(blob: bytes, what: str) -> dict[str, torch.Tensor]:
    try:
        return st_load(blob)
    except Exception as exc:  # hashes match, yet it is no safetensors file
        raise IntegrityError(f"{what} is not a valid safetensors file: {exc}") from None


def _weights_file(model: str, version: str, state_dict: dict[str, torch.Tensor]) -> bytes:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return st_save(tensors, metadata={"refit.model": model, "refit.version": version})


@dataclass(frozen=True)
class WeightsUpload:
    """A version's weights, written before its manifest (:meth:`Registry.upload_weights`):
    one file (``entry``) or its stages (``stages``, with the keys this upload wrote)."""

    model: str
    version: str
    entry: FileEntry | None
    stages: tuple[StageDigest, ...] = ()
    written: tuple[str, ...] = ()


Weights = dict[str, torch.Tensor] | list[StageTensors] | WeightsUpload
"""What :meth:`Registry.publish` takes: a state dict (one file), its stages, or an upload."""


class Registry:
    """Publish, load and point at model versions in the object store.

    ``cache``: verified stage files kept in memory (a replica's hot-loads of variants of one
    backbone then read only the stages that differ); without one, only which published file
    holds each stage content seen is remembered."""

    def __init__(self, store: ObjectStore, *, cache: StageCache | None = None) -> None:
        self.store = store
        self.cache = cache if cache is not None else StageCache(0)
        # a cache may serve registries of several stores: what one stores, not another
        self._where = f"{store.settings.endpoint_url}|{store.uri()}"

    @staticmethod
    def _vkey(model: str, version: str, name: str) -> str:
        return f"models/{model}/versions/{version}/{name}"

    @staticmethod
    def _akey(model: str, alias: str) -> str:
        return f"models/{model}/aliases/{alias}.json"

    # --- publish -----------------------------------------------------------------------------
    def upload_weights(
        self, model: str, weights: dict[str, torch.Tensor] | list[StageTensors]
    ) -> WeightsUpload:
        """Write a new version's weights ahead of the rest of it (while the job still scores
        and gates the candidate): no version exists until :meth:`publish` writes its
        manifest; :meth:`discard` removes weights that will not be published. Given its
        stages, only the stages no published version seen stores are written."""
        check_ids(model=model)
        version = new_version_id()
        if isinstance(weights, list):
            return self._upload_stages(model, version, weights)
        blob = _weights_file(model, version, weights)
        key = self._vkey(model, version, WEIGHTS_FILE)
        self.store.put_bytes(key, blob, if_none_match=True)
        entry = FileEntry(sha256=sha256_hex(blob), size=len(blob))
        return WeightsUpload(model, version, entry, written=(key,))

    def _upload_stages(self, model: str, version: str, stages: list[StageTensors]) -> WeightsUpload:
        digests, written = [], []
        for stage in stages:
            file = self.cache.stored(self._where, stage.name, stage.sha256)
            if file is None:
                blob = stage_blob(stage)
                file = StageFile(
                    model=model, version=version, sha256=sha256_hex(blob), size=len(blob)
                )
                key = stage_key(stage.name, file)
                self.store.put_bytes(key, blob, if_none_match=True)
                written.append(key)
                self.cache.put(file.sha256, blob)  # what it wrote: read back from memory
            digests.append(StageDigest(name=stage.name, sha256=stage.sha256, file=file))
        return WeightsUpload(model, version, None, tuple(digests), tuple(written))

    def discard(self, upload: WeightsUpload) -> None:
        """Remove weights uploaded ahead of a version that will not be published (only the
        files this upload wrote: stages it shares belong to published versions)."""
        for key in upload.written:
            self.store.delete(key)

    def publish(
        self,
        weights: Weights,
        *,
        model: str,
        calibration: torch.Tensor | None = None,
        extra_files: dict[str, bytes] | None = None,
        **manifest_fields: Any,
    ) -> Manifest:
        """Write a new immutable version: files first, manifest last (it makes the version
        exist). Returns the manifest. No object can overwrite an existing one.

        ``weights``: a state dict (one file), its stages (each written unless a published
        version stores it; the manifest's ``stages`` then come from them), or their
        :meth:`upload_weights` (written already).
        ``calibration``: uint8 images ``[N, 3, H, W]`` (validation crops) kept with the version.
        ``extra_files``: more files of the version (the graphs that ``graphs`` describes),
        listed with their sha256 like the weights.
        """
        check_ids(model=model)
        files: dict[str, bytes] = {}
        entries: dict[str, FileEntry] = {}
        if isinstance(weights, list):
            weights = self.upload_weights(model, weights)
        if isinstance(weights, WeightsUpload):
            if weights.model != model:
                raise SpecError("weights uploaded for another model", field="model")
            version = weights.version
            if weights.entry is not None:
                entries[WEIGHTS_FILE] = weights.entry
            else:
                if "stages" in manifest_fields:
                    raise SpecError("stages come from the weights' stages", field="stages")
                manifest_fields["stages"] = list(weights.stages)
        else:
            version = new_version_id()
        meta = {"refit.model": model, "refit.version": version}
        if isinstance(weights, dict):
            files[WEIGHTS_FILE] = _weights_file(model, version, weights)
        if calibration is not None:
            images = calibration.to(torch.uint8).contiguous()
            files[CALIBRATION_FILE] = st_save({"images": images}, metadata=meta)
        for name, blob in (extra_files or {}).items():
            if name in files or name in entries or name == MANIFEST_FILE or not is_id(name):
                raise SpecError(f"{name!r} cannot be a file of a version", field="extra_files")
            files[name] = blob
        entries.update({n: FileEntry(sha256=sha256_hex(b), size=len(b)) for n, b in files.items()})
        manifest = Manifest(
            model=model,
            version=version,
            created_at=datetime.now(UTC).isoformat(),
            files=dict(sorted(entries.items())),
            **manifest_fields,
        )
        for name, blob in files.items():
            self.store.put_bytes(self._vkey(model, version, name), blob, if_none_match=True)
        self.store.put_bytes(
            self._vkey(model, version, MANIFEST_FILE),
            self.manifest_bytes(manifest),
            content_type="application/json",
            if_none_match=True,
        )
        self._learn(manifest)
        return manifest

    @staticmethod
    def manifest_bytes(manifest: Manifest) -> bytes:
        """Canonical manifest bytes (sorted keys): what is stored and hashed."""
        return json.dumps(manifest.model_dump(mode="json"), sort_keys=True, indent=1).encode()

    # --- read --------------------------------------------------------------------------------
    def read_manifest(
        self, model: str, version: str, *, expect_sha256: str | None = None
    ) -> tuple[Manifest, str]:
        """The manifest of a version and its sha256; IntegrityError when it does not match
        ``expect_sha256`` (from an alias) or does not parse, NotFoundError when absent."""
        check_ids(model=model, version=version)
        try:
            raw = self.store.get_bytes(
                self._vkey(model, version, MANIFEST_FILE), max_bytes=Manifest.MAX_BYTES
            )
        except NotFoundError:
            raise NotFoundError(
                f"model {model!r} has no version {version!r}", field="version"
            ) from None
        except ValueError as exc:
            raise IntegrityError(f"manifest of {model}@{version} is damaged: {exc}") from None
        digest = sha256_hex(raw)
        if expect_sha256 is not None and digest != expect_sha256:
            raise IntegrityError(f"manifest of {model}@{version} does not match its alias")
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError as exc:
            raise IntegrityError(f"manifest of {model}@{version} is malformed: {exc}") from None
        if manifest.model != model or manifest.version != version:
            raise IntegrityError(f"manifest of {model}@{version} names another version")
        self._learn(manifest)
        return manifest, digest

    def _learn(self, manifest: Manifest) -> None:
        for stage in manifest.stages:  # a published file: a new version may name it
            if stage.file is not None:
                self.cache.learn(self._where, stage.name, stage.sha256, stage.file)

    def load(self, model: str, ref: str = "production") -> tuple[Manifest, dict[str, torch.Tensor]]:
        """Load a version by id or alias, verifying the manifest and every file's sha256."""
        version, expect = self.resolve(model, ref)
        return self.load_version(model, version, expect_sha256=expect)

    def load_version(
        self, model: str, version: str, *, expect_sha256: str | None = None
    ) -> tuple[Manifest, dict[str, torch.Tensor]]:
        """Load one version, verifying its manifest against ``expect_sha256`` (the hash an
        alias recorded: the version the alias pointed at, not one written since) and every
        file against the manifest."""
        manifest, _ = self.read_manifest(model, version, expect_sha256=expect_sha256)
        return manifest, self.read_weights(manifest)

    def read_weights(
        self,
        manifest: Manifest,
        *,
        held: Mapping[str, dict[str, torch.Tensor]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """A version's state dict, every file verified: its stages' files (those the cache
        holds from memory) or its one weights file. ``held``: tensors the caller already
        holds for some stages, by stage name, with the content the manifest's digest of that
        stage names (a resident version's): those stages are not read."""
        what = f"{manifest.model}@{manifest.version}"
        if not manifest.stages or any(s.file is None for s in manifest.stages):
            return _tensors(self.read_file(manifest, WEIGHTS_FILE), f"{WEIGHTS_FILE} of {what}")
        state: dict[str, torch.Tensor] = {}
        for stage in manifest.stages:
            assert stage.file is not None
            if held is not None and stage.name in held:
                tensors = held[stage.name]
            else:
                blob = self._stage_bytes(stage.name, stage.file)
                tensors = _tensors(blob, f"{stage.name} of {what}")
            if state.keys() & tensors.keys():
                raise IntegrityError(f"stages of {what} share tensors", field="version")
            state.update(tensors)
        return state

    def _stage_bytes(self, name: str, file: StageFile) -> bytes:
        blob = self.cache.get(file.sha256)
        if blob is not None:
            return blob
        key = stage_key(name, file)
        try:
            blob = self.store.get_bytes(key, max_bytes=file.size)
        except NotFoundError:
            raise IntegrityError(f"{key} is missing", field="version") from None
        except ValueError:  # larger than its record: not the file it names
            raise IntegrityError(f"{key} fails its sha256 check", field="version") from None
        if len(blob) != file.size or sha256_hex(blob) != file.sha256:
            raise IntegrityError(f"{key} fails its sha256 check", field="version")
        self.cache.put(file.sha256, blob)
        return blob

    def read_file(self, manifest: Manifest, name: str) -> bytes:
        """A file of a version, verified against the manifest's size and sha256."""
        entry = manifest.files.get(name)
        if entry is None:
            raise NotFoundError(f"{manifest.model}@{manifest.version} has no {name}")
        blob = self.store.get_bytes(self._vkey(manifest.model, manifest.version, name))
        if len(blob) != entry.size or sha256_hex(blob) != entry.sha256:
            raise IntegrityError(
                f"{name} of {manifest.model}@{manifest.version} fails its sha256 check"
            )
        return blob

    # --- graphs made after publishing ---------------------------------------------------------
    def publish_graph_set(
        self, manifest: Manifest, files: dict[str, bytes], graphs: dict[str, GraphRecord]
    ) -> GraphSet:
        """Add graphs to a published version: the files under ``graphs/`` first, the set's
        record last (if-none-match: a version gets one set). ``graphs`` name their files."""
        for name in files:
            if not _GRAPH_FILE.fullmatch(name) or name == GRAPH_SET_FILE:
                raise SpecError(f"{name!r} cannot be a graph file", field="files")
        if any(n not in files for g in graphs.values() for n in g.files):
            raise SpecError("a graph names a file the set does not have", field="graphs")
        _, digest = self.read_manifest(manifest.model, manifest.version)
        record = GraphSet(
            manifest_sha256=digest,
            files={n: FileEntry(sha256=sha256_hex(b), size=len(b)) for n, b in files.items()},
            graphs=graphs,
            created_at=datetime.now(UTC).isoformat(),
        )
        for name, blob in files.items():
            self.store.put_bytes(
                self._vkey(manifest.model, manifest.version, name), blob, if_none_match=True
            )
        self.store.put_bytes(
            self._vkey(manifest.model, manifest.version, GRAPH_SET_FILE),
            json.dumps(record.model_dump(mode="json"), sort_keys=True, indent=1).encode(),
            content_type="application/json",
            if_none_match=True,
        )
        return record

    def has_graph_set(self, model: str, version: str) -> bool:
        """Whether graphs were added to a version after it was published."""
        check_ids(model=model, version=version)
        return self.store.exists(self._vkey(model, version, GRAPH_SET_FILE))

    def with_graph_set(self, manifest: Manifest) -> Manifest:
        """The manifest with its graph set's graphs and files (verified like the version's
        own when read), or unchanged when it has no set. A set that does not parse or names
        another manifest is ignored (logged): the version serves without it."""
        key = self._vkey(manifest.model, manifest.version, GRAPH_SET_FILE)
        try:
            record = self.store.get_record(key, GraphSet)
        except NotFoundError:
            return manifest
        except IntegrityError as exc:
            log.warning("graph set of %s@%s ignored: %s", manifest.model, manifest.version, exc)
            return manifest
        _, digest = self.read_manifest(manifest.model, manifest.version)
        bad = [n for n in record.files if not _GRAPH_FILE.fullmatch(n) or n in manifest.files]
        if record.manifest_sha256 != digest or bad:
            log.warning(
                "graph set of %s@%s ignored: it belongs to another manifest",
                manifest.model,
                manifest.version,
            )
            return manifest
        return manifest.model_copy(
            update={
                "files": {**manifest.files, **record.files},
                "graphs": {**record.graphs, **manifest.graphs},
            }
        )

    def load_calibration(self, manifest: Manifest) -> torch.Tensor | None:
        """The version's calibration images (uint8 ``[N, 3, H, W]``), or None if it has none."""
        if CALIBRATION_FILE not in manifest.files:
            return None
        return st_load(self.read_file(manifest, CALIBRATION_FILE))["images"]

    def resolve(self, model: str, ref: str) -> tuple[str, str | None]:
        """``(version, expected manifest sha256 or None)`` for an alias name or version id."""
        check_ids(model=model, ref=ref)
        record, _ = self.get_alias(model, ref)
        if record is not None:
            return record.version, record.sha256
        if self.store.exists(self._vkey(model, ref, MANIFEST_FILE)):
            return ref, None
        raise NotFoundError(f"model {model!r} has no version or alias {ref!r}")

    # --- aliases -----------------------------------------------------------------------------
    def get_alias(self, model: str, alias: str) -> tuple[AliasRecord | None, str | None]:
        """The alias record and its ETag, or ``(None, None)``."""
        check_ids(model=model, alias=alias)
        key = self._akey(model, alias)
        try:
            # one damaged object must not break anything but its model (field: model)
            return self.store.get_record_with_etag(key, AliasRecord, field="model")
        except NotFoundError:
            return None, None

    def serving(self, model: str, alias: str) -> AliasRecord:
        """The alias record a model serves under; NotFoundError naming ``model`` when the
        alias points nowhere yet."""
        record, _ = self.get_alias(model, alias)
        if record is None:
            raise NotFoundError(f"model {model!r} has no {alias} version", field="model")
        return record

    def serving_manifest(self, model: str, alias: str) -> Manifest:
        """The manifest of the version the alias points at (checked against the alias)."""
        record = self.serving(model, alias)
        return self.read_manifest(model, record.version, expect_sha256=record.sha256)[0]

    def set_alias(
        self, model: str, alias: str, version: str, *, verify: Verify | None = None
    ) -> AliasRecord:
        """Point an alias at a verified version (compare-and-swap on the alias object).
        ``verify`` also checks that the weights load into the manifest's model."""
        manifest, digest = self.read_manifest(model, version)
        _, state = self.load_version(model, version, expect_sha256=digest)
        if verify is not None:
            verify(manifest, state)
        current, etag = self.get_alias(model, alias)
        history = []
        if current is not None:
            history = [current.version, *current.history][:_HISTORY]
        record = AliasRecord(
            version=manifest.version,
            sha256=digest,
            updated_at=datetime.now(UTC).isoformat(),
            history=history,
        )
        self._write_alias(model, alias, record, etag)
        return record

    def rollback(
        self, model: str, alias: str = "production", *, verify: Verify | None = None
    ) -> AliasRecord:
        """Point the alias back at the version it held before (one step)."""
        current, etag = self.get_alias(model, alias)
        if current is None or not current.history:
            raise NotFoundError(f"alias {model}@{alias} has no earlier version")
        previous, rest = current.history[0], current.history[1:]
        manifest, digest = self.read_manifest(model, previous)
        _, state = self.load_version(model, previous, expect_sha256=digest)
        if verify is not None:
            verify(manifest, state)
        record = AliasRecord(
            version=previous,
            sha256=digest,
            updated_at=datetime.now(UTC).isoformat(),
            history=rest,
        )
        self._write_alias(model, alias, record, etag)
        return record

    def _write_alias(self, model: str, alias: str, record: AliasRecord, etag: str | None) -> None:
        try:
            self.store.put_record(
                self._akey(model, alias), record, if_none_match=etag is None, if_match=etag
            )
        except ConflictError:
            raise ConflictError(
                f"alias {model}@{alias} was moved concurrently; read it and retry"
            ) from None

    # --- listing (for humans and the API; loaders never list) ---------------------------------
    def list_models(self) -> list[str]:
        """Names of models with at least one published version."""
        names = set()
        for obj in self.store.list("models/"):
            parts = obj.key.split("/")
            if len(parts) == 5 and parts[2] == "versions" and parts[4] == MANIFEST_FILE:
                names.add(parts[1])
        return sorted(names)

    def list_versions(self, model: str) -> list[str]:
        """Published versions of a model (those with a manifest), oldest first."""
        check_ids(model=model)
        out = []
        for obj in self.store.list(f"models/{model}/versions/"):
            parts = obj.key.split("/")
            if len(parts) == 5 and parts[4] == MANIFEST_FILE:
                out.append(parts[3])
        return sorted(out)
