"""Reading pdserve's settings from a Ray Serve config: each application's ``args`` validated into
``PDServeSettings`` (settings.py), with errors that name each offending field."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .settings import PDServeSettings


class SettingsError(ValueError):
    """Invalid settings, with a message that names each offending field."""


OVERRIDES_KEY = "overrides"  # args key: settings merged over the rest (the Helm chart's whole `settings` value)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def parse_settings(args: dict) -> PDServeSettings:
    """Validate a Serve config's ``args``; an ``overrides`` mapping in them is deep-merged over the rest first."""
    args = dict(args or {})
    overrides = args.pop(OVERRIDES_KEY, None) or {}
    if not isinstance(overrides, dict):
        raise SettingsError(f"invalid pdserve settings:\n  {OVERRIDES_KEY}: must be a mapping of settings")
    args = _deep_merge(args, overrides)
    try:
        return PDServeSettings.model_validate(args)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(settings)"
            lines.append(f"  {where}: {err['msg']}")
        raise SettingsError("invalid pdserve settings:\n" + "\n".join(lines)) from None


class ServeApp(BaseModel):
    """The part of a Ray Serve config that pdserve reads: one application's name, prefix and args."""

    model_config = ConfigDict(extra="allow")
    name: str = Field("pdserve", description="Serve application name.")
    route_prefix: str = Field("/", description="URL prefix of the application.")
    import_path: str = Field("deployments.app:build_app", description="Application builder.")
    args: dict = Field(default_factory=dict, description="PDServeSettings fields.")


def load_serve_config(path: str | Path) -> list[tuple[ServeApp, PDServeSettings]]:
    """Read a Serve config YAML and validate each application's args into settings."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    apps = [ServeApp.model_validate(a) for a in doc.get("applications", [])]
    if not apps:
        raise SettingsError(f"{path}: no 'applications' in this Serve config")
    out = []
    for app in apps:
        try:
            out.append((app, parse_settings(app.args)))
        except SettingsError as exc:
            raise SettingsError(f"{path}: application '{app.name}': {exc}") from None
    return out
