"""Micro-benchmark of the ingest header parse: ``archive._parse`` on 512x512 CT slices,
fast path against the pydicom path. Medians of repeated runs (the machine is shared).

    python -m bench.parse_header [--count 20] [--repeat 15]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench.corpus import ct_study
from storage import archive
from storage.header import read_header


def _per_instance(files: list[Path], parse) -> float:
    handles = [open(p, "rb") for p in files]
    sizes = [p.stat().st_size for p in files]
    try:
        start = time.perf_counter()
        for fh, size in zip(handles, sizes):
            parse(fh, size)
        return (time.perf_counter() - start) / len(files)
    finally:
        for fh in handles:
            fh.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = ct_study(Path(tmp), args.count).files
        with open(files[0], "rb") as fh:
            assert read_header(fh, files[0].stat().st_size) is not None, "fast path not taken"
        for name, parse in (("pydicom", archive._parse_with_pydicom), ("fast", archive._parse)):
            runs = [_per_instance(files, parse) for _ in range(args.repeat)]
            print(f"{name:8s} median {statistics.median(runs) * 1e6:7.1f} us/instance "
                  f"(min {min(runs) * 1e6:.1f}, {args.repeat} runs of {len(files)})")


if __name__ == "__main__":
    main()
