"""The benchmark's quick mode runs and writes its results (no timing assertions:
timings live in the benchmark, never in tests)."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_bench_quick_mode_writes_results_json_with_the_figures(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--orthanc", "no", "--no-chart", "--out", str(out),
         "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    [results_file] = out.glob("*.json")
    results = json.loads(results_file.read_text())
    assert {"meta", "figures", "notes", "available", "index_sizes"} <= set(results)
    assert set(results["meta"]["file_creation_us"]) == {"start", "end"}  # the machine's state, for reading the run
    figures = results["figures"]
    for name in ("cstore_1_assoc", "cstore_4_assoc", "cstore_1_assoc_big_index", "cmove_study"):
        assert set(figures[name]) == {"dicomnode", "storescp"} - ({"storescp"} if name == "cmove_study" else set())
        assert figures[name]["dicomnode"]["instances_per_s"] > 0
    labels = results["index_sizes"]["labels"]
    for size in labels.values():
        for query in ("patient_id", "patient_name_wildcard", "study_date_range", "series_modality"):
            assert "p95_ms" in figures[f"cfind_{query}_{size}"]["dicomnode"]
            assert f"qido_{query}_{size}" in figures
        assert figures[f"startup_{size}"]["dicomnode"]["seconds"] > 0
    for name in ("stow_1_client", "stow_4_clients", "wado_study", "series_metadata", "rendered_frame",
                 "peak_rss_stow_1gb", "peak_rss_stream_2gb"):
        assert name in figures
    assert results["notes"] == []
