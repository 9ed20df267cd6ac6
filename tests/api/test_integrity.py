"""Tampered interventions are never served: the sha256 recorded when one is registered is checked whenever
its files are read from the store or the cache, and the core refuses non-finite or non-orthonormal directions.
Each refusal names `intervention`, as problem+json on /generate and OpenAI's envelope on /v1."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from workers.interventions import InterventionRegistry
from workers.settings import Settings

TENSORS = "intervention.safetensors"


def _register(client: TestClient, source: Path, target: Path, intervention_id: str) -> InterventionRegistry:
    shutil.copytree(source, target)
    registry: InterventionRegistry = client.app.state.service.interventions  # type: ignore[attr-defined]
    registry.register(intervention_id, target, model="embedded")
    return registry


def _flip(path: Path, count: int = 4096) -> None:
    """Invert `count` bytes past the safetensors header: the file still parses, its numbers are garbage."""
    data = bytearray(path.read_bytes())
    start = len(data) - count - 16
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    path.write_bytes(bytes(data))


def _assert_refused(client: TestClient, intervention_id: str, words: str) -> None:
    answer = client.get("/generate", params={"prompt": "Hi", "max_new_tokens": 2, "intervention": intervention_id})
    assert 400 <= answer.status_code < 500, answer.text
    assert answer.headers["content-type"] == "application/problem+json" and answer.json()["field"] == "intervention"
    assert words in answer.json()["detail"]
    chat = client.post("/v1/chat/completions", json={"model": f"embedded:{intervention_id}", "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
    assert 400 <= chat.status_code < 500, chat.text
    assert chat.json()["error"]["param"] == "intervention" and words in chat.json()["error"]["message"]


def test_flipped_bytes_in_the_store_and_the_cache_are_refused(client: TestClient, settings: Settings,
                                                               default_intervention: Path, tmp_path: Path) -> None:
    registry = _register(client, default_intervention, tmp_path / "a", "flipped-store")
    _flip(settings.artifacts_dir / "interventions" / "flipped-store" / TENSORS)
    _assert_refused(client, "flipped-store", "sha256")

    registry = _register(client, default_intervention, tmp_path / "b", "flipped-both")
    cached = registry.fetch("flipped-both", settings.data_dir / "cache" / "interventions") / TENSORS
    _flip(cached)
    _flip(settings.artifacts_dir / "interventions" / "flipped-both" / TENSORS)
    _assert_refused(client, "flipped-both", "sha256")


def test_a_flipped_cache_is_fetched_again_from_the_store(client: TestClient, settings: Settings,
                                                         default_intervention: Path, tmp_path: Path) -> None:
    registry = _register(client, default_intervention, tmp_path / "c", "flipped-cache")
    cached = registry.fetch("flipped-cache", settings.data_dir / "cache" / "interventions") / TENSORS
    _flip(cached)
    answer = client.get("/generate", params={"prompt": "Hi", "max_new_tokens": 2, "intervention": "flipped-cache"})
    assert answer.status_code == 200, answer.text
    assert cached.read_bytes() == (default_intervention / TENSORS).read_bytes()


@pytest.mark.parametrize("spoil", ["nan", "scaled"])
def test_nan_or_non_orthonormal_directions_are_refused_at_load(client: TestClient, default_intervention: Path,
                                                                tmp_path: Path, spoil: str) -> None:
    target = tmp_path / "spoiled"
    shutil.copytree(default_intervention, target)
    tensors = load_file(str(target / TENSORS))
    if spoil == "nan":
        tensors["directions"][0] = float("nan")
    else:
        tensors["directions"] = tensors["directions"] * torch.linspace(0.5, 2.0, tensors["directions"].shape[0])[:, None]
    save_file(tensors, str(target / TENSORS))
    registry: InterventionRegistry = client.app.state.service.interventions  # type: ignore[attr-defined]
    registry.register(f"spoiled-{spoil}", target, model="embedded")  # its digest is of the spoiled file
    _assert_refused(client, f"spoiled-{spoil}", "non-finite" if spoil == "nan" else "orthonormal")
