"""The benchmark: dicomnode beside Orthanc and dcmtk storescp, in one run.

    python -m bench.run [--quick] [--instances N] [--index-size N] [--repeats N]

Prints a table, writes ``bench/results/<timestamp>.json`` and a PNG chart beside it.
``--quick`` is a seconds-long smoke run (tiny corpus, no Orthanc) that CI can afford.
Every server it starts is stopped on the way out, also on error or Ctrl-C.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import pydicom

from . import corpus
from .measure import (
    FindSession, NotAvailable, cmove, cstore, echo_ms, file_creation_us, http_get, http_get_streamed, median,
    percentile, peak_rss_during, qido, service_available, stow, stow_stream, _conn,
)
from .servers import Server, orthanc_exe, start_dicomnode, start_orthanc, start_storescp

RESULTS = Path(__file__).resolve().parent / "results"
NA = "not available"


@dataclass
class Plan:
    quick: bool
    instances: int
    image_size: int
    index_small: int
    index_large: int
    repeats: int
    query_repeats: int
    series_instances: int
    upload_mb: int
    stream_mb: int
    orthanc: bool
    fill_batch: int = 5000
    workers: int = 4  # dicomnode's [ae] and [http] workers: a process per parallel association or client


def build_plan(args: argparse.Namespace) -> Plan:
    if args.quick:
        plan = Plan(True, args.instances or 20, 64, args.index_small or 100, args.index_size or 200,
                    args.repeats or 1, 3, 20, 4, 4, args.orthanc == "yes", fill_batch=100)
    else:
        plan = Plan(False, args.instances or 500, 512, args.index_small or 10_000, args.index_size or 200_000,
                    args.repeats or 3, 15, 1000, 1024, 2048, args.orthanc != "no")
    if args.workers is not None:
        plan.workers = args.workers
    if plan.index_large < plan.index_small:
        plan.index_large = plan.index_small
    return plan


# ---------------------------------------------------------------- the run


class Bench:
    def __init__(self, plan: Plan, work: Path, log: Callable[[str], None]) -> None:
        self.plan = plan
        self.work = work
        self.log = log
        self.servers: dict[str, Server] = {}
        self.results: dict[str, Any] = {"figures": {}, "notes": []}
        self.rng = random.Random(6)
        self.filled = 0  # small instances sent to the index-bearing servers
        self.study0: dict[str, str] = {}
        self.avail: dict[str, dict[str, bool]] = {}
        self._set = 0
        self.kept_logs: list[tuple[str, bytes]] = []

    # -- helpers
    def fig(self, name: str, target: str, value: Any) -> None:
        self.results["figures"].setdefault(name, {})[target] = value

    def note(self, text: str) -> None:
        self.log(f"  note: {text}")
        self.results["notes"].append(text)

    def archives(self) -> list[Server]:
        return [s for name, s in self.servers.items() if name in ("dicomnode", "orthanc")]

    def ct_set(self) -> corpus.Written:
        self._set += 1
        folder = self.work / "sets" / f"set{self._set}"
        return corpus.ct_study(folder, self.plan.instances, size=self.plan.image_size, tag=f"S{self._set}")

    def drop(self, written: corpus.Written) -> None:
        if written.files:
            shutil.rmtree(written.files[0].parent, ignore_errors=True)

    def clear_storescp(self) -> None:
        scp = self.servers["storescp"]
        for entry in scp.folder.iterdir():
            if entry.is_file():
                entry.unlink()

    def keep_log(self, server: Server) -> None:
        """Keep a server's log beside the results when something failed."""
        if server.log_path is not None and server.log_path.exists():
            self.kept_logs.append((server.name, server.log_path.read_bytes()[-2_000_000:]))

    def order(self, r: int, names: list[str]) -> list[str]:
        """Rotate who goes first on each repeat (warm caches, background load)."""
        k = r % len(names) if names else 0
        return names[k:] + names[:k]

    # -- servers
    def start(self) -> None:
        self.servers["storescp"] = start_storescp(self.work / "storescp")
        node, secs = start_dicomnode(self.work / "dicomnode", self.servers["storescp"],
                                     workers=self.plan.workers)
        self.servers["dicomnode"] = node
        self.log(f"dicomnode up in {secs:.2f} s (AE port {node.dimse_port}, HTTP {node.http_port})")
        if self.plan.orthanc:
            if orthanc_exe() is None:
                self.note("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb): measured without it")
            else:
                orthanc, secs = start_orthanc(self.work / "orthanc", self.servers["storescp"])
                self.servers["orthanc"] = orthanc
                self.log(f"Orthanc up in {secs:.2f} s (AE port {orthanc.dimse_port}, HTTP {orthanc.http_port})")
        for server in self.archives():
            self.avail[server.name] = service_available(server)
        self.results["available"] = self.avail

    def stop(self) -> None:
        for server in self.servers.values():
            with contextlib.suppress(Exception):
                server.stop()

    # -- figures
    def cstore_figures(self, name: str, associations: int, targets: list[str]) -> None:
        runs: dict[str, list[float]] = {t: [] for t in targets}
        nbytes = 0
        for r in range(self.plan.repeats):
            written = self.ct_set()
            nbytes = written.nbytes
            for target in self.order(r, targets):
                secs = cstore(self.servers[target], written.files, associations)
                runs[target].append(secs)
                if target == "storescp":
                    self.clear_storescp()
                elif target not in self.study0:
                    self.study0[target] = written.study_uids[0]
            self.drop(written)
        self.rate_figures(name, runs, nbytes)

    def rate_figures(self, name: str, runs: dict[str, list[float]], nbytes: int) -> None:
        """Instances/s and MB/s of the median run of each target."""
        n = self.plan.instances
        for target, secs in runs.items():
            m = median(secs)
            self.fig(name, target, {"instances_per_s": n / m, "mb_per_s": nbytes / 1e6 / m, "runs_s": secs})
            self.log(f"  {name:<22} {target:<10} {n / m:8.1f} inst/s {nbytes / 1e6 / m:7.1f} MB/s")

    def stow_figures(self, name: str, clients: int) -> None:
        targets = [s.name for s in self.archives() if self.avail[s.name]["stow"]]
        for s in self.archives():
            if s.name not in targets:
                self.fig(name, s.name, NA)
        if not targets:
            return
        runs: dict[str, list[float]] = {t: [] for t in targets}
        nbytes = 0
        for r in range(self.plan.repeats):
            written = self.ct_set()
            nbytes = written.nbytes
            for target in self.order(r, targets):
                runs[target].append(stow(self.servers[target], written.files, clients))
            self.drop(written)
        self.rate_figures(name, runs, nbytes)

    def cmove_figures(self) -> None:
        dest = self.servers["storescp"]
        for server in self.archives():
            secs = []
            for _ in range(self.plan.repeats):
                self.clear_storescp()
                try:
                    secs.append(cmove(server, dest, self.study0[server.name]))
                except RuntimeError as exc:
                    self.note(f"C-MOVE from {server.name} failed: {exc}"[:400])
                    self.keep_log(server)
                    continue
                got = sum(1 for p in dest.folder.iterdir() if p.is_file())
                if got != self.plan.instances:
                    self.note(f"C-MOVE from {server.name} delivered {got} of {self.plan.instances} instances")
            self.clear_storescp()
            if not secs:
                self.fig("cmove_study", server.name, "failed: every repeat failed")
                continue
            m = median(secs)
            self.fig("cmove_study", server.name, {"instances_per_s": self.plan.instances / m, "runs_s": secs,
                                                  "failed_repeats": self.plan.repeats - len(secs)})
            self.log(f"  {'cmove_study':<22} {server.name:<10} {self.plan.instances / m:8.1f} inst/s")

    def fill(self, target_count: int) -> None:
        """Bring every archive to ``target_count`` small instances, through C-STORE (the
        real ingest path), 4 associations per server, servers filled side by side."""
        started = time.perf_counter()
        while self.filled < target_count:
            count = min(self.plan.fill_batch, target_count - self.filled)
            batch = corpus.fill_batch(self.work / "fill", count, self.filled, self.rng)
            errors: list[BaseException] = []
            spent: dict[str, float] = {}

            def send(server: Server) -> None:
                try:
                    spent[server.name] = cstore(server, batch.files, 4, timeout=3600, retries=1,
                                                notes=self.results["notes"])
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=send, args=(s,)) for s in self.archives()]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            self.drop(batch)
            if errors:
                raise errors[0]
            self.filled += count
            rates = ", ".join(f"{k} {count / v:.0f}/s" for k, v in spent.items())
            self.log(f"  index filled to {self.filled} instances ({rates})")
            self.results.setdefault("fill_rates", []).append({"at": self.filled, **{k: count / v for k, v in spent.items()}})
        self.log(f"  fill to {target_count} took {time.perf_counter() - started:.0f} s")

    def queries(self) -> dict[str, tuple[str, dict[str, str], str]]:
        return {
            "patient_id": ("STUDY", {"PatientID": "PID0000012", "StudyInstanceUID": "", "StudyDate": "",
                                     "PatientName": ""}, "/studies?PatientID=PID0000012"),
            "patient_name_wildcard": ("STUDY", {"PatientName": "NAME000012*", "StudyInstanceUID": "",
                                                "PatientID": "", "StudyDate": ""}, "/studies?PatientName=NAME000012*"),
            "study_date_range": ("STUDY", {"StudyDate": "20100101-20100131", "StudyInstanceUID": "",
                                           "PatientID": "", "AccessionNumber": ""},
                                 "/studies?StudyDate=20100101-20100131"),
            "series_modality": ("SERIES", {"Modality": "MR", "SeriesInstanceUID": "", "StudyInstanceUID": "",
                                           "SeriesNumber": ""}, "/series?Modality=MR"),
        }

    def query_figures(self, size_label: str) -> None:
        q = self.plan.query_repeats
        for server in self.archives():
            echo = [echo_ms(server) for _ in range(min(q, 5))]
            self.fig(f"echoscu_baseline_{size_label}", server.name, {"p50_ms": median(echo)})
            session = FindSession(server)
            for qname, (level, keys, path) in self.queries().items():
                times, count = [], 0
                try:
                    session.find(level, keys)  # warm up
                    for _ in range(q):
                        ms, count = session.find(level, keys)
                        times.append(ms)
                    value: Any = {"p50_ms": median(times), "p95_ms": percentile(times, 95), "results": count}
                    self.log(f"  cfind {qname:<22} {size_label:<5} {server.name:<10} p50 {value['p50_ms']:7.1f} ms "
                             f"p95 {value['p95_ms']:7.1f} ms ({count} results)")
                except Exception as exc:
                    value = f"failed: {exc}"[:300]
                    self.log(f"  cfind {qname} on {server.name}: {value}")
                self.fig(f"cfind_{qname}_{size_label}", server.name, value)
                if not self.avail[server.name]["qido"]:
                    self.fig(f"qido_{qname}_{size_label}", server.name, NA)
                    continue
                conn = _conn(server)
                times = []
                try:
                    qido(server, path, conn)  # warm the connection
                    for _ in range(q):
                        ms, count = qido(server, path, conn)
                        times.append(ms)
                    value = {"p50_ms": median(times), "p95_ms": percentile(times, 95), "results": count}
                    self.log(f"  qido  {qname:<22} {size_label:<5} {server.name:<10} p50 {value['p50_ms']:7.1f} ms "
                             f"p95 {value['p95_ms']:7.1f} ms ({count} results)")
                except NotAvailable:
                    value = NA
                except Exception as exc:
                    value = f"failed: {exc}"[:300]
                    self.log(f"  qido {qname} on {server.name}: {value}")
                finally:
                    conn.close()
                self.fig(f"qido_{qname}_{size_label}", server.name, value)
            session.close()

    def wado_figures(self) -> None:
        big = corpus.big_series(self.work / "bigseries", self.plan.series_instances)
        for server in self.archives():
            cstore(server, big.files, 4)
        ct = self.ct_set()  # one more CT study, also for the rendered frame
        for server in self.archives():
            cstore(server, ct.files, 4)
        first = pydicom.dcmread(ct.files[0], stop_before_pixels=True)
        ct_series, ct_sop = first.SeriesInstanceUID, first.SOPInstanceUID
        ct_study, ct_bytes = ct.study_uids[0], ct.nbytes
        self.drop(ct)
        self.drop(big)
        serving = [server for server in self.archives() if self.avail[server.name]["qido"]]
        for server in self.archives():
            if server not in serving:
                for name in ("wado_study", "series_metadata", "rendered_frame"):
                    self.fig(name, server.name, NA)
        self._timed_gets(serving, "wado_study", f"/studies/{ct_study}",
                         'multipart/related; type="application/dicom"; transfer-syntax=*', ct_bytes)
        self._timed_gets(serving, "series_metadata",
                         f"/studies/{big.study_uids[0]}/series/{big.series_uids[0]}/metadata",
                         "application/dicom+json", None)
        self._timed_gets(serving, "rendered_frame",
                         f"/studies/{ct_study}/series/{ct_series}/instances/{ct_sop}/frames/1/rendered",
                         "image/jpeg", None)

    def _timed_gets(self, servers: list[Server], name: str, path: str, accept: str, nbytes: int | None) -> None:
        """``repeats`` GETs of ``path`` from each server, the servers taking turns (who
        goes first rotates), so that a phase of the machine weighs on all of them."""
        by_name = {server.name: server for server in servers}
        times: dict[str, list[float]] = {server.name: [] for server in servers}
        sizes: dict[str, int] = {}
        failed: dict[str, Any] = {}
        for r in range(self.plan.repeats):
            for server_name in self.order(r, list(by_name)):
                if server_name in failed:
                    continue
                try:
                    if nbytes:  # a big body: streamed through one buffer
                        ms, status, size, head = http_get_streamed(by_name[server_name], path, accept)
                    else:
                        ms, status, head = http_get(by_name[server_name], path, accept)
                        size = len(head)
                    if status != 200:
                        raise RuntimeError(f"HTTP {status}: {head[:200]!r}")
                except NotAvailable:
                    failed[server_name] = NA
                    continue
                except Exception as exc:
                    failed[server_name] = f"failed: {exc}"[:300]
                    self.log(f"  {name} on {server_name}: {failed[server_name]}")
                    continue
                times[server_name].append(ms)
                sizes[server_name] = size
        for server_name, runs in times.items():
            if server_name in failed:
                self.fig(name, server_name, failed[server_name])
                continue
            m = median(runs)
            value: Any = {"ms": m, "bytes": sizes[server_name], "runs_ms": runs}
            if nbytes:
                value["mb_per_s"] = sizes[server_name] / 1e6 / (m / 1000)
            self.log(f"  {name:<22} {server_name:<10} {m:8.1f} ms ({sizes[server_name] / 1e6:.1f} MB)")
            self.fig(name, server_name, value)

    def rss_figures(self) -> None:
        node = self.servers["dicomnode"]
        if not self.avail["dicomnode"]["stow"]:
            self.fig("peak_rss_stow_1gb", "dicomnode", NA)
            self.fig("peak_rss_stream_2gb", "dicomnode", NA)
            return
        template = self.work / "rss_template.dcm"
        w = corpus.ct_study(self.work / "rss", 1, size=512, tag="RSS")
        shutil.copy(w.files[0], template)
        self.drop(w)
        for name, mb in (("peak_rss_stow_1gb", self.plan.upload_mb), ("peak_rss_stream_2gb", self.plan.stream_mb)):
            try:
                peak, secs = peak_rss_during(node.pid, lambda: stow_stream(node, template, mb * 1_000_000))
                # the process that took the upload; all of the node's processes together beside it
                value: Any = {"peak_rss_mb": peak["process"], "all_processes_mb": peak["total"],
                              "upload_mb": mb, "seconds": secs}
                self.log(f"  {name:<22} dicomnode  peak RSS {peak['process']:.0f} MB in one process, "
                         f"{peak['total']:.0f} MB all processes ({mb} MB in {secs:.1f} s)")
            except Exception as exc:
                value = f"failed: {exc}"[:300]
            self.fig(name, "dicomnode", value)

    def startup_figures(self, size_label: str) -> None:
        for name in [s.name for s in self.archives()]:
            server = self.servers[name]
            secs, all_secs = [], []
            for _ in range(self.plan.repeats):
                server.stop()
                starter = start_dicomnode if name == "dicomnode" else start_orthanc
                server, elapsed = starter(server.folder, None, config=server.extra["config"])
                self.servers[name] = server
                secs.append(elapsed)
                if "all_processes_s" in server.extra:  # worker processes serving too
                    all_secs.append(server.extra["all_processes_s"])
            value = {"seconds": median(secs), "runs_s": secs}
            if all_secs:
                value["all_processes_s"] = median(all_secs)
            self.fig(f"startup_{size_label}", name, value)
            self.log(f"  startup {size_label:<5} {name:<10} {median(secs):.2f} s"
                     + (f" (all processes {median(all_secs):.2f} s)" if all_secs else ""))

    def run(self) -> dict[str, Any]:
        p = self.plan
        self.start()
        everyone = ["storescp", *[s.name for s in self.archives()]]
        # Untimed warm-up: a server's first association pays for imports, caches and
        # index creation, which is no part of a steady ingest rate.
        warm = corpus.ct_study(self.work / "warmup", min(20, p.instances), size=p.image_size, tag="WARM")
        for target in everyone:
            cstore(self.servers[target], warm.files, 1)
        self.clear_storescp()
        self.drop(warm)
        self.log(f"C-STORE of {p.instances} CT instances ({p.image_size}x{p.image_size}, 16 bit), {p.repeats} repeats")
        self.cstore_figures("cstore_1_assoc", 1, everyone)
        self.cstore_figures("cstore_4_assoc", 4, everyone)
        self.log("STOW-RS, 50 instances a request")
        self.stow_figures("stow_1_client", 1)
        self.stow_figures("stow_4_clients", 4)
        self.log("C-MOVE of a study to storescp")
        self.cmove_figures()
        self.log("WADO-RS, series metadata, rendered frame")
        self.wado_figures()
        self.log("peak RSS during big uploads")
        self.rss_figures()
        small, large = f"{p.index_small // 1000}k", f"{p.index_large // 1000}k"
        if p.index_small < 1000:
            small, large = str(p.index_small), str(p.index_large)
        self.results["index_sizes"] = {"small": p.index_small, "large": p.index_large,
                                       "labels": {"small": small, "large": large}}
        self.log(f"index at {p.index_small} instances")
        self.fill(p.index_small)
        self.query_figures(small)
        self.startup_figures(small)
        if p.index_large > p.index_small:
            self.log(f"index at {p.index_large} instances")
            self.fill(p.index_large)
            self.query_figures(large)
        self.log(f"C-STORE again with the big index ({p.index_large} instances)")
        self.cstore_figures("cstore_1_assoc_big_index", 1, everyone)
        self.startup_figures(large)
        return self.results


