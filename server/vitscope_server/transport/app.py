"""Assembles and runs the server: registry, servicer, health, reflection, metrics, TLS, shutdown."""

from __future__ import annotations

import logging
import os
import signal
import threading
from concurrent import futures
from dataclasses import dataclass
from types import FrameType
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from vitscope.oip import grpc_predict_v2_pb2_grpc
from vitscope.v1 import inspector_pb2, inspector_pb2_grpc
from vitscope_server.builtin import BUILTIN_INVERTERS
from vitscope_server.core.activations.service import ActivationService
from vitscope_server.core.inversion.catalog import InverterCatalog
from vitscope_server.core.model.registry import ModelRegistry, ModelState
from vitscope_server.core.runtime import allocator
from vitscope_server.core.runtime.budget import MemoryBudget, memory_limit_bytes
from vitscope_server.core.runtime.intra_op import host_thread
from vitscope_server.core.runtime.limits import RequestLimits
from vitscope_server.core.runtime.slots import ComputeSlots
from vitscope_server.model_selection import model_specs, resolve_device
from vitscope_server.settings import ServerSettings
from vitscope_server.transport.batchers import create_batchers
from vitscope_server.transport.interceptors import ServiceInterceptor
from vitscope_server.transport.metrics import Metrics
from vitscope_server.transport.oip_rpcs import SERVICE_NAME as INFERENCE_SERVICE_NAME
from vitscope_server.transport.oip_rpcs import InferenceServicer
from vitscope_server.transport.progress import StreamPolicy
from vitscope_server.transport.servicer import InspectorServicer
from vitscope_server.ui.server import RunningExplorer, start_explorer

log = logging.getLogger(__name__)

_LOAD_WAIT_SECONDS = 5.0

SERVICE_NAME = inspector_pb2.DESCRIPTOR.services_by_name["Inspector"].full_name


