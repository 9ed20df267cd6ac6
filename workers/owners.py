"""Who may see what: jobs, uploads, the interventions jobs build and Idempotency-Keys belong to the API key
that made them (its name, recorded as `owner`); a key with the `admin` scope sees everything.

The check lives where a record is loaded (`JobService.get`, `InterventionRegistry.get`, `Uploads.check`), so
no route repeats it; another key's record is reported exactly as a missing one, so its ids leak nothing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    """Whoever asks: an API key's name (None: the service itself) and whether it holds `admin`."""

    name: str | None
    admin: bool = False

    def sees(self, owner: str | None) -> bool:
        """Whether a record owned by `owner` is visible (records without an owner: admins only)."""
        return self.admin or (owner is not None and owner == self.name)


SYSTEM = Caller(None, admin=True)  # the service's own calls: workers, the model server, benchmarks, tests
