"""Typed Python client: numpy arrays out, one exception class per status code."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from vitscope import explain as explaining
from vitscope import interventions as intervening
from vitscope import inversion, projection
from vitscope import tensors as wire
from vitscope.enums import short_names
from vitscope.errors import from_rpc_error
from vitscope.features import (
    OPTIMIZERS,
    PARAMETERIZATIONS,
    SCHEDULES,
    Feature,
    OptimizationProgress,
    OptimizationResult,
    choice,
    parse_progress,
    parse_result,
)
from vitscope.handshake import (
    ServerInfo,
    parse_server_info,
    predates_handshake,
    require_compatible,
)
from vitscope.inversion import Inversion, InversionProgress, Inverter
from vitscope.sae import SaeEvaluation, SaeEvaluationProgress
from vitscope.sae import collect as collect_evaluation
from vitscope.selection import ClassLike, class_ref, token_selection
from vitscope.top_images import TopImages, parse_top_images
from vitscope.v1 import (
    activations_pb2,
    common_pb2,
    explain_pb2,
    interventions_pb2,
    inversion_pb2,
    models_pb2,
    projection_pb2,
    sae_pb2,
    server_info_pb2,
    tensor_pb2,
)
from vitscope.v1 import features_pb2 as fpb
from vitscope.v1 import inspector_pb2_grpc as pb_grpc

DEFAULT_TARGET = "localhost:50051"
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20

ImageLike = str | Path | bytes | Image.Image | np.ndarray

_REDUCTIONS = short_names(activations_pb2.Reduction)
_DTYPES = {
    "float32": tensor_pb2.DTYPE_FLOAT32,
    "float16": tensor_pb2.DTYPE_FLOAT16,
    "bfloat16": tensor_pb2.DTYPE_BFLOAT16,
}


_MAX_ATTEMPTS = 5  # gRPC's ceiling for a retry policy
_RETRIED_SERVICES = ("vitscope.v1.Inspector", "grpc.health.v1.Health")


def service_config(retries: int, load_balancing: str) -> str:
    """gRPC service config: the load-balancing policy, and a retry policy for
    UNAVAILABLE and RESOURCE_EXHAUSTED before any response arrived. The server's
    retry pushback decides: it names the delay for QUEUE_FULL and MODEL_LOADING and
    forbids retrying what cannot succeed (an image too large)."""
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    attempts = min(max(1, retries), _MAX_ATTEMPTS)
    if attempts > 1:
        config["methodConfig"] = [
            {
                "name": [{"service": service} for service in _RETRIED_SERVICES],
                "retryPolicy": {
                    "maxAttempts": attempts,
                    "initialBackoff": "0.25s",
                    "maxBackoff": "5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
                },
            }
        ]
    return json.dumps(config)


def image_message(image: ImageLike) -> common_pb2.Image:
    """Paths and bytes go as encoded files, PIL images as PNG, uint8 arrays as pixels,
    float arrays as already-preprocessed tensors."""
    if isinstance(image, (str, Path)):
        return common_pb2.Image(encoded=Path(image).read_bytes())
    if isinstance(image, bytes):
        return common_pb2.Image(encoded=image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return common_pb2.Image(encoded=buffer.getvalue())
    if image.dtype == np.uint8:
        return common_pb2.Image(pixels=wire.to_proto(image))
    return common_pb2.Image(preprocessed=wire.to_proto(np.asarray(image, dtype=np.float32)))


_GET_ACTIVATIONS = "/vitscope.v1.Inspector/GetActivations"
_CHUNK_FIELD = activations_pb2.GetActivationsResponse.DESCRIPTOR.fields_by_name["chunk"].number


@dataclass(frozen=True)
class Prediction:
    class_index: int
    class_name: str
    probability: float
    logit: float


@dataclass(frozen=True)
class SiteActivations:
    """One site's result. `values` shape depends on the reduction (see the proto)."""

    site: str
    module_path: str
    layout: str
    values: np.ndarray
    token_indices: list[int]
    grid: tuple[int, int]
    channels: list[int]
    channel_indices: np.ndarray | None = None


