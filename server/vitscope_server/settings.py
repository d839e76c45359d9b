"""Settings of every `vitscope-server` command: one pydantic model per command, its flags
generated from the fields (settings_flags), so flags and code cannot drift.

The server's settings are also VITSCOPE_* environment variables; each field's description is
its `vitscope-server serve --help` text and its row in docs/configuration.md. A batch job's
settings are flags only: its command line in the Job says everything it does, and a job
does not pick up the server's variables (VITSCOPE_DEVICE, ...) or another job's by accident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_GRPC_PORT = 50051
DEFAULT_METRICS_PORT = 8000
DEFAULT_UI_PORT = 8080
ENV_PREFIX = "VITSCOPE_"


class ServerSettings(BaseSettings):
    """Everything `vitscope-server serve` can be told; each field is also VITSCOPE_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    host: str = Field(
        "0.0.0.0", description="Address to bind; [::] binds IPv6 (and IPv4 where the OS maps it)."
    )
    port: int = Field(
        DEFAULT_GRPC_PORT, ge=0, le=65535, description="gRPC port; 0 picks a free one."
    )
    metrics_port: int = Field(
        DEFAULT_METRICS_PORT,
        ge=-1,
        le=65535,
        description="Prometheus /metrics port; -1 turns it off, 0 picks a free one.",
    )
    ui_port: int = Field(
        DEFAULT_UI_PORT,
        ge=-1,
        le=65535,
        description="Web explorer (HTTP pages and JSON endpoints, OpenAPI at /openapi.json) "
        "port; -1 turns it off, 0 picks a free one. The token, when set, protects it too.",
    )
    models_file: Path | None = Field(None, description="YAML file listing the models to serve.")
    models: list[str] = Field(
        default_factory=list,
        description="Extra models as NAME=FAMILY:ARCHITECTURE[@WEIGHTS]; repeat the flag for more.",
    )
    default_model: str | None = Field(
        None,
        description="Model used when a request names none; unset: the built-in or first listed.",
    )
    builtin_models: bool = Field(
        True,
        description="Serve the built-in digits models, their trained inverters and SAEs.",
    )
    inverters_dir: Path | None = Field(
        None,
        description="Folder of trained inverter stores (one per subfolder), offered beside the "
        "built-in ones; read at start.",
    )
    saes: list[str] = Field(
        default_factory=list,
        description="SAEs to serve as MODEL:NAME=FOLDER (SAELens layout: cfg.json and "
        "sae_weights.safetensors); repeat the flag for more.",
    )
    saes_dir: Path | None = Field(
        None,
        description="Folder of SAEs to serve: SAES_DIR/MODEL/NAME/cfg.json, one subfolder per "
        "model and per SAE; read at start.",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch CPU threads of each compute slot; unset: torch's choice, one per "
        "core. Other server threads use one.",
    )
    compile_blocks: bool = Field(
        False,
        description="Run every transformer block compiled with torch.compile (inductor), its "
        "sites still read by hooks; results stay within float rounding of eager. The first "
        "forward of each kind (shape, sites, gradients) compiles first: seconds on a GPU, "
        "a minute or more on a CPU.",
    )
    max_message_bytes: int = Field(
        64 << 20, ge=1 << 16, description="Largest gRPC message sent or received, in bytes."
    )
    chunk_bytes: int = Field(
        4 << 20, ge=1 << 10, description="Payload bytes per streamed tensor chunk."
    )
    max_running: int = Field(1, ge=1, description="Requests computing at once.")
    max_queue: int = Field(
        32, ge=0, description="Requests waiting for compute before RESOURCE_EXHAUSTED."
    )
    max_workers: int = Field(
        8,
        ge=2,
        description="Threads beyond max_running + max_queue, for health checks, cheap calls "
        "and streaming.",
    )
    max_connection_age_seconds: float = Field(
        300.0, gt=0, description="Connections are recycled after this age, so callers rebalance."
    )
    max_batch: int = Field(64, ge=1, description="Most images in one request.")
    batch_max_images: int = Field(
        32,
        ge=0,
        description="Most images in one forward shared by concurrent GetActivations requests "
        "for a model; 0 turns batching off.",
    )
    batch_delay_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="Longest wait of a batch for requests still being decoded (never when "
        "none is).",
    )
    max_image_pixels: int = Field(40_000_000, ge=1, description="Most pixels in one decoded image.")
    max_result_bytes: int = Field(
        4 << 30, ge=1, description="Most bytes of activations one request may produce."
    )
    image_roots: list[Path] = Field(
        default_factory=list,
        description="Folders whose images TopActivatingImages may scan by name; repeat the flag "
        "for more. None by default.",
    )
    auth_token: SecretStr | None = Field(
        None,
        description="Bearer token callers must send. Prefer auth_token_file or the environment: "
        "a flag shows in the process list.",
    )
    auth_token_file: Path | None = Field(
        None, description="File holding the bearer token callers must send."
    )
    tls_cert: Path | None = Field(None, description="PEM certificate chain; turns on TLS.")
    tls_key: Path | None = Field(None, description="PEM private key of tls_cert.")
    tls_client_ca: Path | None = Field(
        None, description="PEM CA of client certificates; turns on mutual TLS."
    )
    request_memory_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="Memory budget of one request, in bytes: its decoded images, what the "
        "model's resize builds of them, activations and results are estimated before anything "
        "is allocated; over it is RESOURCE_EXHAUSTED. Unset: the server's budget "
        "(server_memory_bytes), so that one request may use all of it.",
    )
    server_memory_bytes: int | None = Field(
        None,
        ge=1 << 20,
        description="Memory budget of all admitted requests together, in bytes; later ones wait "
        "in the queue (max_queue) for room. Unset: half the least of the container's memory "
        "limit, RLIMIT_AS and the RAM.",
    )
    malloc_arena_max: int = Field(
        2,
        ge=0,
        description="Most glibc malloc arenas (each keeps the memory freed in it); 0: glibc's "
        "default of eight per core. The MALLOC_ARENA_MAX environment variable, when set, wins.",
    )
    malloc_trim_bytes: int = Field(
        32 << 20,
        ge=0,
        description="Once no request holds memory after one whose estimate reached this many "
        "bytes, freed heap memory is returned to the system (malloc_trim); 0: never.",
    )
    stream_buffer_messages: int = Field(
        8,
        ge=1,
        description="Progress messages a stream holds for a slow reader before older ones are "
        "dropped (the latest wins); results are never dropped.",
    )
    stream_buffer_bytes: int = Field(
        256 << 20,
        ge=1 << 20,
        description="Result bytes a stream may hold for a reader that is behind while its "
        "request still computes; past this the computation waits for the reader (holding its "
        "compute slot) rather than buffer more.",
    )
    slow_reader_seconds: float = Field(
        30.0,
        gt=0,
        description="A stream reader that takes nothing this long while messages wait is cut "
        "off with RESOURCE_EXHAUSTED.",
    )
    drain_delay_seconds: float = Field(
        5.0,
        ge=0,
        description="After SIGTERM, health says NOT_SERVING but calls are still accepted this "
        "long, so probes and load balancers see it; then grace_seconds apply.",
    )
    grace_seconds: float = Field(
        10.0, ge=0, description="After SIGTERM, time in-flight calls get to finish."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Logging threshold: DEBUG, INFO, WARNING or ERROR."
    )

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


class JobSettings(BaseSettings):
    """A batch job's settings: read from its flags and defaults only, never the environment.

    The class docstring is the job's --help description (its first line the summary)."""

    model_config = SettingsConfigDict(extra="forbid")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings,)


class ModelJobSettings(JobSettings):
    """A job on one served model, named exactly as `vitscope-server serve` names it."""

    model: str = Field(description="Name of the model, as served.")
    models_file: Path | None = Field(None, description="YAML models file, as for serve.")
    model_spec: list[str] = Field(
        default_factory=list,
        description="NAME=FAMILY:ARCH[@WEIGHTS] as for serve --models; repeat the flag for more.",
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
