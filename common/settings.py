"""One typed settings object, read from ``VIDEOQA_*`` environment variables once per process."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator
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

    redis_url: str = "redis://127.0.0.1:6379/0"
    storage_url: str = Field(
        default=str(DEFAULT_STORAGE_DIR),
        description="s3://bucket/prefix, or a local directory",
    )
    s3_endpoint_url: str | None = Field(
        default=None, description="S3 endpoint (MinIO, R2); AWS_ENDPOINT_URL is used when unset"
    )
    model: str = Field(default=DEFAULT_MODEL, description="hub id or local folder of the model")
    device: Literal["auto", "cuda", "cpu"] = "auto"
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Limits
    max_videos: int = Field(default=8, ge=1)
    max_images: int = Field(default=8, ge=0)
    max_frames: int = Field(default=32, ge=1, description="largest num_frames per video")
    max_new_tokens: int = Field(default=512, ge=1)
    max_question_chars: int = Field(default=4000, ge=1)
    max_download_bytes: int = Field(default=2 * 1024**3, ge=1)
    max_upload_bytes: int = Field(default=2 * 1024**3, ge=1)
    download_connect_timeout_s: float = Field(default=10.0, gt=0)
    download_read_timeout_s: float = Field(default=30.0, gt=0)
    download_deadline_s: float = Field(default=600.0, gt=0, description="total time for one download")
    fetch_allowlist: str = Field(
        default="",
        description="comma-separated hosts or networks (CIDR) that may be fetched although not public",
    )

    # Reliability
    visibility_timeout_s: int = Field(default=3600, ge=60)
    task_time_limit_s: int = Field(default=1800, ge=10)
    job_ttl_s: int = Field(default=7 * 24 * 3600, ge=60, description="how long job records are kept")
    ingest_max_retries: int = Field(default=5, ge=0)

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

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
        values = {
            key[len("VIDEOQA_") :].lower(): value
            for key, value in environ.items()
            if key.startswith("VIDEOQA_")
        }
        return Settings.model_validate(values)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            field = ".".join(str(part) for part in error["loc"])
            name = f"VIDEOQA_{field.upper()}" if field else "settings"
            lines.append(f"{name}: {error['msg']}")
        raise SettingsError("invalid configuration:\n  " + "\n  ".join(lines)) from None
