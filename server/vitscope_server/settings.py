"""Server settings from flags and VITSCOPE_* environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 8000


class ServerSettings(BaseSettings):
    """Everything `vitscope serve` can be told; each field is also VITSCOPE_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="VITSCOPE_", extra="forbid")

    # "[::]" binds IPv6 (and IPv4 where the OS maps it).
    host: str = "0.0.0.0"
    port: int = Field(DEFAULT_GRPC_PORT, ge=0, le=65535)
    # -1 turns the metrics endpoint off; 0 picks a free port.
    metrics_port: int = Field(DEFAULT_METRICS_PORT, ge=-1, le=65535)
    models_file: Path | None = None
    # Extra models as NAME=FAMILY:ARCHITECTURE[@WEIGHTS].
    models: list[str] = Field(default_factory=list)
    default_model: str | None = None
    builtin_models: bool = True
    # A folder of trained inverter stores (one per subfolder), offered beside the built-in ones.
    inverters_dir: Path | None = None
    device: str = "auto"
    torch_threads: int | None = Field(None, ge=1)
    max_message_bytes: int = Field(64 << 20, ge=1 << 16)
    chunk_bytes: int = Field(4 << 20, ge=1 << 10)
    max_running: int = Field(1, ge=1)
    max_queue: int = Field(32, ge=0)
    # Threads beyond max_running + max_queue, for health checks, cheap calls and streaming.
    max_workers: int = Field(8, ge=2)
    max_connection_age_seconds: float = Field(300.0, gt=0)
    max_batch: int = Field(64, ge=1)
    # GetActivations requests for one model that arrive together share a forward of at most
    # batch_max_images images; a batch waits up to batch_delay_ms for requests still being
    # decoded (never when none is). 0 images turns batching off.
    batch_max_images: int = Field(32, ge=0)
    batch_delay_ms: float = Field(2.0, ge=0, le=1000)
    max_image_pixels: int = Field(40_000_000, ge=1)
    max_result_bytes: int = Field(4 << 30, ge=1)
    # Folders whose images TopActivatingImages may scan by name; none by default.
    image_roots: list[Path] = Field(default_factory=list)
    auth_token: SecretStr | None = None
    auth_token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    grace_seconds: float = Field(10.0, ge=0)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _tls_pairs(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mTLS) needs tls_cert and tls_key")
        return self

    @property
    def effective_chunk_bytes(self) -> int:
        """Chunk payloads leave room for the message's other fields under the max size."""
        return min(self.chunk_bytes, self.max_message_bytes - (16 << 10))

    def token(self) -> str | None:
        if self.auth_token is not None:
            return self.auth_token.get_secret_value()
        if self.auth_token_file is not None:
            return self.auth_token_file.read_text().strip()
        return None
