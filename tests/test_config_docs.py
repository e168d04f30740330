"""Documentation kept honest (in the style of Datasette's test_docs.py): every ae.toml key
is in the repository's ae.toml and README, every command is in the README, and every
command's --help works and lists its options."""
from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from cli.main import build_parser
from config.settings import _SECTIONS, Peer
from tests.conftest import REPO, run_cli

README = (REPO / "README.md").read_text(encoding="utf-8")
AE_TOML = (REPO / "ae.toml").read_text(encoding="utf-8")

SETTING_KEYS = [
    (section, f.name) for section, cls in _SECTIONS.items() for f in dataclasses.fields(cls)
] + [("peers", f.name) for f in dataclasses.fields(Peer)]


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


SUBCOMMANDS = _subcommands()


def _toml_keys_by_section(text: str) -> dict[str, set[str]]:
    """Keys per section, commented-out examples included (``# secret = ...``)."""
    keys: dict[str, set[str]] = {}
    section = ""
    for line in text.splitlines():
        header = re.match(r"^\s*#?\s*\[\[?([A-Za-z_]+)\]\]?", line)
        if header:
            section = header.group(1)
            continue
        key = re.match(r"^\s*#?\s*([A-Za-z_]+)\s*=", line)
        if key:
            keys.setdefault(section, set()).add(key.group(1))
    return keys


@pytest.mark.parametrize(("section", "key"), SETTING_KEYS, ids=[f"{s}.{k}" for s, k in SETTING_KEYS])
def test_every_setting_is_in_the_repository_ae_toml(section, key):
    assert key in _toml_keys_by_section(AE_TOML).get(section, set()), f"[{section}] {key} is not in ae.toml"


@pytest.mark.parametrize(("section", "key"), SETTING_KEYS, ids=[f"{s}.{k}" for s, k in SETTING_KEYS])
def test_every_setting_is_in_the_readme(section, key):
    assert f"`{section}.{key}`" in README, f"{section}.{key} is not documented in README.md"


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_command_is_in_the_readme(command):
    assert f"dicomnode {command}" in README


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_command_has_help_listing_its_options(command, tmp_path):
    proc = run_cli(command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for action in SUBCOMMANDS[command]._actions:
        for option in action.option_strings:
            assert option in proc.stdout, f"{option} missing from dicomnode {command} --help"
        if not action.option_strings:
            assert (action.metavar or action.dest) in proc.stdout


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_option_of_every_command_is_in_the_readme(command):
    for action in SUBCOMMANDS[command]._actions:
        for option in action.option_strings:
            if option.startswith("--") and option != "--help":
                assert option in README, f"dicomnode {command} {option} is not in README.md"


def test_top_level_help_lists_every_command(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in SUBCOMMANDS:
        assert command in proc.stdout


def test_no_command_is_bad_usage(tmp_path):
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2
    assert "COMMAND" in proc.stderr


def test_an_unknown_command_is_bad_usage(tmp_path):
    proc = run_cli("serv", cwd=tmp_path)
    assert proc.returncode == 2
