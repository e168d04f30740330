"""Typed settings built once from ``ae.toml``, CLI flags and ``DICOMNODE_*`` variables.

Every part of dicomnode receives a frozen :class:`Settings`; nothing passes dicts around.
A bad key or value raises :class:`ConfigError` naming the key and the fix.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

DEFAULT_CONFIG_NAME = "ae.toml"
_AE_TITLE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_UID_ROOT_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and what to do."""


@dataclass(frozen=True)
class Peer:
    """A remote AE we may C-MOVE to and that may associate with us."""

    ae_title: str
    host: str
    port: int
    organization: str = "local"


@dataclass(frozen=True)
class AESettings:
    title: str = "DICOMNODE"
    uid_root: str = "2.25"
    host: str = "127.0.0.1"
    port: int = 11112
    max_associations: int = 16
    workers: int = 1  # processes accepting associations on the port (cli/workers.py)
    require_known_peers: bool = False
    require_called_ae_title: bool = True
    max_pdu_size: int = 0  # 0 = unlimited, pynetdicom's meaning
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0


@dataclass(frozen=True)
class HTTPSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    cors_origins: tuple[str, ...] = ()
    max_request_mb: int = 4096
    workers: int = 1  # processes serving HTTP on the port (cli/workers.py)


@dataclass(frozen=True)
class StorageSettings:
    path: Path = Path("./data")
    stable_after_s: float = 300.0


@dataclass(frozen=True)
class InboxSettings:
    path: Path | None = None
    settle_s: float = 2.0  # a file unchanged this long is taken as completely written


@dataclass(frozen=True)
class AuthSettings:
    required: bool = True
    secret: str | None = dataclasses.field(default=None, repr=False)


