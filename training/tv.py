"""The one place that imports torchvision.

The PyPI torchvision 0.28.0 wheel is a CUDA build. Next to a CPU-only torch its compiled
extension cannot load, and ``import torchvision`` then fails while registering fake kernels for
``torchvision::nms`` ("operator torchvision::nms does not exist"). Models, weights enums and
transforms are pure Python, so when - and only when - the extension cannot load we define the
two missing op schemas first. ``torchvision.ops`` kernels and ``torchvision.io`` stay unusable
in that case, which is why images are decoded with Pillow everywhere in Refit.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
# Keeps the Library object alive: dropping it would unregister the schemas.
_fallback_lib: torch.library.Library | None = None


def _extension_loads() -> bool:
    """Try the real compiled extension (it registers the real ops when it works)."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    for lib in sorted(Path(spec.origin).parent.glob("_C*.so")):
        try:
            torch.ops.load_library(str(lib))
        except (OSError, RuntimeError):
            return False
        return True
    return False


def _install_fallback_schemas() -> None:
    global _fallback_lib
    if _fallback_lib is not None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - probing whether the schema exists
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        lib.define(schema)
    _fallback_lib = lib


EXTENSION_LOADED = _extension_loads()
if not EXTENSION_LOADED:
    _install_fallback_schemas()

import torchvision  # noqa: E402 - must follow the schema fix-up above
from torchvision import models, transforms  # noqa: E402
from torchvision.transforms import v2 as transforms_v2  # noqa: E402

__all__ = ["EXTENSION_LOADED", "models", "torchvision", "transforms", "transforms_v2"]
