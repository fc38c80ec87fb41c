"""``python -m training --spec spec.json``: run one fine-tune job (the RayJob entrypoint).

Settings come from the environment (``REFIT_*``, ``AWS_*``); Ray from ``REFIT_RAY__ADDRESS``
(``auto`` inside a RayJob) or a local one.
"""

from __future__ import annotations

import argparse
import sys

from training.entry import run_spec_file
from training.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the spec."""
    parser = argparse.ArgumentParser(prog="python -m training")
    parser.add_argument("--spec", required=True, help="path of the fine-tune spec (JSON)")
    args = parser.parse_args(argv)
    return run_spec_file(args.spec, get_settings())


if __name__ == "__main__":
    sys.exit(main())