# ---------------------------------------------------------------- report


TARGETS = {
    "cstore_1_assoc": "dicomnode >= 1.5x Orthanc; aim 0.5x storescp",
    "cstore_4_assoc": "dicomnode >= 1.6x its 1-association figure",
    "stow_1_client": ">= 1.5x Orthanc",
    "stow_4_clients": ">= 1.5x Orthanc",
    "cstore_1_assoc_big_index": "within 20% of the figure at the small index",
    "cmove_study": "",
    "wado_study": "MB/s >= Orthanc",
    "series_metadata": "< 300 ms (1,000 instances)",
    "rendered_frame": "< 100 ms",
    "peak_rss_stow_1gb": "< 300 MB",
    "peak_rss_stream_2gb": "< 300 MB",
}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return "n/a" if value == NA else "FAILED"
    for key, fmt in (("instances_per_s", "{:.0f}/s"), ("p95_ms", "{:.1f} ms"), ("peak_rss_mb", "{:.0f} MB"),
                     ("ms", "{:.0f} ms"), ("seconds", "{:.2f} s")):
        if key in value:
            text = fmt.format(value[key])
            if key == "p95_ms":
                text = f"{value['p50_ms']:.1f}/{text} ({value['results']})"
            if key == "ms" and "mb_per_s" in value:
                text = f"{value['mb_per_s']:.0f} MB/s"
            return text
    return "?"