@dataclass(frozen=True)
class CallbackSettings:
    urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class Settings:
    ae: AESettings = field(default_factory=AESettings)
    http: HTTPSettings = field(default_factory=HTTPSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    inbox: InboxSettings = field(default_factory=InboxSettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    callbacks: CallbackSettings = field(default_factory=CallbackSettings)
    peers: tuple[Peer, ...] = ()
    source: str = "built-in defaults"

    def peer(self, ae_title: str) -> Peer | None:
        """The configured peer with this AE title, or None."""
        wanted = ae_title.strip()
        for peer in self.peers:
            if peer.ae_title == wanted:
                return peer
        return None


# --------------------------------------------------------------------------- parsing

_SECTIONS = {
    "ae": AESettings,
    "http": HTTPSettings,
    "storage": StorageSettings,
    "inbox": InboxSettings,
    "auth": AuthSettings,
    "callbacks": CallbackSettings,
}


def _check_type(key: str, value: Any, expected: type) -> Any:
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, not {value!r}")
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, not {value!r}")
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, not {value!r}")
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, not {value!r}")
        return value
    return value


def _field_types(cls: type) -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


def _coerce(section: str, cls: type, raw: Mapping[str, Any]) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"[{section}] must be a table")
    types = _field_types(cls)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{section}.{key}"
        if key not in types:
            known = ", ".join(sorted(types))
            raise ConfigError(f"unknown key {full}; known keys of [{section}]: {known}")
        ftype = types[key]
        if ftype == "bool":
            values[key] = _check_type(full, value, bool)
        elif ftype == "int":
            values[key] = _check_type(full, value, int)
        elif ftype == "float":
            values[key] = _check_type(full, value, float)
        elif ftype == "str":
            values[key] = _check_type(full, value, str)
        elif ftype == "str | None":
            values[key] = None if value in (None, "") else _check_type(full, value, str)
        elif ftype == "Path":
            text = _check_type(full, value, str)
            if not text.strip():
                raise ConfigError(f"{full} must not be empty: give a folder such as \"./data\"")
            values[key] = Path(text)
        elif ftype == "Path | None":
            text = _check_type(full, value, str)
            values[key] = Path(text) if text else None
        elif ftype == "tuple[str, ...]":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{full} must be a list of strings")
            values[key] = tuple(value)
        else:  # pragma: no cover - every field type is listed above
            raise ConfigError(f"{full}: unsupported type {ftype}")
    return cls(**values)


def _validate_ae_title(key: str, title: str) -> str:
    if not _AE_TITLE_RE.match(title) or not title.strip():
        raise ConfigError(
            f"{key} = {title!r} is not a valid AE title: use 1 to 16 printable ASCII "
            "characters, no backslash"
        )
    return title.strip()


def _validate_port(key: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ConfigError(f"{key} = {port} is not a TCP port (0-65535; 0 picks a free one)")


def _parse_peers(raw: Any) -> tuple[Peer, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("[[peers]] must be an array of tables")
    peers = []
    seen = set()
    for i, item in enumerate(raw):
        key = f"peers[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{key} must be a table")
        unknown = set(item) - {"ae_title", "host", "port", "organization"}
        if unknown:
            raise ConfigError(
                f"unknown key {key}.{sorted(unknown)[0]}; peers take ae_title, host, port, "
                "organization"
            )
        for required in ("ae_title", "host", "port"):
            if required not in item:
                raise ConfigError(f"{key}.{required} is missing")
        title = _validate_ae_title(f"{key}.ae_title", _check_type(f"{key}.ae_title", item["ae_title"], str))
        host = _check_type(f"{key}.host", item["host"], str)
        if not _looks_like_host(host):
            raise ConfigError(f"{key}.host = {host!r} is not an IP address or host name")
        port = _check_type(f"{key}.port", item["port"], int)
        _validate_port(f"{key}.port", port)
        if port == 0:
            raise ConfigError(f"{key}.port must be the peer's listening port, not 0")
        org = _check_type(f"{key}.organization", item.get("organization", "local"), str)
        if title in seen:
            raise ConfigError(f"{key}.ae_title {title!r} is listed twice in [[peers]]")
        seen.add(title)
        peers.append(Peer(ae_title=title, host=host, port=port, organization=org))
    return tuple(peers)


def settings_from_mapping(data: Mapping[str, Any], source: str = "mapping") -> Settings:
    """Build validated settings from a parsed TOML document."""
    unknown = set(data) - set(_SECTIONS) - {"peers"}
    if unknown:
        raise ConfigError(
            f"unknown section [{sorted(unknown)[0]}]; known sections: "
            + ", ".join(sorted([*_SECTIONS, "peers"]))
        )
    parts = {name: _coerce(name, cls, data.get(name, {})) for name, cls in _SECTIONS.items()}
    settings = Settings(**parts, peers=_parse_peers(data.get("peers")), source=source)
    return validate(settings)


def validate(settings: Settings) -> Settings:
    ae = settings.ae
    _validate_ae_title("ae.title", ae.title)
    if ae.title != settings.ae.title:
        settings = dataclasses.replace(settings, ae=dataclasses.replace(ae, title=ae.title.strip()))
    if not _UID_ROOT_RE.match(ae.uid_root) or len(ae.uid_root) > 40:
        raise ConfigError(
            f"ae.uid_root = {ae.uid_root!r} is not a UID root: use dotted digits such as "
            "\"2.25\" (no leading zeros, at most 40 characters)"
        )
    _validate_port("ae.port", ae.port)
    _validate_port("http.port", settings.http.port)
    if ae.max_associations < 1:
        raise ConfigError("ae.max_associations must be at least 1")
    for key, workers, what in (("ae.workers", ae.workers, "accept DIMSE associations"),
                               ("http.workers", settings.http.workers, "serve HTTP requests")):
        if not 1 <= workers <= 64:
            raise ConfigError(
                f"{key} = {workers} must be between 1 and 64: the number of processes that {what} "
                "(1 = the serving process alone)"
            )
    for key, host in (("ae.host", ae.host), ("http.host", settings.http.host)):
        if host not in ("localhost", "") and not _looks_like_host(host):
            raise ConfigError(f"{key} = {host!r} is not an IP address or host name")
    for name in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
        if getattr(ae, name) <= 0:
            raise ConfigError(f"ae.{name} must be a positive number of seconds")
    if ae.max_pdu_size < 0:
        raise ConfigError("ae.max_pdu_size must be 0 (unlimited) or a number of bytes")
    if settings.inbox.path is not None:
        inbox, archive = settings.inbox.path.resolve(), settings.storage.path.resolve()
        if inbox == archive or inbox.is_relative_to(archive) or archive.is_relative_to(inbox):
            # the inbox deletes what it imports: it must never see the archive's own files
            raise ConfigError(
                f"inbox.path = {str(settings.inbox.path)!r} overlaps storage.path = "
                f"{str(settings.storage.path)!r}: the inbox removes the files it takes, so it must "
                "be a folder outside the archive (and the archive outside it)"
            )
    if settings.inbox.settle_s <= 0:
        raise ConfigError("inbox.settle_s must be a positive number of seconds")
    if settings.storage.stable_after_s <= 0:
        raise ConfigError("storage.stable_after_s must be a positive number of seconds")
    if settings.http.max_request_mb < 1:
        raise ConfigError("http.max_request_mb must be at least 1")
    for url in settings.callbacks.urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"callbacks.urls entry {url!r} must start with http:// or https://")
    return settings


def _looks_like_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$", host))


def load_settings(
    path: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Settings:
    """Read ``ae.toml`` (``path``, else ``./ae.toml`` if present, else defaults), apply
    ``DICOMNODE_SECTION_KEY`` environment variables, then ``overrides`` (CLI flags)."""
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    source = "built-in defaults"
    if path is None:
        candidate = (cwd or Path.cwd()) / DEFAULT_CONFIG_NAME
        if candidate.is_file():
            path = candidate
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"configuration file {p} does not exist: pass --config with the path of ae.toml")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
        source = str(p)
    data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    _apply_environment(data, environ)
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    return settings_from_mapping(data, source=source)


def _apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    """``DICOMNODE_AE_PORT=11113`` sets ``[ae] port``; ``CALLBACK_URLS`` sets callbacks."""
    for name, text in environ.items():
        if name == "CALLBACK_URLS":
            data.setdefault("callbacks", {})["urls"] = [u.strip() for u in text.split(",") if u.strip()]
            continue
        if not name.startswith("DICOMNODE_"):
            continue
        rest = name[len("DICOMNODE_"):].lower()
        for section, cls in _SECTIONS.items():
            if rest.startswith(section + "_"):
                key = rest[len(section) + 1:]
                types = _field_types(cls)
                if key not in types:
                    raise ConfigError(
                        f"unknown environment variable {name}: [{section}] has no key {key!r}; "
                        f"known keys: {', '.join(sorted(types))}"
                    )
                data.setdefault(section, {})[key] = _parse_env_value(name, text, types[key])
                break


def _parse_env_value(name: str, text: str, ftype: str) -> Any:
    if ftype == "bool":
        lowered = text.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={text!r} must be true or false")
    if ftype == "int":
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r} must be an integer") from None
    if ftype == "float":
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r} must be a number") from None
    if ftype == "tuple[str, ...]":
        return [v.strip() for v in text.split(",") if v.strip()]
    return text
