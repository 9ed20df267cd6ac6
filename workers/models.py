"""Which models may be loaded: the allowlist in `Settings.models`, and the load arguments it grants."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from eigenshift_core.errors import InputError
from workers.settings import AllowedModel, Settings


@dataclass(frozen=True)
class ModelGrant:
    """What loading an allowed model may use: its name as asked, the pinned revision, remote code or not."""

    model_id: str
    revision: str | None = None
    trust_remote_code: bool = False


def allowed_names(settings: Settings) -> list[str]:
    """The allowlist as people read it in an error message."""
    return [entry.id if entry.id is not None else f"{entry.root}/*" for entry in settings.models]


def _matches(entry: AllowedModel, name: str) -> bool:
    if entry.id is not None:
        return name == entry.id
    assert entry.root is not None
    if not name.startswith("/") or "\x00" in name:
        return False
    path = Path(name).resolve()  # links and `..` resolved first, so nothing escapes the root
    return path.is_relative_to(entry.root.resolve()) and path.is_dir()


def grant_model(settings: Settings, name: str, *, field: str = "model") -> ModelGrant:
    """The grant for `name`, or a 422 naming `field` when no allowlist entry covers it.

    The model the API serves (`settings.model`) is the operator's own choice and always loads, without
    remote code unless an entry grants it.
    """
    for entry in settings.models:
        if _matches(entry, name):
            return ModelGrant(name, entry.revision, entry.trust_remote_code)
    if name == settings.model:
        return ModelGrant(name)
    raise InputError(f"model {name!r} is not allowed here; allowed: {', '.join(allowed_names(settings))}", field=field)