@dataclass(frozen=True)
class Activations:
    sites: dict[str, SiteActivations]
    predictions: list[list[Prediction]]
    provenance: dict[str, Any]
    parameters: dict[str, Any]

    def __getitem__(self, site: str) -> np.ndarray:
        return self.sites[site].values


@dataclass(frozen=True)
class ModelInfo:
    name: str
    family: str
    architecture: str
    state: str
    error: str
    weights_identity: str
    is_default: bool


@dataclass(frozen=True)
class ModelDescription:
    info: ModelInfo
    block_count: int
    embed_dim: int
    prefix_token_count: int
    grid: tuple[int, int]
    input_size: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Canonical sites (or model parts) the model does not serve -> why.
    unavailable_sites: dict[str, str] = field(default_factory=dict)
    # SAE name -> its site, widths, kind and recorded metrics (SaeInfo as a dict).
    saes: dict[str, dict[str, Any]] = field(default_factory=dict)


def _message_dict(message: Any) -> dict[str, Any]:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(message, preserving_proto_field_name=True)


def _model_info(summary: models_pb2.ModelSummary) -> ModelInfo:
    return ModelInfo(
        name=summary.name,
        family=summary.family,
        architecture=summary.architecture,
        state=models_pb2.ModelState.Name(summary.state).removeprefix("MODEL_STATE_").lower(),
        error=summary.error,
        weights_identity=summary.weights_identity,
        is_default=summary.is_default,
    )


def _nothing_to_close() -> None:
    return None


@dataclass(frozen=True)
class Stubs:
    """What a Client calls: the Inspector's methods, GetActivations with its responses left
    serialized (decoded by hand, see _chunk_of), the health service, and what closes them."""

    inspector: Any
    activations_raw: Any
    health: Any
    close: Callable[[], None] = _nothing_to_close


