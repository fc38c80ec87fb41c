"""Shared helpers of the benchmark scripts: an embedded store with the digits, table, JSON."""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import demo
from training.seaweed import EmbeddedStore
from training.settings import RefitSettings
from training.store import ObjectStore

RESULTS = Path(__file__).resolve().parent / "results"


@contextmanager
def digits_store() -> Iterator[tuple[RefitSettings, ObjectStore]]:
    """A temporary SeaweedFS holding both demo datasets."""
    with tempfile.TemporaryDirectory() as tmp, EmbeddedStore(Path(tmp)) as conn:
        settings = RefitSettings(s3=conn.s3_settings())
        store = ObjectStore(settings.s3)
        demo.write_demo_datasets(store)
        yield settings, store


def report(name: str, rows: list[dict[str, Any]], extra: dict[str, Any]) -> Path:
    """Print rows as a table and write them (with ``extra``) to results/NAME.json."""
    cols = list(rows[0])
    widths = [max(len(c), *(len(_fmt(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  ".join(_fmt(r[c]).ljust(w) for c, w in zip(cols, widths, strict=True)))
    for k, v in extra.items():
        print(f"{k}: {_fmt(v)}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"rows": rows, **extra}, indent=2))
    print(f"wrote {path}")
    return path


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
