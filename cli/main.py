"""The ``dicomnode`` command line. Exit codes: 0 success, 1 runtime failure, 2 bad usage
or bad configuration."""
from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from contextlib import closing
from pathlib import Path
from typing import Sequence

from config import ConfigError, Settings, load_settings

from .identity_commands import add_identity_commands

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep the hint short
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dicomnode",
        description="A DICOM network node (C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET) with a "
        "DICOMweb bridge over one archive.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def config_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="path of ae.toml (default: ./ae.toml if present, "
                       "else built-in defaults)")
        p.add_argument("--data", type=Path, help="archive folder (overrides [storage] path)")

    serve = sub.add_parser("serve", help="run the DIMSE node and the HTTP server until SIGINT/SIGTERM",
                           description="Run the DIMSE node and the HTTP server in one process.")
    config_arg(serve)
    serve.add_argument("--ae-port", type=int, help="DIMSE port (overrides [ae] port)")
    serve.add_argument("--http-port", type=int, help="HTTP port (overrides [http] port)")
    serve.set_defaults(func=cmd_serve)

    imp = sub.add_parser("import", help="import files, folders and .zip archives into the archive",
                         description="Import DICOM files, folders (recursive) and .zip archives "
                         "through the same ingest path as C-STORE.")
    config_arg(imp)
    imp.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    imp.add_argument("--no-progress", action="store_true", help="no progress bar")
    imp.set_defaults(func=cmd_import)

    check = sub.add_parser("check", help="validate the configuration",
                           description="Validate ae.toml; exits 2 with the reason when it is wrong.")
    config_arg(check)
    check.set_defaults(func=cmd_check)
    add_identity_commands(sub, config_arg)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, dict] = {"ae": {}, "http": {}, "storage": {}}
    if getattr(args, "data", None) is not None:
        overrides["storage"]["path"] = str(args.data)
    if getattr(args, "ae_port", None) is not None:
        overrides["ae"]["port"] = args.ae_port
    if getattr(args, "http_port", None) is not None:
        overrides["http"]["port"] = args.http_port
    return load_settings(args.config, overrides=overrides)


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from .runtime import StartupError, serve_forever

    try:
        asyncio.run(serve_forever(settings))
    except StartupError as exc:
        logging.getLogger("dicomnode").error("cannot start: %s", exc)
        return EXIT_FAILURE
    except OSError as exc:
        logging.getLogger("dicomnode").error("stopped on an operating system error: %s", exc)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_import(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from storage import Source
    from storage.importer import ImportSummary, collect, import_items

    from .runtime import StartupError, open_archive

    if not args.verbose:  # one log line per instance would bury the bar and the summary
        logging.getLogger("dicomnode.archive").setLevel(logging.WARNING)
    items = collect(args.paths)
    try:
        archive = open_archive(settings)
    except StartupError as exc:
        print(f"dicomnode: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    summary = ImportSummary()
    interrupted = False
    stop_requested = []

    def on_sigint(signum, frame) -> None:  # first Ctrl-C: finish the files in hand, then stop
        if stop_requested:
            raise KeyboardInterrupt
        stop_requested.append(signum)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        with logging_redirect_tqdm(), tqdm(
            total=sum(i.size for i in items), unit="B", unit_scale=True, unit_divisor=1024,
            desc="importing", disable=args.no_progress or None, file=sys.stderr,
        ) as bar:
            # stop: the files in hand are stored and told, no more are started
            outcomes = import_items(archive, items, Source("import", "cli"), stop=lambda: bool(stop_requested))
            with closing(outcomes):  # its threads done before the archive closes
                for outcome in outcomes:
                    summary.add(outcome)
                    bar.update(outcome.size)
                    bar.set_postfix(stored=summary.stored, duplicate=summary.duplicate,
                                    rejected=summary.rejected, failed=summary.failed)
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once (a store cut short is undone)
        pass
    finally:
        signal.signal(signal.SIGINT, previous)
        interrupted = bool(stop_requested)
        archive.close()
    failed = f"  failed: {summary.failed}" if summary.failed else ""
    print(f"stored: {summary.stored}  duplicate: {summary.duplicate}  rejected: {summary.rejected}{failed}")
    for outcome in summary.rejections:
        print(f"rejected {outcome.name}: {outcome.reason}")
    for outcome in summary.failures:
        print(f"failed {outcome.name}: {outcome.reason}")
    if interrupted:
        print(f"interrupted: {len(items) - summary.done} of {len(items)} file(s) not imported")
        return EXIT_FAILURE
    return EXIT_FAILURE if summary.rejected or summary.failed else EXIT_OK


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    print(f"configuration OK ({settings.source}): AE {settings.ae.title} on {settings.ae.host}:"
          f"{settings.ae.port}, HTTP on {settings.http.host}:{settings.http.port}, archive "
          f"{settings.storage.path}, {len(settings.peers)} peer(s)")
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    try:
        settings = settings_from_args(args)
    except ConfigError as exc:
        print(f"dicomnode: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        return args.func(args, settings)
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
