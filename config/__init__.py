"""Configuration: ``ae.toml`` (plus CLI flags and ``DICOMNODE_*`` variables) -> typed settings."""
from .settings import (
    AESettings,
    AuthSettings,
    CallbackSettings,
    ConfigError,
    HTTPSettings,
    InboxSettings,
    Peer,
    Settings,
    StorageSettings,
    load_settings,
    settings_from_mapping,
)

__all__ = [
    "AESettings", "AuthSettings", "CallbackSettings", "ConfigError", "HTTPSettings",
    "InboxSettings", "Peer", "Settings", "StorageSettings", "load_settings",
    "settings_from_mapping",
]
