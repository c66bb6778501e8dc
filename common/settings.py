"""One typed settings object, read from ``VIDEOQA_*`` environment variables once per process."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "llava-hf/llava-interleave-qwen-7b-hf"
DEFAULT_STORAGE_DIR = Path.home() / ".cache" / "videoqa" / "storage"


class SettingsError(ValueError):
    """Configuration that cannot work; the message names the variables to fix."""


class Settings(BaseSettings):
    """Everything a process of the service can be configured with.

    Standard variables (``AWS_*``, ``HF_HOME``, ``HF_HUB_OFFLINE``, ``CUDA_VISIBLE_DEVICES``)
    keep their meaning and are read by boto3, huggingface_hub and CUDA themselves.
    """

    model_config = SettingsConfigDict(env_prefix="VIDEOQA_", extra="ignore", frozen=True)

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="broker and job records")
    storage_url: str = Field(
        default=str(DEFAULT_STORAGE_DIR),
        description="`s3://bucket/prefix` or a local directory",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 endpoint (MinIO, R2); `AWS_ENDPOINT_URL` is used when unset"
    )
    model: str = Field(default=DEFAULT_MODEL, description="hub id or local folder of the model")
    device: Literal["auto", "cuda", "cpu"] = Field(default="auto", description="where GPU workers run the model")
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = Field(
        default="auto", description="attention kernels; `auto`: `flash_attention_2` when usable on CUDA, else `sdpa`"
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        default="auto",
        description="what GPU workers run the model in; `auto`: `float16` on CUDA, `float32` on the CPU "
        "(docs/gpu-pipeline.md has the trade-off)",
    )
    compile: Literal["off", "decode"] = Field(
        default="off",
        description="`decode`: a static KV cache and `torch.compile` of the decoding step, with batch sizes and cache "
        "lengths rounded up to a few buckets (docs/gpu-pipeline.md)",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO",
        description="level of the service's own log lines (API and workers; gunicorn's own: `--log-level`)",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto",
        description="`json` (one object a line), `console` (short lines for people); `auto`: console when stderr "
        "is a terminal",
    )
    image_size: int = Field(
        default=384,
        ge=1,
        description="side of the square frames CPU workers store for a hub model (a local model folder's "
        "processor config says it instead); GPU workers warn when it disagrees with the model",
    )

    # Limits
    max_videos: int = Field(default=8, ge=1, description="videos per job")
    max_images: int = Field(default=8, ge=0, description="images per job")
    max_frames: int = Field(default=32, ge=1, description="largest `num_frames` per video")
    max_new_tokens: int = Field(default=512, ge=1, description="largest `max_new_tokens`")
    max_text_chars: int = Field(
        default=4000,
        ge=1,
        description="`question`, `prompt` and `history` together, in characters",
        # The older name, from when it bounded the question alone, keeps working.
        validation_alias=AliasChoices(
            "max_text_chars", "VIDEOQA_MAX_TEXT_CHARS", "max_question_chars", "VIDEOQA_MAX_QUESTION_CHARS"
        ),
    )
    image_tokens: int = Field(
        default=729, ge=1, description="tokens one frame or image takes in the model (27 x 27 patches)"
    )
    context_tokens: int = Field(
        default=32768,
        ge=1,
        description="the model's context: a job's prompt and new tokens must fit it, or it is refused at "
        "submission (docs/limits.md)",
    )
    max_job_tokens: int = Field(
        default=32768,
        ge=1,
        description="largest job (prompt and new tokens) a GPU worker's memory is sized for; larger jobs are "
        "refused at submission (docs/limits.md)",
    )
    max_download_bytes: int = Field(
        default=2 * 1024**3, ge=1, description="cap on a downloaded video or `s3://` object, enforced while it streams"
    )
    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1, description="request body cap (`413` above it)")
    download_connect_timeout_s: float = Field(default=10.0, gt=0, description="connect timeout of a download")
    download_read_timeout_s: float = Field(default=30.0, gt=0, description="read timeout of a download")
    download_deadline_s: float = Field(default=600.0, gt=0, description="total time for one download")
    fetch_allowlist: str = Field(
        default="",
        description="comma-separated hosts or networks (CIDR) that may be fetched although not public",
    )
    max_video_seconds: float = Field(default=4 * 3600, gt=0, description="longest video, by its stream")
    max_video_pixels: int = Field(default=4096 * 2160, ge=1, description="largest width x height (default 4096 x 2160)")
    max_video_frames: int = Field(default=500_000, ge=1, description="most frames in a video stream")
    max_streams: int = Field(default=16, ge=1, description="most streams (video, audio, subtitles) in a file")
    max_image_pixels: int = Field(
        default=8192 * 8192,
        ge=1,
        description="largest width x height of an image (default 8192 x 8192), checked before it is decoded",
    )

    # Decoding: each video is probed and decoded in child processes with these limits
    decode_memory_mb: int = Field(
        default=2048, ge=64, description="memory limit (heap, buffers, stacks) of a decode process"
    )
    decode_timeout_s: float = Field(default=300.0, gt=0, description="deadline for sampling one video")
    decode_processes: int = Field(
        default=0,
        ge=0,
        description="at most this many processes for one video, split by GOP when the plan's decoding outweighs "
        "starting a process; `0`: one per core; the cores left to a process run decoders on threads of their own "
        "(set `1` when worker concurrency already fills the cores)",
    )

    # Access
    api_keys: str = Field(
        default="",
        description="comma-separated `tenant:sha256-of-key[:s3-prefix|s3-prefix...]`; empty turns authentication off",
    )
    rate_limit: str = Field(
        default="120/minute", description="job submissions per API key (per client address without keys)"
    )
    max_active_jobs_per_tenant: int = Field(default=500, ge=1, description="jobs queued or running per tenant")
    events_heartbeat_s: float = Field(
        default=15.0, gt=0, description="a comment line on an idle event stream this often, so proxies keep it open"
    )
    share_frames_across_tenants: bool = Field(
        default=False,
        description="reuse frames, images and ETag records of the same bytes across tenants; off, each tenant's are its "
        "own, so timings never show that another tenant sent the same bytes",
    )

    # Retention of stored objects (see docs/retention.md)
    storage_retention_s: int = Field(
        default=7 * 24 * 3600,
        ge=60,
        description="frames, images and ETag records older than this are deleted (uploads go once their job "
        "ended); stored videos (`POST /v1/videos`) and their frames last this long from their creation; "
        "at least 4 x `VIDEOQA_TASK_TIME_LIMIT_S` (docs/retention.md)",
    )
    sweep_interval_s: float = Field(
        default=3600.0, gt=0, description="how often CPU workers delete expired objects and job index entries"
    )

    # Webhooks and idempotent submission (see docs/webhooks.md)
    webhook_secret: SecretStr | None = Field(
        default=None,
        description="`whsec_` + base64 key signing webhook deliveries; unset, webhooks are refused (docs/webhooks.md)",
    )
    webhook_retry_s: float = Field(
        default=24 * 3600, gt=0, description="a failed delivery is retried until this long after the job ended"
    )
    webhook_backoff_s: float = Field(
        default=5.0, gt=0, description="first retry of a failed delivery, doubling (at most 15 min)"
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="connect and read timeout of one delivery")
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=1, description="how long an `Idempotency-Key` names its job")

    # Reliability
    visibility_timeout_s: int = Field(
        default=3600, ge=5, description="Redis redelivers an unacknowledged task after this"
    )
    task_time_limit_s: int = Field(
        default=1800, ge=10, description="hard limit of a task; must be below the visibility timeout"
    )
    job_ttl_s: int = Field(default=7 * 24 * 3600, ge=60, description="how long job records are kept")
    transient_retries: int = Field(
        default=5,
        ge=0,
        description="retries (with backoff) of transient storage and network errors, in either stage",
        # The older name, from when only the CPU stage retried, keeps working.
        validation_alias=AliasChoices(
            "transient_retries", "VIDEOQA_TRANSIENT_RETRIES", "ingest_max_retries", "VIDEOQA_INGEST_MAX_RETRIES"
        ),
    )
    max_attempts: int = Field(
        default=3, ge=1, description="deliveries that end their worker before a job fails as `poison`"
    )
    retry_backoff_s: int = Field(
        default=2,
        ge=1,
        description="the first retry comes within this many seconds, doubling each time (at most a minute)",
    )
    reconcile_interval_s: float = Field(
        default=30.0, gt=0, description="how often CPU workers look for jobs with no queue message"
    )
    reconcile_after_s: float = Field(
        default=300.0, gt=0, description="how long a job with no queue message must be unchanged to be sent again"
    )
    worker_start_timeout_s: float = Field(
        default=60.0, gt=0, description="how long a new CPU worker pool process may take to start before it is replaced"
    )

    # GPU workers
    batch_size: int = Field(
        default=0,
        ge=0,
        description="jobs a GPU worker generates together; `0` sizes it from free GPU memory (8 on CPU)",
    )
    batch_wait_ms: int = Field(default=50, ge=0, description="how long a batch waits for more queued jobs")
    prefetch: Literal["auto", "on", "off"] = Field(
        default="auto",
        description="while a batch generates, claim and prepare the next jobs (frames fetched, decoded and made "
        "tensors) so the model does not wait on storage; `auto`: on when the model runs on CUDA, off on the CPU, "
        "where the preparing thread takes cores from the model; `true`/`false` mean on/off (docs/gpu-pipeline.md)",
    )
    fetch_threads: int = Field(default=8, ge=1, description="frames a GPU worker fetches from storage at once")
    inflight_batching: bool = Field(
        default=True,
        description="jobs join a running batch between decode steps and leave it when done; off: one generate "
        "call per batch",
    )
    prefix_cache_bytes: int | None = Field(
        default=None,
        ge=0,
        description="bytes of device memory for the KV caches of recent frame sets, reused by the next question "
        "about the same frames; unset: a fifth of the free GPU memory after loading (256 MiB on the CPU); 0: off",
    )
    heartbeat_interval_s: float = Field(
        default=5.0, gt=0, description="GPU worker readiness refresh; the key expires after three intervals"
    )

    # Clients: `videoqa ask` and `Client.from_settings()`
    server: str = Field(
        default="http://127.0.0.1:8000", description="the API `videoqa ask` and `Client.from_settings()` talk to"
    )
    api_key: str | None = Field(
        default=None,
        repr=False,
        description="the key `videoqa ask` and `Client.from_settings()` send (`Authorization: Bearer`), one "
        "`videoqa api-key` made",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @field_validator("api_keys")
    @classmethod
    def _api_key_entries(cls, value: str) -> str:
        for entry in filter(None, (e.strip() for e in value.split(","))):
            parts = entry.split(":", 2)
            if len(parts) < 2 or not parts[0] or len(parts[1]) != 64:
                raise ValueError(f"entry {parts[0] or '?'!r} must be tenant:sha256-hex-of-key (see `videoqa api-key`)")
        return value

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret_format(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        raw = value.get_secret_value()
        try:
            # Padding is optional in the Standard Webhooks format.
            encoded = raw.removeprefix("whsec_").rstrip("=")
            key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
        except (binascii.Error, ValueError):
            key = b""
        if not raw.startswith("whsec_") or len(key) < 16:
            raise ValueError(
                "must be whsec_ followed by at least 16 bytes in base64 (e.g. whsec_$(openssl rand -base64 32))"
            )
        return value

    @field_validator("prefetch", mode="before")
    @classmethod
    def _prefetch_as_bool(cls, value: object) -> object:
        # A boolean (or None) reads as the switch it was before `auto` existed.
        if value is None:
            return "auto"
        if isinstance(value, bool):
            return "on" if value else "off"
        if isinstance(value, str):
            word = value.strip().lower()
            return {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(word, word)
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate_limit_syntax(cls, value: str) -> str:
        from limits import parse_many

        try:
            parse_many(value)
        except ValueError:
            raise ValueError("must read like '120/minute' or '10/second;1000/hour'") from None
        return value

    @model_validator(mode="after")
    def _dtype_fits_device(self) -> Settings:
        # Checked here so that a worker refuses at start; `auto` devices are checked again once
        # CUDA is asked (worker.gpu.precision).
        if self.dtype == "float16" and self.device == "cpu":
            raise ValueError(
                "VIDEOQA_DTYPE=float16 is not supported with VIDEOQA_DEVICE=cpu (incomplete, slow kernels); "
                "use float32 or bfloat16"
            )
        if self.dtype == "float32" and self.attn_implementation == "flash_attention_2":
            raise ValueError(
                "VIDEOQA_ATTN_IMPLEMENTATION=flash_attention_2 runs only in float16 or bfloat16, not VIDEOQA_DTYPE=float32"
            )
        return self

    @model_validator(mode="after")
    def _time_limit_below_visibility(self) -> Settings:
        # A task outliving the visibility timeout is delivered to a second worker while the first
        # still runs it: the hard limit has to end it before that can happen.
        if self.task_time_limit_s >= self.visibility_timeout_s:
            raise ValueError(
                "VIDEOQA_TASK_TIME_LIMIT_S must be below VIDEOQA_VISIBILITY_TIMEOUT_S "
                f"(got {self.task_time_limit_s} >= {self.visibility_timeout_s})"
            )
        return self

    @model_validator(mode="after")
    def _retention_outlives_a_task(self) -> Settings:
        # An ingest may pick stored frames up to half the retention old and run a whole task
        # before its record names them; a quarter of the retention leaves room for both.
        if self.storage_retention_s < 4 * self.task_time_limit_s:
            raise ValueError(
                "VIDEOQA_STORAGE_RETENTION_S must be at least 4 x VIDEOQA_TASK_TIME_LIMIT_S "
                f"(got {self.storage_retention_s} < 4 x {self.task_time_limit_s})"
            )
        return self

    @property
    def fetch_allowlist_entries(self) -> list[str]:
        return [entry.strip() for entry in self.fetch_allowlist.split(",") if entry.strip()]

    @property
    def is_s3(self) -> bool:
        return self.storage_url.startswith("s3://")


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build settings from ``environ`` (the process environment by default).

    Raises ``SettingsError`` with one line per bad variable, phrased for an operator.
    """
    try:
        if environ is None:
            return Settings()
        values = {key[len("VIDEOQA_") :].lower(): value for key, value in environ.items() if key.startswith("VIDEOQA_")}
        return Settings.model_validate(values)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            name = f"VIDEOQA_{field.upper()}" if field else "settings"
            lines.append(f"{name}: {error['msg']}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
