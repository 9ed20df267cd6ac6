"""Which scorers requests may name: the allowlist in `Settings.scorers`, like `workers.models` for models.

A spec names a local file or a hub repository to load, so an open one would read any file the service can
(`detoxify:/etc/passwd`) or download any hub model: only exact entries and paths under an allowed root pass.
"""

from __future__ import annotations

from pathlib import Path

from eigenshift_core.errors import InputError
from workers.settings import AllowedScorer, Settings

PATH_PREFIXES = ("hf", "detoxify")  # the scorers whose argument may be a local path under a root


def allowed_scorer_names(settings: Settings) -> list[str]:
    """The allowlist as people read it in an error message."""
    return [entry.spec if entry.spec is not None else f"hf|detoxify:{entry.root}/*" for entry in settings.scorers]


def _matches(entry: AllowedScorer, spec: str) -> bool:
    if entry.spec is not None:
        return spec == entry.spec
    assert entry.root is not None
    prefix, _, argument = spec.partition(":")
    argument = argument.strip()
    if prefix not in PATH_PREFIXES or not argument.startswith("/") or "\x00" in argument:
        return False
    path = Path(argument).resolve()  # links and `..` resolved first, so nothing escapes the root
    return path.is_relative_to(entry.root.resolve()) and path.exists()


def grant_scorer(settings: Settings, spec: str, *, field: str = "scorer") -> str:
    """`spec` when the allowlist covers it, else a 422 naming `field`. The operator's own choices (`scorer`,
    `moderation_scorers`) always pass."""
    if spec == settings.scorer or spec in settings.moderation_scorers:
        return spec
    if any(_matches(entry, spec) for entry in settings.scorers):
        return spec
    raise InputError(f"scorer {spec!r} is not allowed here; allowed: {', '.join(allowed_scorer_names(settings))}",
                     field=field)
