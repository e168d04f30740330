"""Configuration: ``dicomnode check``, environment and flag overrides, and bad input
rejected with exit code 2 and a message naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from config import ConfigError, Settings, load_settings
from tests.conftest import REPO, run_cli
from tests.support import serve, write_toml  # noqa: F401 (fixture)


def check(tmp_path: Path, toml: str | None = None, *args: str, env: dict | None = None):
    extra = []
    if toml is not None:
        extra = ["--config", str(write_toml(tmp_path / "ae.toml", toml))]
    return run_cli("check", *extra, *args, cwd=tmp_path, env=env or {})


def test_check_accepts_the_repository_ae_toml(tmp_path):
    proc = run_cli("check", "--config", str(REPO / "ae.toml"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "configuration OK" in proc.stdout
    assert "AE DICOMNODE on 127.0.0.1:11112" in proc.stdout


def test_check_without_a_file_uses_the_built_in_defaults(tmp_path):
    proc = run_cli("check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "built-in defaults" in proc.stdout


def test_check_reads_ae_toml_from_the_current_folder(tmp_path):
    write_toml(tmp_path / "ae.toml", '[ae]\ntitle = "ARCHIVE1"\nport = 104\n')
    proc = run_cli("check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "AE ARCHIVE1 on 127.0.0.1:104" in proc.stdout


def test_check_accepts_a_file_with_peers(tmp_path):
    proc = check(tmp_path, """