def _primary(value: Any) -> float | None:
    if not isinstance(value, dict):
        return None
    for key in ("instances_per_s", "mb_per_s", "p95_ms", "ms", "seconds", "peak_rss_mb"):
        if key in value:
            return float(value[key])
    return None


def ratio(figures: dict[str, Any], name: str, a: str, b: str) -> float | None:
    x, y = _primary(figures.get(name, {}).get(a)), _primary(figures.get(name, {}).get(b))
    if x is None or y is None or y == 0:
        return None
    return x / y


def table(results: dict[str, Any]) -> str:
    figures = results["figures"]
    rows = [("figure", "dicomnode", "orthanc", "storescp", "dn/orthanc", "dn/storescp", "target")]
    for name, values in figures.items():
        if name.startswith("echoscu"):
            continue
        r1, r2 = ratio(figures, name, "dicomnode", "orthanc"), ratio(figures, name, "dicomnode", "storescp")
        target = TARGETS.get(name, "p95 faster than Orthanc, < 50 ms up to 100 results" if "_" in name and
                             name.startswith(("cfind", "qido")) else "< 2 s" if name.startswith("startup") else "")
        rows.append((name, _cell(values.get("dicomnode")), _cell(values.get("orthanc")), _cell(values.get("storescp")),
                     f"{r1:.2f}" if r1 else "", f"{r2:.2f}" if r2 else "", target))
    extra = figures.get("cstore_4_assoc", {}).get("dicomnode")
    one = figures.get("cstore_1_assoc", {}).get("dicomnode")
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if isinstance(extra, dict) and isinstance(one, dict):
        lines.append(f"dicomnode 4 associations / 1 association: {extra['instances_per_s'] / one['instances_per_s']:.2f}")
    big = figures.get("cstore_1_assoc_big_index", {}).get("dicomnode")
    if isinstance(big, dict) and isinstance(one, dict):
        lines.append(f"dicomnode ingest with big index / empty index: {big['instances_per_s'] / one['instances_per_s']:.2f}")
    lines.append("C-FIND/QIDO cells: p50/p95 ms (number of results); C-FIND over one reused association.")
    lines.append("Ratios: for rates above 1 means dicomnode is faster; for ms and seconds below 1 does.")
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed (pip install '.[bench]'): no chart drawn", file=sys.stderr)
        return False
    figures = results["figures"]
    targets = ["dicomnode", "orthanc", "storescp"]
    colors = {"dicomnode": "#1f77b4", "orthanc": "#ff7f0e", "storescp": "#7f7f7f"}
    rate_names = [n for n in figures if n.startswith(("cstore", "stow", "cmove"))]
    query_names = [n for n in figures if n.startswith(("cfind", "qido"))]
    fig, axes = plt.subplots(2, 1, figsize=(13, 9))
    for ax, names, key, label in ((axes[0], rate_names, "instances_per_s", "instances/s (higher is better)"),
                                  (axes[1], query_names, "p95_ms", "p95 ms (lower is better, log)")):
        width = 0.8 / len(targets)
        for i, target in enumerate(targets):
            xs, ys = [], []
            for j, name in enumerate(names):
                v = figures[name].get(target)
                if isinstance(v, dict) and key in v:
                    xs.append(j + i * width)
                    ys.append(v[key])
            if xs:
                ax.bar(xs, ys, width, label=target, color=colors[target])
        ax.set_xticks([j + width for j in range(len(names))])
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        if key == "p95_ms":
            ax.set_yscale("log")
        ax.legend()
    fig.suptitle(f"dicomnode bench {results['meta']['started']} ({results['meta']['plan']['instances']} CT instances, "
                 f"index {results['meta']['plan']['index_small']} / {results['meta']['plan']['index_large']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run: tiny corpus, no Orthanc")
    parser.add_argument("--instances", type=int, help="CT instances per ingest run (default 500; quick 20)")
    parser.add_argument("--index-size", type=int, help="the big index size (default 200000; quick 200)")
    parser.add_argument("--index-small", type=int, help="the small index size (default 10000; quick 100)")
    parser.add_argument("--repeats", type=int, help="repeats per figure, the median is reported (default 3)")
    parser.add_argument("--orthanc", choices=("auto", "yes", "no"), default="auto",
                        help="measure Orthanc too (auto: yes unless --quick)")
    parser.add_argument("--workers", type=int,
                        help="dicomnode's [ae] and [http] workers: processes serving DIMSE and HTTP (default 4)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go (default bench/results)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temp folder, removed after)")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = build_plan(args)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    work = Path(tempfile.mkdtemp(prefix="dicomnode-bench-", dir=args.workdir))
    log = lambda text: print(text, flush=True)  # noqa: E731
    bench = Bench(plan, work, log)
    bench.results["meta"] = {
        "started": stamp, "plan": asdict(plan), "python": sys.version.split()[0], "machine": platform.platform(),
        "cpus": __import__("os").cpu_count(), "file_creation_us": {"start": file_creation_us(work)},
    }
    log(f"machine: creating a file costs {bench.results['meta']['file_creation_us']['start']:.0f} us of CPU")
    started = time.perf_counter()
    try:
        bench.run()
        status = 0
    except KeyboardInterrupt:
        bench.note("interrupted")
        status = 130
    except Exception as exc:
        bench.note(f"run stopped early: {type(exc).__name__}: {exc}")
        for server in bench.servers.values():
            bench.keep_log(server)
        status = 1
    finally:
        bench.stop()
        try:
            bench.results["meta"]["file_creation_us"]["end"] = file_creation_us(work)
        except OSError as exc:  # the run's own error matters more
            bench.note(f"file creation not measured at the end: {exc}")
        shutil.rmtree(work, ignore_errors=True)
    bench.results["meta"]["seconds"] = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{stamp}.json"
    out.write_text(json.dumps(bench.results, indent=2))
    for i, (name, text) in enumerate(bench.kept_logs):
        (args.out / f"{stamp}-{name}-{i}.log").write_bytes(text)
    print()
    print(table(bench.results))
    creation = bench.results["meta"]["file_creation_us"]
    if "end" in creation:
        print(f"\nCreating a file cost {creation['start']:.0f} us of CPU at the start of the run and "
              f"{creation['end']:.0f} us at its end (the servers create one per instance).")
    print(f"results: {out}")
    if not args.no_chart and chart(bench.results, args.out / f"{stamp}.png"):
        print(f"chart:   {args.out / f'{stamp}.png'}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
