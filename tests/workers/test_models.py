"""The model allowlist: what may load, from where, and with remote code only where an entry grants it."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from eigenshift_core.errors import InputError
from workers import runner
from workers.models import ModelGrant, grant_model
from workers.settings import AllowedModel, Settings


def settings_with(models: list[object], tmp_path: Path, served: str = "embedded") -> Settings:
    return Settings(models=models, model=served, data_dir=tmp_path)  # type: ignore[arg-type]


def test_plain_strings_are_ids_or_absolute_roots() -> None:
    assert AllowedModel.model_validate("org/name") == AllowedModel(id="org/name")
    assert AllowedModel.model_validate("/models") == AllowedModel(root=Path("/models"))
    with pytest.raises(ValidationError):
        AllowedModel(id="a", root=Path("/b"))
    with pytest.raises(ValidationError):
        AllowedModel.model_validate({"root": "relative/dir"})


def test_only_listed_ids_load_and_remote_code_only_where_granted(tmp_path: Path) -> None:
    settings = settings_with(["embedded", {"id": "org/custom", "trust_remote_code": True, "revision": "abc123"}],
                             tmp_path)
    assert grant_model(settings, "embedded") == ModelGrant("embedded")
    assert grant_model(settings, "org/custom") == ModelGrant("org/custom", "abc123", True)
    with pytest.raises(InputError) as refused:
        grant_model(settings, "org/other")
    assert refused.value.field == "model" and "org/custom" in str(refused.value)


def test_served_model_always_loads_but_never_with_remote_code(tmp_path: Path) -> None:
    settings = settings_with([], tmp_path, served="org/served")
    assert grant_model(settings, "org/served") == ModelGrant("org/served", None, False)
    with pytest.raises(InputError):
        grant_model(settings, "embedded")


def test_directories_load_only_inside_a_root(tmp_path: Path) -> None:
    root, outside = tmp_path / "models", tmp_path / "elsewhere"
    (root / "tiny").mkdir(parents=True)
    (outside / "tiny").mkdir(parents=True)
    (root / "escape").symlink_to(outside / "tiny")
    settings = settings_with([str(root)], tmp_path)
    assert grant_model(settings, str(root / "tiny")).trust_remote_code is False
    for name in (str(outside / "tiny"), str(root / "escape"), f"{root}/../elsewhere/tiny", str(root / "missing"),
                 "models/tiny"):
        with pytest.raises(InputError) as refused:
            grant_model(settings, name, field="spec.model")
        assert refused.value.field == "spec.model"


def test_worker_loads_with_the_grant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's loader passes the entry's revision and remote-code flag through, and nothing else grants them."""
    seen: list[dict[str, object]] = []
    monkeypatch.setattr(runner, "load_model", lambda model_id, **kwargs: seen.append({"id": model_id, **kwargs}))
    runner.cached_model.cache_clear()
    try:
        runner.cached_model(ModelGrant("org/custom", "abc123", True), "cpu", "float32", tmp_path)
        runner.cached_model(ModelGrant("org/plain"), "cpu", "float32", tmp_path)
    finally:
        runner.cached_model.cache_clear()
    assert [(s["id"], s["revision"], s["trust_remote_code"]) for s in seen] == [
        ("org/custom", "abc123", True), ("org/plain", None, False)]
