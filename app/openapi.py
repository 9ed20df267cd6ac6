"""`python -m app.openapi`: write openapi/openapi.json from the app (a test fails when it drifts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from app.main import create_app
from workers.settings import Settings

OPENAPI_PATH = Path(__file__).resolve().parents[1] / "openapi" / "openapi.json"


def openapi_document() -> dict[str, Any]:
    """The schema of an app on default settings (the schema does not depend on them)."""
    return create_app(Settings()).openapi()


def render() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"


def main() -> int:
    OPENAPI_PATH.parent.mkdir(parents=True, exist_ok=True)
    OPENAPI_PATH.write_text(render())
    print(OPENAPI_PATH)
    return 0


if __name__ == "__main__":
    sys.exit(main())