class Client:
    """Talks to one vitscope server.

    Args:
        target: "host:port".
        token: bearer token sent as 'authorization' metadata.
        tls: use TLS; with ca_cert (PEM path) for a private CA, and client_cert/client_key for mTLS.
        timeout: default deadline in seconds for each call.
        load_balancing: the gRPC policy; "round_robin" spreads calls over every address a
            target like "dns:///vitscope-headless:50051" resolves to.
        retries: attempts (at most 5) for calls that fail with UNAVAILABLE, or
            RESOURCE_EXHAUSTED the server says to retry, before any response; gRPC's retry
            policy backs off from 0.25 s within the call's timeout.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        tls: bool = False,
        ca_cert: str | Path | None = None,
        client_cert: str | Path | None = None,
        client_key: str | Path | None = None,
        timeout: float = 120.0,
        retries: int = 4,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        load_balancing: str = "round_robin",
    ) -> None:
        options: list[tuple[str, str | int]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_retries", 1),
            # gRPC keeps a request for retrying only up to this size (256 KiB by default).
            ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
            ("grpc.service_config", service_config(retries, load_balancing)),
            ("grpc.service_config_disable_resolution", 1),
            # Streams are read on the calling thread: no helper thread started per call.
            (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1),
        ]
        if tls or ca_cert or client_cert:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(ca_cert).read_bytes() if ca_cert else None,
                private_key=Path(client_key).read_bytes() if client_key else None,
                certificate_chain=Path(client_cert).read_bytes() if client_cert else None,
            )
            channel = grpc.secure_channel(target, credentials, options=options)
        else:
            channel = grpc.insecure_channel(target, options=options)
        raw = channel.unary_stream(
            _GET_ACTIVATIONS,
            request_serializer=activations_pb2.GetActivationsRequest.SerializeToString,
        )
        stubs = Stubs(
            pb_grpc.InspectorStub(channel), raw, health_pb2_grpc.HealthStub(channel), channel.close
        )
        self._attach(stubs, token, timeout)
        self._channel = channel

    @classmethod
    def over(cls, stubs: Stubs, *, token: str | None = None, timeout: float = 120.0) -> Client:
        """A client calling `stubs` instead of a channel of its own, e.g. a server's servicer
        called in process."""
        client = cls.__new__(cls)
        client._attach(stubs, token, timeout)
        return client

    def _attach(self, stubs: Stubs, token: str | None, timeout: float) -> None:
        self._stubs = stubs
        self._stub = stubs.inspector
        self._activations_raw = stubs.activations_raw
        self._health = stubs.health
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def close(self) -> None:
        self._stubs.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def _stream(self, method: Any, request: Any, timeout: float | None) -> Iterator[Any]:
        try:
            yield from method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """SERVING or NOT_SERVING for the server ("") or one model (its name)."""
        response = self._call(
            self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout
        )
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))

    def server_info(self, timeout: float | None = None) -> ServerInfo:
        """The server's protocol and package versions, models, methods and limits."""
        try:
            response = self._stub.GetServerInfo(
                server_info_pb2.GetServerInfoRequest(),
                timeout=timeout or self.timeout,
                metadata=self._metadata,
            )
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise predates_handshake() from None
            raise from_rpc_error(exc) from None
        return parse_server_info(response)

    def check_compatible(self, timeout: float | None = None) -> ServerInfo:
        """server_info, raising IncompatibleServerError (naming both versions) when this
        client cannot use the server."""
        return require_compatible(self.server_info(timeout))

    def list_models(self, timeout: float | None = None) -> list[ModelInfo]:
        response = self._call(self._stub.ListModels, models_pb2.ListModelsRequest(), timeout)
        return [_model_info(m) for m in response.models]

    def describe(self, model: str = "", timeout: float | None = None) -> ModelDescription:
        r = self._call(
            self._stub.DescribeModel, models_pb2.DescribeModelRequest(model=model), timeout
        )
        return ModelDescription(
            info=_model_info(r.summary),
            block_count=r.block_count,
            embed_dim=r.embed_dim,
            prefix_token_count=r.prefix_token_count,
            grid=(r.grid_height, r.grid_width),
            input_size=tuple(r.preprocessing.input_size),
            mean=tuple(r.preprocessing.mean),
            std=tuple(r.preprocessing.std),
            class_names=list(r.class_names),
            sites={s.name: _message_dict(s) for s in r.sites},
            unavailable_sites={u.site: u.reason for u in r.unavailable_sites},
            saes={s.name: _message_dict(s) for s in r.saes},
        )

    def activations(
        self,
        images: Sequence[ImageLike],
        sites: Sequence[str],
        *,
        model: str = "",
        tokens: str | None = None,
        indices: Sequence[int] = (),
        positions: Sequence[tuple[int, int]] = (),
        reduction: str = "none",
        channels: Sequence[int] = (),
        top_k: int = 0,
        dtype: str = "float32",
        top_predictions: int = 0,
        compute_dtype: str = "float32",
        timeout: float | None = None,
    ) -> Activations:
        """Activations at `sites` for `images`.

        tokens: all | prefix | patches | indices | positions (default: all without a
        reduction, patches with one). reduction: none | mean | patch_map | top_channels.
        dtype: float32 | float16 | bfloat16 (bfloat16 arrives as float32 values).
        compute_dtype: the forward's precision, float32 | float16 | bfloat16 (autocast).
        """
        request = activations_pb2.GetActivationsRequest(
            model=model,
            images=[image_message(i) for i in images],
            sites=list(sites),
            tokens=token_selection(tokens, indices, positions),
            reduction=_REDUCTIONS[reduction],
            channels=list(channels),
            top_k=top_k,
            output_dtype=_DTYPES[dtype],
            top_predictions=top_predictions,
            compute_dtype=_DTYPES[compute_dtype],
        )
        return self._collect(self._stream(self._activations_raw, request, timeout))

    @staticmethod
    def _collect(responses: Iterator[bytes]) -> Activations:
        header: activations_pb2.ActivationHeader | None = None
        assembler = wire.ChunkAssembler()
        for raw in responses:
            chunk = wire.decode_tensor_message(_CHUNK_FIELD, raw)
            if chunk is not None:
                assembler.add(*chunk)
                continue
            response = activations_pb2.GetActivationsResponse.FromString(raw)
            if response.HasField("header"):
                header = response.header
            else:
                assembler.add(response.chunk)
        if header is None:
            raise wire.TensorDecodeError("the stream ended without a header")
        tensors = assembler.result()
        sites = {}
        for s in header.sites:
            sites[s.site] = SiteActivations(
                site=s.site,
                module_path=s.module_path,
                layout=models_pb2.SiteLayout.Name(s.layout).removeprefix("SITE_LAYOUT_").lower(),
                values=tensors[(s.site, "values")],
                token_indices=list(s.token_indices),
                grid=(s.grid_height, s.grid_width),
                channels=list(s.channels),
                channel_indices=tensors.get((s.site, "channel_indices")),
            )
        predictions = [
            [
                Prediction(p.class_index, p.class_name, p.probability, p.logit)
                for p in image.predictions
            ]
            for image in header.predictions
        ]
        return Activations(
            sites=sites,
            predictions=predictions,
            provenance=_message_dict(header.provenance),
            parameters=_message_dict(header.parameters),
        )

    def optimize_features_stream(
        self,
        features: Sequence[Feature | tuple[str, int]],
        *,
        model: str = "",
        steps: int | None = None,
        learning_rate: float | None = None,
        tv_weight: float | None = None,
        copies: int | None = None,
        jitter: int | None = None,
        image_size: int | None = None,
        parameterization: str | None = None,
        schedule: str | None = None,
        optimizer: str | None = None,
        seed: int = 0,
        progress_every: int = 0,
        preview: bool = False,
        timeout: float | None = None,
    ) -> Iterator[OptimizationProgress | OptimizationResult]:
        """Feature visualization, yielding progress every `progress_every` steps, then the result.

        features: Feature objects or (site, channel) pairs, optimized together in one batch.
        Unset hyperparameters take the paper's defaults (400 steps, lr 0.1 for timm ViTs and
        1.0 for CLIP towers, TV weight 0.0005, 8 copies, jitter 32 px at 224 px, the model's input size,
        parameterization "pixel" (or "fourier"), schedule "cosine" (or "constant"), optimizer
        "adam" (or "adamax")).
        """
        request = fpb.OptimizeFeaturesRequest(
            model=model,
            features=[
                (f if isinstance(f, Feature) else Feature(f[0], f[1])).message() for f in features
            ],
            parameters=fpb.OptimizationParameters(
                steps=steps,
                learning_rate=learning_rate,
                tv_weight=tv_weight,
                copies=copies,
                jitter=jitter,
                image_size=image_size,
                parameterization=choice(
                    PARAMETERIZATIONS,
                    parameterization,
                    "parameterization",
                    fpb.IMAGE_PARAMETERIZATION_UNSPECIFIED,
                ),
                schedule=choice(
                    SCHEDULES, schedule, "schedule", fpb.LEARNING_RATE_SCHEDULE_UNSPECIFIED
                ),
                optimizer=choice(
                    OPTIMIZERS, optimizer, "optimizer", fpb.FEATURE_OPTIMIZER_UNSPECIFIED
                ),
            ),
            seed=seed,
            progress_every=progress_every,
            preview=preview,
        )
        for response in self._stream(self._stub.OptimizeFeatures, request, timeout):
            if response.HasField("progress"):
                yield parse_progress(response.progress)
            else:
                yield parse_result(response.result)

    def optimize_features(
        self,
        features: Sequence[Feature | tuple[str, int]],
        *,
        on_progress: Callable[[OptimizationProgress], object] | None = None,
        **options: Any,
    ) -> OptimizationResult:
        """optimize_features_stream, returning the result; progress goes to on_progress."""
        result = None
        for event in self.optimize_features_stream(features, **options):
            if isinstance(event, OptimizationResult):
                result = event
            elif on_progress is not None:
                on_progress(event)
        if result is None:
            raise wire.TensorDecodeError("the stream ended without a result")
        return result

    def top_activating_images(
        self,
        site: str,
        channels: Sequence[int],
        *,
        images: Sequence[ImageLike] = (),
        image_folder: str = "",
        top_k: int = 5,
        model: str = "",
        batch: int = 32,
        timeout: float | None = None,
    ) -> TopImages:
        """The top_k images per channel by mean activation over patch tokens, with patch maps.

        images are streamed `batch` per message and numbered from 0; image_folder instead names
        a folder under one of the server's allowed image roots.
        """

        def requests() -> Iterator[activations_pb2.TopActivatingImagesRequest]:
            yield activations_pb2.TopActivatingImagesRequest(
                model=model,
                site=site,
                channels=list(channels),
                top_k=top_k,
                image_folder=image_folder,
            )
            for start in range(0, len(images), batch):
                part = images[start : start + batch]
                yield activations_pb2.TopActivatingImagesRequest(
                    images=[image_message(i) for i in part]
                )

        try:
            response = self._stub.TopActivatingImages(
                requests(), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        return parse_top_images(response)

    # Class-embedding projection (Vilas et al. 2023).

    def project(
        self,
        images: Sequence[ImageLike],
        *,
        model: str = "",
        targets: Sequence[ClassLike] = (),
        representations: Sequence[str] = (),
        blocks: Sequence[int] = (),
        tokens: str | None = None,
        indices: Sequence[int] = (),
        positions: Sequence[tuple[int, int]] = (),
        top_k: int = 0,
        importance_maps: bool = False,
        class_names: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        evaluate_importance: bool = False,
        keep_counts: Sequence[int] = (),
        evaluation_seed: int = 0,
        timeout: float | None = None,
    ) -> projection.ClassProjection:
        """Tokens projected to class space, per block.

        targets: none, or one per image (class index, class name or None for the model's
        prediction). representations: residual | attention | mlp (default all).
        tokens: all (default) | prefix | patches | indices | positions.
        class_names / templates: an open_clip tower's label set (default: ImageNet).
        evaluate_importance (with importance_maps): accuracy when keeping the prefix tokens
        plus the top-n patch tokens, n in keep_counts (default 0, 1, 2, 4, ..., all), by
        importance and in a random order seeded with evaluation_seed.
        """
        request = projection_pb2.ProjectToClassSpaceRequest(
            model=model,
            images=[image_message(i) for i in images],
            targets=[class_ref(t) for t in targets],
            representations=[projection.REPRESENTATIONS[r] for r in representations],
            blocks=list(blocks),
            tokens=token_selection(tokens, indices, positions),
            top_k=top_k,
            importance_maps=importance_maps,
            labels=projection.label_set(class_names, templates),
            evaluate_importance=evaluate_importance,
            keep_counts=list(keep_counts),
            evaluation_seed=evaluation_seed,
        )
        return projection.collect_projection(
            self._stream(self._stub.ProjectToClassSpace, request, timeout)
        )

    def project_memories(
        self,
        block: int,
        *,
        model: str = "",
        kinds: Sequence[str] = (),
        top_k: int = 0,
        cosine: bool = False,
        images: Sequence[ImageLike] = (),
        targets: Sequence[ClassLike] = (),
        class_names: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        timeout: float | None = None,
    ) -> projection.Memories:
        """A block's key-value memories in class space; kinds: mlp | attention (default both)."""
        request = projection_pb2.ProjectMemoriesRequest(
            model=model,
            block=block,
            kinds=[projection.MEMORY_KINDS[k] for k in kinds],
            top_k=top_k,
            cosine=cosine,
            images=[image_message(i) for i in images],
            targets=[class_ref(t) for t in targets],
            labels=projection.label_set(class_names, templates),
        )
        return projection.parse_memories(self._call(self._stub.ProjectMemories, request, timeout))

    def invert(
        self,
        images: Sequence[ImageLike] = (),
        depths: Sequence[int] = (),
        *,
        method: str = "learned",
        representation: np.ndarray | None = None,
        representation_depth: int = 0,
        model: str = "",
        steps: int | None = None,
        learning_rate: float | None = None,
        tv_weight: float | None = None,
        seed: int = 0,
        progress_every: int | None = None,
        on_progress: Callable[[InversionProgress], None] | None = None,
        timeout: float | None = None,
    ) -> Inversion:
        """Images back from representations at `depths` (0 = embed, k = blocks.{k-1}.out).

        Either `images` and `depths` (the server computes the representations), or a
        `representation` [batch, tokens, width] at `representation_depth`, with `images`
        as optional originals to score against. method: learned | optimization; the
        optimization settings left at None take the server's defaults.
        """
        request = inversion_pb2.InvertRequest(
            model=model,
            method=inversion.METHODS[method],
            images=[image_message(i) for i in images],
            depths=list(depths),
            optimization=inversion.optimization_message(
                steps, learning_rate, tv_weight, seed, progress_every
            ),
        )
        if representation is not None:
            request.representation.CopyFrom(
                inversion.representation_message(representation, representation_depth)
            )
        return inversion.collect(self._stream(self._stub.Invert, request, timeout), on_progress)

    def list_inverters(self, model: str = "", timeout: float | None = None) -> list[Inverter]:
        """Trained inverters per served model (empty model: all models), as read when the
        server started: stores added or retrained since are listed after a restart."""
        response = self._call(
            self._stub.ListInverters, inversion_pb2.ListInvertersRequest(model=model), timeout
        )
        return [inversion.inverter(i) for i in response.inverters]

    # Sparse autoencoders (docs/sae.md): their latents are sites; EvaluateSae measures one.

    def evaluate_sae(
        self,
        images: Sequence[ImageLike],
        sae: str,
        *,
        model: str = "",
        labels: Sequence[int] = (),
        batch: int | None = None,
        quality_only: bool = False,
        on_progress: Callable[[SaeEvaluationProgress], object] | None = None,
        timeout: float | None = None,
    ) -> SaeEvaluation:
        """The SAE's FVU, L0, dead and dense latents and frequency histogram on `images`, and
        (unless quality_only) what splicing its reconstruction does to the model's output."""
        request = sae_pb2.EvaluateSaeRequest(
            model=model,
            sae=sae,
            images=[image_message(i) for i in images],
            labels=list(labels),
            batch=batch,
            quality_only=quality_only,
        )
        return collect_evaluation(
            self._stream(self._stub.EvaluateSae, request, timeout), on_progress
        )

    # Explanations: attribution maps with their faithfulness (docs/methods.md section 5).

    def explain(
        self,
        images: Sequence[ImageLike],
        methods: Sequence[str] = ("rollout", "relevancy", "integrated_gradients"),
        *,
        model: str = "",
        targets: Sequence[ClassLike | explaining.Prompt] = (),
        options: dict[str, explaining.MethodOptions] | None = None,
        class_names: Sequence[str] | None = None,
        templates: Sequence[str] | None = None,
        faithfulness: bool = False,
        patches_per_step: int | None = None,
        blur_sigma: float | None = None,
        seed: int = 0,
        on_progress: Callable[[explaining.ExplainProgress], object] | None = None,
        timeout: float | None = None,
    ) -> explaining.Explanation:
        """Attribution maps of each image's target by each method.

        methods: rollout | relevancy | integrated_gradients (ig) | class_embedding |
        feature_map. targets: none, or one per image (class index, class name, None for the
        prediction, or Prompt(text) for an open_clip tower). options: per method name, its
        parameters (MethodOptions). class_names / templates: an open_clip label set.
        faithfulness: deletion and insertion curves per map and for a random order seeded
        with `seed`, `patches_per_step` patches a step, insertion starting from the image
        blurred with `blur_sigma` (None: the server's defaults).
        """
        request = explain_pb2.ExplainRequest(
            model=model,
            images=[image_message(i) for i in images],
            targets=[explaining.target_message(t) for t in targets],
            methods=explaining.method_requests(methods, options or {}),
            labels=projection.label_set(class_names, templates),
        )
        if faithfulness:
            request.faithfulness.CopyFrom(
                explaining.faithfulness_message(patches_per_step, blur_sigma, seed)
            )
        return explaining.collect(self._stream(self._stub.Explain, request, timeout), on_progress)

    # Interventions: ablate, patch and steer, and sweeps of them (docs/methods.md section 7).

    def intervene(
        self,
        images: Sequence[ImageLike],
        variants: Sequence[interventions_pb2.Variant] = (),
        *,
        model: str = "",
        source_images: Sequence[ImageLike] = (),
        reference_images: Sequence[ImageLike] = (),
        sweep: interventions_pb2.Sweep | None = None,
        metric: str | None = None,
        target: ClassLike = None,
        other: ClassLike = None,
        top_k: int = 0,
        classes: Sequence[ClassLike] = (),
        logits: bool = False,
        sites: Sequence[str] = (),
        tokens: str | None = None,
        reduction: str | None = None,
        channels: Sequence[int] = (),
        top_channels: int = 0,
        variants_per_forward: int | None = None,
        on_progress: Callable[[intervening.Progress], object] | None = None,
        timeout: float | None = None,
    ) -> intervening.Intervention:
        """Each variant (interventions.variant([interventions.edit(...), ...])) run on the
        images, or a declared sweep; per variant its metric (metric: logit_difference |
        target_probability | kl, between `target` and `other`), top-k predictions, the
        chosen classes' logits, the whole output (`logits`) and `sites` read after the
        edits with the token selection and reduction of GetActivations (channels for a
        patch map, top_channels for top channels)."""
        request = interventions_pb2.InterveneRequest(
            model=model,
            images=[image_message(i) for i in images],
            source_images=[image_message(i) for i in source_images],
            reference_images=[image_message(i) for i in reference_images],
            variants=list(variants),
            metric=intervening.metric_message(metric, target, other),
            outputs=interventions_pb2.InterventionOutputs(
                top_k=top_k,
                classes=[class_ref(c) for c in classes],
                logits=logits,
                sites=list(sites),
                tokens=token_selection(tokens),
                reduction=_REDUCTIONS[reduction or "none"],
                channels=list(channels),
                top_channels=top_channels,
            ),
            variants_per_forward=variants_per_forward,
        )
        if sweep is not None:
            request.sweep.CopyFrom(sweep)
        return intervening.collect(
            self._stream(self._stub.Intervene, request, timeout), on_progress
        )

    def patching_sweep(
        self,
        base: Sequence[ImageLike],
        source: Sequence[ImageLike],
        *,
        part: str = "out",
        blocks: Sequence[int] = (),
        **options: Any,
    ) -> intervening.Intervention:
        """Activation patching of blocks.{i}.{part} (residual: out) at every block and patch
        position from source into base: values and normalized are [images, blocks,
        grid_h, grid_w]. options: as intervene's (metric, target, other, model...)."""
        sweep = interventions_pb2.Sweep(
            kind=interventions_pb2.SWEEP_KIND_PATCH_POSITIONS,
            part=intervening.PARTS.get(part, part),
            blocks=list(blocks),
        )
        return self.intervene(base, source_images=source, sweep=sweep, **options)

    def head_sweep(
        self,
        images: Sequence[ImageLike],
        *,
        operation: str = "zero",
        blocks: Sequence[int] = (),
        **options: Any,
    ) -> intervening.Intervention:
        """Each head of every block zeroed (or mean-ablated, or patched) alone: values are
        [images, blocks, heads]."""
        sweep = interventions_pb2.Sweep(
            kind=interventions_pb2.SWEEP_KIND_HEADS,
            operation=intervening.OPERATIONS[operation],
            blocks=list(blocks),
        )
        return self.intervene(images, sweep=sweep, **options)