[ae]
require_known_peers = true
[[peers]]
ae_title = "VIEWER"
host = "127.0.0.1"
port = 11113
[[peers]]
ae_title = "PACS"
host = "pacs.hospital.example"
port = 104
organization = "radiology"
""")
    assert proc.returncode == 0, proc.stderr
    assert "2 peer(s)" in proc.stdout


BAD = {
    "unknown key": ('[ae]\ntitel = "X"\n', "ae.titel"),
    "unknown section": ('[dimse]\nport = 104\n', "[dimse]"),
    "wrong type (string for a port)": ('[ae]\nport = "11112"\n', "ae.port"),
    "wrong type (number for a flag)": ('[ae]\nrequire_known_peers = 1\n', "ae.require_known_peers"),
    "wrong type (string for a list)": ('[http]\ncors_origins = 3\n', "http.cors_origins"),
    "AE title too long": ('[ae]\ntitle = "SEVENTEEN_CHARSXX"\n', "ae.title"),
    "AE title with a backslash": ('[ae]\ntitle = "A\\\\B"\n', "ae.title"),
    "blank AE title": ('[ae]\ntitle = "   "\n', "ae.title"),
    "uid_root with letters": ('[ae]\nuid_root = "2.25.abc"\n', "ae.uid_root"),
    "uid_root with a leading zero": ('[ae]\nuid_root = "1.02"\n', "ae.uid_root"),
    "uid_root ending in a dot": ('[ae]\nuid_root = "2.25."\n', "ae.uid_root"),
    "port too large": ('[ae]\nport = 70000\n', "ae.port"),
    "negative HTTP port": ('[http]\nport = -1\n', "http.port"),
    "no associations allowed": ('[ae]\nmax_associations = 0\n', "ae.max_associations"),
    "negative timeout": ('[ae]\ndimse_timeout_s = -5\n', "ae.dimse_timeout_s"),
    "zero stable time": ('[storage]\nstable_after_s = 0\n', "storage.stable_after_s"),
    "empty storage path": ('[storage]\npath = ""\n', "storage.path"),
    "inbox inside the archive": ('[storage]\npath = "data"\n[inbox]\npath = "data/incoming"\n', "inbox.path"),
    "inbox is the archive": ('[storage]\npath = "data"\n[inbox]\npath = "./data"\n', "inbox.path"),
    "archive inside the inbox": ('[storage]\npath = "in/data"\n[inbox]\npath = "in"\n', "inbox.path"),
    "zero inbox settle time": ('[inbox]\npath = "in"\nsettle_s = 0\n', "inbox.settle_s"),
    "bad host": ('[ae]\nhost = "not a host"\n', "ae.host"),
    "callback not http": ('[callbacks]\nurls = ["ftp://x"]\n', "callbacks.urls"),
    "duplicate peer": (
        '[[peers]]\nae_title = "VIEWER"\nhost = "a"\nport = 1\n'
        '[[peers]]\nae_title = "VIEWER"\nhost = "b"\nport = 2\n', "peers[1].ae_title"),
    "peer without a port": ('[[peers]]\nae_title = "VIEWER"\nhost = "a"\n', "peers[0].port"),
    "peer with an unknown key": ('[[peers]]\nae_title = "V"\nhost = "a"\nport = 1\naddress = "x"\n',
                                "peers[0].address"),
    "peer with a bad AE title": ('[[peers]]\nae_title = ""\nhost = "a"\nport = 1\n', "peers[0].ae_title"),
    "peer with a bad host": ('[[peers]]\nae_title = "V"\nhost = "bad host"\nport = 1\n', "peers[0].host"),
    "peer port out of range": ('[[peers]]\nae_title = "V"\nhost = "a"\nport = 65536\n', "peers[0].port"),
    "not TOML": ('[ae\ntitle = "X"\n', "not valid TOML"),
}


@pytest.mark.parametrize(("toml", "named"), list(BAD.values()), ids=list(BAD))
def test_check_rejects_bad_configuration_with_exit_2_naming_the_key(tmp_path, toml, named):
    proc = check(tmp_path, toml)
    assert proc.returncode == 2, proc.stdout
    assert named in proc.stderr
    assert "configuration error" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_check_of_a_missing_file_exits_2_naming_it(tmp_path):
    proc = run_cli("check", "--config", str(tmp_path / "nowhere.toml"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "nowhere.toml" in proc.stderr and "does not exist" in proc.stderr


def test_environment_overrides_the_file(tmp_path):
    proc = check(tmp_path, "[ae]\nport = 11112\n", env={"DICOMNODE_AE_PORT": "11199"})
    assert proc.returncode == 0, proc.stderr
    assert "127.0.0.1:11199" in proc.stdout


def test_environment_sets_a_flag_and_a_list(tmp_path):
    settings = load_settings(None, environ={"DICOMNODE_AE_REQUIRE_KNOWN_PEERS": "yes",
                                            "DICOMNODE_HTTP_CORS_ORIGINS": "https://a.example, https://b.example"},
                             cwd=tmp_path)
    assert settings.ae.require_known_peers is True
    assert settings.http.cors_origins == ("https://a.example", "https://b.example")


def test_a_bad_environment_value_exits_2_naming_the_variable(tmp_path):
    proc = check(tmp_path, None, env={"DICOMNODE_AE_PORT": "eleven"})
    assert proc.returncode == 2
    assert "DICOMNODE_AE_PORT" in proc.stderr


def test_a_misspelt_environment_variable_exits_2_naming_it(tmp_path):
    proc = check(tmp_path, None, env={"DICOMNODE_AE_PROT": "104"})
    assert proc.returncode == 2
    assert "DICOMNODE_AE_PROT" in proc.stderr


def test_flags_override_the_environment_and_the_file(tmp_path):
    config = write_toml(tmp_path / "ae.toml", '[ae]\nport = 104\n[storage]\npath = "/srv/file"\n')
    settings = load_settings(config, overrides={"ae": {"port": 4242}, "storage": {"path": "/srv/flag"}},
                             environ={"DICOMNODE_AE_PORT": "11199", "DICOMNODE_STORAGE_PATH": "/srv/env"})
    assert settings.ae.port == 4242
    assert settings.storage.path == Path("/srv/flag")


def test_the_data_flag_overrides_the_storage_path(tmp_path):
    proc = run_cli("check", "--data", str(tmp_path / "archive"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"archive {tmp_path / 'archive'}" in proc.stdout


def test_a_bad_flag_value_exits_2(tmp_path):
    proc = run_cli("serve", "--ae-port", "70000", "--data", str(tmp_path / "d"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "ae.port" in proc.stderr


def test_the_repository_ae_toml_holds_the_built_in_defaults():
    assert load_settings(REPO / "ae.toml", environ={}) == Settings(source=str(REPO / "ae.toml"))


def test_settings_are_frozen():
    settings = Settings()
    with pytest.raises(AttributeError):
        settings.ae.port = 1  # type: ignore[misc]


def test_config_error_names_the_key_in_python_too(tmp_path):
    with pytest.raises(ConfigError, match=r"ae\.port"):
        load_settings(write_toml(tmp_path / "x.toml", "[ae]\nport = 99999\n"), environ={})


def test_serve_listens_on_the_port_from_the_environment(serve):
    from tests.conftest import free_port

    ae_port, http_port = free_port(), free_port()
    node = serve(None, toml=f"[ae]\nport = 104\n[http]\nport = {http_port}\n", port_flags=False,
                 ae_port=ae_port, http_port=http_port, env={"DICOMNODE_AE_PORT": str(ae_port)})
    assert f"AE DICOMNODE on 127.0.0.1:{ae_port}" in node.log()


def test_serve_flags_win_over_the_environment_and_the_file(serve):
    from tests.conftest import free_port

    flag_port = free_port()
    node = serve(None, toml="[ae]\nport = 104\n", ae_port=flag_port, env={"DICOMNODE_AE_PORT": "105"})
    assert f"AE DICOMNODE on 127.0.0.1:{flag_port}" in node.log()
