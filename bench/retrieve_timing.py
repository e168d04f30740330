"""Time C-MOVE (movescu -> dicomnode -> dcmtk storescp) and C-GET (getscu) of one CT
study, for comparing checkouts back to back. Not a test.

    python -m bench.retrieve_timing [--instances 500] [--runs 5] [--repo PATH ...]
        [--no-get] [--orthanc] [--storescu] [--profile OUT.raw]

Each ``--repo`` is a checkout of dicomnode (default: this one); each gets the same
corpus, imported before the node starts, and is timed in turn, round by round, so that
other load on the machine hits every checkout alike (``--orthanc`` and ``--storescu``
add Orthanc and storescu -> storescp to each round). Figures are medians of wall time,
with the node's CPU time (all threads) per instance, which load disturbs less."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .corpus import ct_study
from .measure import cmove, cstore, study_retrieve
from .servers import (
    REPO, Server, start_dicomnode, start_orthanc, start_storescp, write_dicomnode_config, write_orthanc_config,
)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all threads) so far."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def attempt(measure, *args) -> float | None:
    """Seconds, or None when the run failed (reported, not fatal: pynetdicom's own
    requestor association can lose a C-STORE response to its reactor thread under load)."""
    try:
        return measure(*args)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"  a run failed: {str(exc)[:160]}", flush=True)
        return None


def summary(instances: int, secs: list[float | None]) -> str:
    done = [s for s in secs if s is not None]
    rate = f"{instances / statistics.median(done):7.0f} inst/s" if done else "failed"
    runs = ", ".join("failed" if s is None else f"{s:.2f}" for s in secs)
    return f"{rate} (runs {runs} s"


def import_corpus(repo: Path, config: Path, files: list[Path]) -> None:
    subprocess.run([sys.executable, "-m", "cli.main", "import", "--config", str(config), "--no-progress",
                    str(files[0].parent)], cwd=config.parent, check=True, capture_output=True,
                   env={"PYTHONPATH": str(repo), "PATH": "/usr/bin:/bin"})


def cget(server: Server, study_uid: str, out: Path, timeout: float = 900) -> float:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return study_retrieve(server, "getscu", study_uid, ["-od", str(out)], timeout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=500)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--repo", type=Path, action="append", help="a dicomnode checkout (repeatable)")
    parser.add_argument("--no-get", action="store_true", help="C-MOVE only")
    parser.add_argument("--orthanc", action="store_true", help="also time Orthanc (C-MOVE) the same way")
    parser.add_argument("--storescu", action="store_true", help="also time storescu -> storescp (the ceiling)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--profile", type=Path, help="py-spy raw profile of the first node's C-GETs (C-MOVEs with --no-get) to this file")
    args = parser.parse_args(argv)
    repos = [r.resolve() for r in (args.repo or [REPO])]
    work = Path(tempfile.mkdtemp(prefix="retrieve-timing-"))
    servers: list[Server] = []
    try:
        written = ct_study(work / "corpus", args.instances)
        study_uid = written.study_uids[0]
        storescp = start_storescp(work / "received")
        servers.append(storescp)
        nodes = []
        for n, repo in enumerate(repos):
            folder = work / f"node{n}"
            config = write_dicomnode_config(folder, storescp)
            import_corpus(repo, config[0], written.files)
            node, _ = start_dicomnode(folder, storescp, config=config, repo=repo, name=f"node{n}")
            servers.append(node)
            nodes.append((repo, node))
        others: dict[str, list[float]] = {}
        if args.orthanc:
            config = write_orthanc_config(work / "orthanc", storescp)
            settings = json.loads(config[0].read_text())
            settings["DicomAlwaysAllowGet"] = True  # for getscu
            config[0].write_text(json.dumps(settings))
            orthanc, _ = start_orthanc(work / "orthanc", storescp, config=config)
            servers.append(orthanc)
            cstore(orthanc, written.files, 1)
            others["orthanc C-MOVE"] = []
            if not args.no_get:
                others["orthanc C-GET"] = []
        if args.storescu:
            others["storescu->storescp"] = []
        if args.profile:
            spy = subprocess.Popen(["py-spy", "record", "-f", "raw", "-r", "500", "-o", str(args.profile), "--threads",
                                    "--pid", str(nodes[0][1].pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(2)
            for _ in range(args.runs):
                if args.no_get:
                    cmove(nodes[0][1], storescp, study_uid)
                else:
                    cget(nodes[0][1], study_uid, work / "got")
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
            return 0
        moves: dict[Path, list[float]] = {repo: [] for repo in repos}
        gets: dict[Path, list[float]] = {repo: [] for repo in repos}
        move_cpu: dict[Path, float] = {repo: 0.0 for repo in repos}
        get_cpu: dict[Path, float] = {repo: 0.0 for repo in repos}
        for _ in range(args.runs):
            for repo, node in nodes:
                before = cpu_s(node.pid)
                moves[repo].append(attempt(cmove, node, storescp, study_uid))
                move_cpu[repo] += cpu_s(node.pid) - before
                if not args.no_get:
                    before = cpu_s(node.pid)
                    gets[repo].append(attempt(cget, node, study_uid, work / "got"))
                    get_cpu[repo] += cpu_s(node.pid) - before
            if args.orthanc:
                others["orthanc C-MOVE"].append(attempt(cmove, orthanc, storescp, study_uid))
                if not args.no_get:
                    others["orthanc C-GET"].append(attempt(cget, orthanc, study_uid, work / "got"))
            if args.storescu:
                others["storescu->storescp"].append(attempt(cstore, storescp, written.files, 1))
        for repo in repos:
            line = f"{repo}: C-MOVE {summary(args.instances, moves[repo])}"
            line += f", node CPU {1000 * move_cpu[repo] / (args.runs * args.instances):.2f} ms/instance)"
            if gets[repo]:
                line += f"; C-GET {summary(args.instances, gets[repo])}"
                line += f", node CPU {1000 * get_cpu[repo] / (args.runs * args.instances):.2f} ms/instance)"
            print(line, flush=True)
        for name, secs in others.items():
            print(f"{name}: {summary(args.instances, secs)})", flush=True)
    finally:
        for server in servers:
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