def _server_credentials(settings: ServerSettings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    pair = [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
    if settings.tls_client_ca is None:
        return grpc.ssl_server_credentials(pair)
    return grpc.ssl_server_credentials(
        pair, root_certificates=settings.tls_client_ca.read_bytes(), require_client_auth=True
    )


@dataclass
class RunningServer:
    """A started server; `port` and `metrics_port` are the bound ports (useful with port 0)."""

    grpc_server: grpc.Server
    port: int
    metrics_port: int | None
    registry: ModelRegistry
    health: health.HealthServicer
    metrics: Metrics
    _metrics_http: Any
    _slots: ComputeSlots
    ui_port: int | None = None
    _explorer: RunningExplorer | None = None

    def stop(self, grace: float, drain_delay: float = 0.0) -> bool:
        """Health NOT_SERVING first; calls are still accepted for `drain_delay` seconds so
        that health pollers and load balancers see it; then new calls are refused and
        in-flight ones get `grace` seconds.

        Returns False when a model load is still running (it cannot be interrupted)."""
        self.health.enter_graceful_shutdown()
        if drain_delay > 0:
            log.info("health NOT_SERVING; still accepting calls for %.1f s", drain_delay)
            threading.Event().wait(drain_delay)
        if self._explorer is not None:
            self._explorer.stop()
        self.grpc_server.stop(grace).wait()
        self._slots.close()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        return self.registry.shutdown(wait_seconds=_LOAD_WAIT_SECONDS)


def _health_updater(
    registry: ModelRegistry, servicer: health.HealthServicer, metrics: Metrics
) -> Any:
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

    def on_state(name: str, state: ModelState) -> None:
        ready = state is ModelState.READY
        servicer.set(name, serving if ready else not_serving)
        metrics.model_ready.labels(name).set(1.0 if ready else 0.0)
        metrics.model_load.labels(name).set(registry.entry(name).load_seconds)
        if name == registry.default:
            for overall in ("", SERVICE_NAME, INFERENCE_SERVICE_NAME):
                servicer.set(overall, serving if ready else not_serving)

    return on_state


def _channel_options(settings: ServerSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Connections are recycled so that callers rebalance onto new replicas.
        ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
        ("grpc.max_connection_age_grace_ms", int(settings.grace_seconds * 1000)),
    ]


def _bind(server: grpc.Server, settings: ServerSettings) -> int:
    """The bound gRPC port, with TLS when certificates are set."""
    address = f"{settings.host}:{settings.port}"
    credentials = _server_credentials(settings)
    port = (
        server.add_secure_port(address, credentials)
        if credentials
        else server.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    return int(port)


def _health_servicer(registry: ModelRegistry, metrics: Metrics) -> health.HealthServicer:
    """NOT_SERVING for the server and every model until the registry reports them ready."""
    servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in (
        "",
        SERVICE_NAME,
        INFERENCE_SERVICE_NAME,
        *(e.spec.name for e in registry.entries()),
    ):
        servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    for entry in registry.entries():
        metrics.model_ready.labels(entry.spec.name).set(0.0)
    registry.add_listener(_health_updater(registry, servicer, metrics))
    return servicer


def _start_metrics(settings: ServerSettings, metrics: Metrics) -> tuple[Any, int | None]:
    """The Prometheus endpoint and its bound port; (None, None) when turned off."""
    if settings.metrics_port < 0:
        return None, None
    http, _thread = start_http_server(
        settings.metrics_port, addr=settings.host.strip("[]"), registry=metrics.registry
    )
    return http, int(http.server_port)


def _inverter_catalog(settings: ServerSettings) -> InverterCatalog:
    """The built-in inverters (with the built-in models) and those of inverters_dir."""
    roots = [BUILTIN_INVERTERS] if settings.builtin_models else []
    if settings.inverters_dir is not None:
        roots.append(settings.inverters_dir)
    return InverterCatalog(roots)


def _memory_budget(settings: ServerSettings, metrics: Metrics) -> MemoryBudget:
    """The server's budget defaults to half of what the process may use."""
    total = settings.server_memory_bytes or memory_limit_bytes() // 2
    per_request = settings.request_memory_bytes or total
    log.info("memory budget: %d MiB per request, %d MiB in all", per_request >> 20, total >> 20)
    trimmer = allocator.Trimmer(settings.malloc_trim_bytes)
    budget = MemoryBudget(per_request, total, settings.max_queue, trimmer)
    metrics.memory_reserved.set_function(lambda: float(budget.reserved))
    return budget


def _grpc_server(
    settings: ServerSettings, metrics: Metrics, registry: ModelRegistry
) -> grpc.Server:
    """The server with its thread pool and the interceptor every method passes through."""
    # Threads for every running and queued job plus headroom, so health checks and
    # cheap calls are answered even when the compute queue is full.
    threads = settings.max_running + settings.max_queue + settings.max_workers
    return grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="rpc", initializer=host_thread
        ),
        interceptors=[
            ServiceInterceptor(
                metrics,
                registry.label,
                settings.token(),
                StreamPolicy(
                    settings.stream_buffer_messages,
                    settings.slow_reader_seconds,
                    settings.stream_buffer_bytes,
                ),
            )
        ],
        options=_channel_options(settings),
    )


def _add_services(
    server: grpc.Server,
    settings: ServerSettings,
    registry: ModelRegistry,
    metrics: Metrics,
    health_servicer: health.HealthServicer,
) -> tuple[ComputeSlots, InspectorServicer]:
    """The Inspector and the inference protocol, sharing compute slots, the batchers and
    the memory budget; health and reflection beside them. Returns the slots and the
    Inspector (the explorer calls it in process)."""
    slots = ComputeSlots(settings.max_running, settings.max_queue, settings.torch_threads)
    limits = RequestLimits(settings.max_batch, settings.max_image_pixels, settings.max_result_bytes)
    batchers = create_batchers(settings, slots, limits, metrics)
    metrics.queued.set_function(lambda: float(slots.waiting))
    budget = _memory_budget(settings, metrics)
    activation_service = ActivationService(budget, batchers.activations, limits)
    servicer = InspectorServicer(
        registry,
        slots,
        metrics,
        limits,
        settings.effective_chunk_bytes,
        _inverter_catalog(settings),
        settings.image_roots,
        max_message_bytes=settings.max_message_bytes,
        batchers=batchers,
        budget=budget,
        activation_service=activation_service,
    )
    inspector_pb2_grpc.add_InspectorServicer_to_server(servicer, server)
    grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(registry, activation_service, metrics, settings.max_message_bytes),
        server,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            INFERENCE_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    return slots, servicer


def _display_host(host: str) -> str:
    """Where a browser on this machine reaches a server bound to `host`."""
    return "localhost" if host in ("0.0.0.0", "[::]", "::", "") else host


def create_server(settings: ServerSettings) -> RunningServer:
    """Builds and starts everything; models keep loading in the background."""
    if "MALLOC_ARENA_MAX" not in os.environ:  # before the server's threads allocate
        allocator.limit_arenas(settings.malloc_arena_max)
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    specs, default = model_specs(settings)
    registry = ModelRegistry(
        specs, default, resolve_device(settings.device), compiled=settings.compile_blocks
    )
    metrics = Metrics()
    metrics.watch_gpu_memory()
    health_servicer = _health_servicer(registry, metrics)
    server = _grpc_server(settings, metrics, registry)
    slots, inspector = _add_services(server, settings, registry, metrics, health_servicer)
    port = _bind(server, settings)
    metrics_http, metrics_port = _start_metrics(settings, metrics)
    explorer = start_explorer(settings, inspector, health_servicer)
    ui_port = explorer.port if explorer is not None else None
    server.start()
    registry.start()
    log.info(
        "vitscope serving on %s (metrics on %s); default model %s", port, metrics_port, default
    )
    if explorer is not None:
        log.info("explorer on http://%s:%d/", _display_host(settings.host), explorer.port)
    return RunningServer(
        server,
        port,
        metrics_port,
        registry,
        health_servicer,
        metrics,
        metrics_http,
        slots,
        ui_port,
        explorer,
    )


def serve(settings: ServerSettings) -> None:
    """Runs until SIGTERM or SIGINT, then drains: settings.drain_delay_seconds still
    accepting while health says NOT_SERVING, then settings.grace_seconds for calls in flight."""
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    running = create_server(settings)
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info(
            "signal %s: NOT_SERVING, accepting for %.1f s more, then draining for up to %.1f s",
            signal.Signals(signum).name,
            settings.drain_delay_seconds,
            settings.grace_seconds,
        )
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    if running.stop(settings.grace_seconds, settings.drain_delay_seconds):
        log.info("stopped")
        return
    # A load in progress would keep torch busy while the interpreter finalises,
    # which can abort; nothing is left to flush but the logs.
    log.warning("stopped while a model was still loading")
    logging.shutdown()
    os._exit(0)
