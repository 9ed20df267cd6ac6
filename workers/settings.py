"""One `Settings` for the API and the worker, read from `EIGENSHIFT_*` variables when first asked for."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path.home() / ".local" / "share" / "eigenshift"
Scope = Literal["generate", "score", "jobs:write", "jobs:read", "admin"]


class ApiKeySpec(BaseModel):
    """One API key as configured: its name, the SHA-256 hex digest of the secret (never the secret), its scopes."""

    name: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: list[Scope] = Field(min_length=1)
    rate_per_s: float | None = Field(None, gt=0, description="this key's own rate limit (default: rate_limit_per_s)")
    burst: int | None = Field(None, ge=1, description="this key's own bucket size (default: rate_limit_burst)")


class AllowedModel(BaseModel):
    """A model that jobs and the server may load: one hub id (or `embedded`), or any directory under a local root.

    `trust_remote_code` runs the model repository's own Python: it is off unless its entry turns it on.
    """

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, min_length=1, max_length=200, description="a hub id or `embedded`")
    root: Path | None = Field(None, description="model directories under this absolute path")
    revision: str | None = Field(None, description="pin the hub revision (branch, tag or commit)")
    trust_remote_code: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        """A plain string is a hub id, or a root when it is an absolute path."""
        if isinstance(value, str):
            return {"root": value} if value.startswith("/") else {"id": value}
        return value

    @model_validator(mode="after")
    def _one_of(self) -> AllowedModel:
        if (self.id is None) == (self.root is None):
            raise ValueError("an allowed model names exactly one of `id` and `root`")
        if self.root is not None and not self.root.is_absolute():
            raise ValueError("`root` must be an absolute path")
        return self


class AllowedScorer(BaseModel):
    """A scorer that requests may name: one exact spec (`profanity`, `hf:<hub id>`, `detoxify:<ckpt>`), or any
    `hf:<dir>` / `detoxify:<ckpt>` path under a local root."""

    model_config = ConfigDict(extra="forbid")

    spec: str | None = Field(None, min_length=1, max_length=300, description="an exact scorer spec")
    root: Path | None = Field(None, description="scorer directories and checkpoints under this absolute path")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        """A plain string is an exact spec."""
        return {"spec": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_of(self) -> AllowedScorer:
        if (self.spec is None) == (self.root is None):
            raise ValueError("an allowed scorer names exactly one of `spec` and `root`")
        if self.root is not None and not self.root.is_absolute():
            raise ValueError("`root` must be an absolute path")
        return self


class Settings(BaseSettings):
    """Everything deployment-specific. Embedded default: local Redis socket, local artifacts, `embedded`."""

    model_config = SettingsConfigDict(env_prefix="EIGENSHIFT_", extra="ignore")

    # Access. Keys as JSON in EIGENSHIFT_API_KEYS; plus, when admin_key_file is on, the admin key kept in
    # <data_dir>/api-key (generated at first start).
    api_keys: list[ApiKeySpec] = Field(default_factory=list)
    admin_key_file: bool = Field(True, description="generate and accept the admin key in <data_dir>/api-key")
    rate_limit_per_s: float = Field(20.0, gt=0, description="requests per second per key (token bucket refill)")
    rate_limit_burst: int = Field(40, ge=1, description="bucket size: requests a key may send at once")

    # Queue and records. None means "the Redis that `eigenshift serve` starts under data_dir".
    redis_url: str | None = None
    queue: str = "eigenshift"
    key_prefix: str = "eigenshift"
    job_timeout_s: int = Field(6 * 3600, ge=60, description="longest job; the broker's visibility timeout is above it")
    heartbeat_s: float = Field(5.0, gt=0)
    lease_s: float = Field(30.0, gt=0, description="a running step renews its lease every heartbeat_s; "
                                                   "a lease older than this means its worker is lost")
    max_attempts: int = Field(3, ge=1, description="runs of a step whose worker keeps dying before the job fails")
    redis_timeout_s: float = Field(2.0, gt=0, description="socket timeout: Redis trouble is a 503, never a hang")
    retry_after_s: int = 5
    job_retention_s: int = Field(7 * 86400, ge=60, description="finished jobs and their artifacts live this long")
    upload_retention_s: int = Field(7 * 86400, ge=60, description="uploaded files (POST /files) live this long")
    reap_interval_s: float = Field(300.0, gt=0, description="how often a worker deletes expired jobs and uploads")

    # Files.
    data_dir: Path = DEFAULT_DATA_DIR
    data_root: Path | None = Field(None, description="prompt files given by `path` must lie under it")
    store: Literal["local", "s3"] = "local"
    s3_endpoint_url: str | None = None
    s3_bucket: str = "eigenshift"
    s3_prefix: str = ""
    s3_region: str = "us-east-1"
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None

    # Models.
    model: str = Field("embedded", description="the model the API serves (one per process)")
    models: list[AllowedModel] = Field(
        default_factory=lambda: [AllowedModel(id="embedded")],
        description="the allowlist of models jobs may name: hub ids, `embedded`, or local roots (absolute paths); "
                    "JSON like [\"embedded\", \"/models\", {\"id\": \"org/name\", \"trust_remote_code\": true}]")
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    cache_dir: Path | None = None
    scorer: str = "profanity"
    scorers: list[AllowedScorer] = Field(
        default_factory=lambda: [AllowedScorer(spec="profanity"), AllowedScorer(spec="ensemble")],
        description="the allowlist of scorers requests may name (besides `scorer` and `moderation_scorers`): "
                    "exact specs, or local roots for hf:<dir> / detoxify:<ckpt>; JSON like "
                    "[\"profanity\", \"hf:s-nlp/roberta_toxicity_classifier\", {\"root\": \"/srv/scorers\"}]")
    default_intervention: Path | None = Field(None, description="intervention directory served before any job ran")
    torch_threads: int | None = Field(None, ge=1)
    worker_nice: int = Field(10, ge=0, le=19, description="`eigenshift serve` runs its step worker at this niceness, "
                             "so jobs on the same CPUs take what serving leaves (0: the same priority)")

    # Serving limits.
    batch_max_size: int = Field(32, ge=1, description="rows in the running batch of /generate (continuous batching)")
    batch_window_ms: float = Field(5.0, ge=0, description="how long the first request waits for company")
    prefill_tokens_per_step: int = Field(256, ge=1, description="prompt tokens prefilled per decode step (packed: "
                                                               "their total; padded: rows × the longest); a longer "
                                                               "prompt is fed in chunks over several steps")
    prompt_cache_mb: int = Field(256, ge=0, description="memory for prefilled prompts kept for reuse (their KV "
                                                       "cache): a prompt seen again skips its prefill (0: off)")
    batch_key_share: float = Field(0.5, gt=0, le=1, description="share of the batch one API key may hold while "
                                                                "another key's rows wait")
    max_body_bytes: int = Field(2_000_000, ge=1024)
    max_prompt_chars: int = Field(4000, ge=1)
    max_prompt_tokens: int = Field(2048, ge=1, description="tokens in one prompt of /generate and the OpenAI routes "
                                                           "(and never past the model's context less max_new_tokens)")
    max_job_prompts: int = Field(20_000, ge=1)
    max_generate_batch: int = Field(64, ge=1, description="prompts in one POST /generate or texts in POST /score")
    max_new_tokens_limit: int = Field(256, ge=1)
    request_timeout_s: float = Field(300.0, gt=0)
    max_generate_queue: int = Field(256, ge=1, description="rows waiting for the model; beyond it /generate is a 503")

    # Moderation. POST /v1/moderations and /v1alpha1/comments:analyze; categories are OpenAI's that we map.
    moderation_scorers: list[str] = Field(default_factory=lambda: ["profanity"],
                                          description="scorers /v1/moderations may name as `model`, besides `scorer`")
    moderation_threshold: float = Field(0.5, description="a category is flagged when its score is at least this")
    moderation_thresholds: dict[Literal["harassment", "harassment/threatening", "hate", "sexual", "violence"], float] = (
        Field(default_factory=dict, description="per-category thresholds, overriding moderation_threshold"))

    # Webhooks. A job's callback_url must match an allowed host; an address that is not global (loopback,
    # private, link-local, ...) passes only inside an allowed CIDR, at submit and again after DNS resolution.
    webhook_allowed_hosts: list[str] = Field(
        default_factory=list, description="callback hosts: names, `*.suffix`, CIDRs or IPs, or `*` for any public "
                                          "host; empty turns callbacks off")
    webhook_secret: SecretStr | None = Field(None, description="signing key (default: generated in "
                                                               "<data_dir>/webhook-secret)")
    webhook_queue: str = Field("eigenshift-webhooks", min_length=1, max_length=64,
                               description="deliveries' own queue, consumed beside the steps' (a step may run hours)")
    webhook_max_attempts: int = Field(5, ge=1, le=20, description="deliveries tried per finished job")
    webhook_backoff_s: float = Field(5.0, gt=0, description="wait before the second attempt; doubles after each")
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="connect and read timeout of one attempt")

    @property
    def redis_address(self) -> str:
        """The Redis URL in use: the configured one, or the embedded server's unix socket."""
        return self.redis_url or f"unix://{self.data_dir / 'redis.sock'}"

    @property
    def api_key_path(self) -> Path:
        return self.data_dir / "api-key"

    @property
    def work_dir(self) -> Path:
        return self.data_dir / "work"

    @property
    def artifacts_dir(self) -> Path:
        return self.data_dir / "artifacts"

    def celery_config(self) -> dict[str, Any]:
        """Celery settings: late acks, one task at a time, a visibility timeout above the longest job."""
        transport = {"visibility_timeout": self.job_timeout_s + 3600, "socket_timeout": self.redis_timeout_s,
                     "socket_connect_timeout": self.redis_timeout_s, "max_retries": 1}
        return {
            "broker_url": celery_broker_url(self.redis_address),
            "broker_transport_options": transport,
            "broker_connection_retry_on_startup": True,
            "task_default_queue": self.queue,
            "task_acks_late": True,
            "task_reject_on_worker_lost": True,
            "task_ignore_result": True,
            "worker_prefetch_multiplier": 1,
            "worker_hijack_root_logger": False,
            "task_time_limit": self.job_timeout_s,
            "broker_pool_limit": 4,
        }


def celery_broker_url(redis_url: str) -> str:
    """kombu spells a Redis unix socket `redis+socket://PATH`; redis-py spells it `unix://PATH`."""
    if redis_url.startswith("unix://"):
        return "redis+socket://" + redis_url.removeprefix("unix://")
    return redis_url


@functools.lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use (never at import)."""
    return Settings()
