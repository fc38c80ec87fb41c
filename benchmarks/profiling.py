"""Where the CPU goes while a benchmark loads a server: CPU seconds per process (from
/proc) and a py-spy sampling profile of one process, summarised by function and by stage."""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from load import descendants, process_label

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(root: int, skip: tuple[int, ...] = ()) -> dict[int, tuple[float, str]]:
    """CPU seconds (user + system) so far of ``root`` and its descendants, by pid, with the
    process's name as a label for the report (never used to pick a process)."""
    out: dict[int, tuple[float, str]] = {}
    for pid in [root, *descendants(root, skip=skip)]:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[pid] = ((int(fields[11]) + int(fields[12])) / TICKS, process_label(pid))
    return out


def cpu_per_request(
    before: dict[int, tuple[float, str]], after: dict[int, tuple[float, str]], requests: int
) -> list[dict[str, Any]]:
    """CPU ms per request of every process that used at least 0.1 ms, biggest first."""
    rows = []
    for pid, (sec, label) in after.items():
        used = sec - before.get(pid, (0.0, label))[0]
        ms = 1000 * used / max(1, requests)
        if ms >= 0.1:
            rows.append({"pid": pid, "process": label, "cpu_ms_per_request": round(ms, 2)})
    return sorted(rows, key=lambda r: -r["cpu_ms_per_request"])


# a sampled stack is charged to the first stage whose marker it contains, in this order
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # decode and crop first: torchvision's transforms are modules, so their stacks hold
    # "forward (" too, and would count as the model's
    ("image decode (Pillow)", ("decode_image", "PIL/", "ImageFile")),
    ("resize, crop, to tensor", ("crop_image", "crop_transform", "transforms", "pil_to_tensor")),
    ("model forward (graph or torch)", ("_infer", "forward (", "__call__ (torch", "infer (")),
    ("normalize and stack", ("normalize", "stack (")),
    ("base64 and JSON", ("b64decode", "json", "orjson", "model_validate", "pydantic")),
    ("HTTP and ASGI (uvicorn, starlette, FastAPI)", ("uvicorn", "starlette", "fastapi", "h11")),
    ("Ray Serve replica machinery", ("ray/serve", "ray/_private", "_raylet")),
    ("asyncio event loop", ("asyncio",)),
)


def stage_of(stack: str) -> str:
    """The stage a collapsed stack belongs to (see ``STAGES``), else ``other``."""
    for stage, markers in STAGES:
        if any(m in stack for m in markers):
            return stage
    return "other"


def summarise(collapsed: str, top: int = 15) -> dict[str, Any]:
    """py-spy's raw (collapsed) output -> share of samples by stage and by leaf function."""
    stages: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        stages[stage_of(stack)] += n
        leaves[stack.split(";")[-1].strip()] += n
    return {
        "samples": total,
        "by_stage": {k: round(v / max(1, total), 3) for k, v in stages.most_common()},
        "top_leaves": {k: round(v / max(1, total), 3) for k, v in leaves.most_common(top)},
    }


class PySpy:
    """``py-spy record`` of one process (every thread that is not idle) for a while."""

    def __init__(self, pid: int, seconds: float, out: Path, native: bool = False) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        cmd = [exe, "record", "--pid", str(pid), "--duration", str(int(seconds))]
        cmd += ["--rate", "200", "--format", "raw", "--output", str(out), "--nonblocking"]
        if native:
            cmd.append("--native")
        self.out = out
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def result(self, timeout: float = 120) -> dict[str, Any]:
        """Wait for the recording; its summary, or the reason there is none."""
        try:
            _, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its handle
            return {"error": "py-spy did not finish"}
        if self.proc.returncode != 0 or not self.out.exists():
            return {"error": err.decode(errors="replace")[-300:]}
        return summarise(self.out.read_text())
