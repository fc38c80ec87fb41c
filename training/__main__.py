"""``python -m training --spec spec.json``: run one fine-tune job (a RayJob entrypoint).
``python -m training --job-id ID``: run the queued job of that record (the entrypoint of the
RayJobs the service launches with ``REFIT_TRAINING__LAUNCHER=rayjob``).

Settings come from the environment (``REFIT_*``, ``AWS_*``); Ray from ``REFIT_RAY__ADDRESS``
(``auto`` inside a RayJob) or a local one.
"""

from __future__ import annotations

import argparse
import sys

from training.entry import run_job_record, run_spec_file
from training.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the spec."""
    parser = argparse.ArgumentParser(prog="python -m training")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--spec", help="path of the fine-tune spec (JSON)")
    which.add_argument("--job-id", help="run the job of this record (created by the API)")
    args = parser.parse_args(argv)
    if args.job_id:
        return run_job_record(args.job_id, get_settings())
    return run_spec_file(args.spec, get_settings())


if __name__ == "__main__":
    sys.exit(main())
