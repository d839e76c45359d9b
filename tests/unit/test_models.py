"""Model specs and weights: random, local files, missing files, the hub offline, loading states."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from huggingface_hub import constants as hub_constants
from safetensors.torch import save_file

from vitscope_server.core.activations.compute import (
    ActivationQuery,
    get_activations,
    prepare_activations,
)
from vitscope_server.core.model.images import ImageInput
from vitscope_server.core.model.loading import load_model
from vitscope_server.core.model.registry import ModelRegistry, ModelState
from vitscope_server.core.model.specs import ModelSpec, load_models_file, parse_model_flag
from vitscope_server.core.model.weights import file_digest
from vitscope_server.core.runtime.cancel import NEVER_CANCELLED
from vitscope_server.core.runtime.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from vitscope_server.core.runtime.limits import RequestLimits
from vitscope_server.model_selection import select_spec
from vitscope_server.settings import ServerSettings

CPU = torch.device("cpu")


def _trained_like_state(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return timm.create_model("test_vit", pretrained=False).state_dict()


def _first_block_output(spec: ModelSpec, pixels: np.ndarray) -> np.ndarray:
    loaded = load_model(spec, CPU)
    defaults = ServerSettings()
    limits = RequestLimits(defaults.max_batch, defaults.max_image_pixels, defaults.max_result_bytes)
    query = ActivationQuery(sites=("blocks.0.out",))
    prepared = prepare_activations(loaded, [ImageInput(preprocessed=pixels)], query, limits)
    result = get_activations(prepared, NEVER_CANCELLED, limits)
    return result.sites[0].tensors[0].array


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_from_a_local_file(tmp_path: Path, suffix: str) -> None:
    state = _trained_like_state(seed=123)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"state_dict": state}, path)
    spec = ModelSpec(name="local", architecture="test_vit", weights=f"file:{path}")
    loaded = load_model(spec, CPU)
    assert loaded.weights_identity == file_digest(path)
    reference = timm.create_model("test_vit", pretrained=False)
    reference.load_state_dict(state)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.adapter.root.state_dict()[name], tensor), name


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": _trained_like_state(0), "extra": object()}, path)
    with pytest.raises(FailedPrecondition, match="weights_only=True"):
        load_model(ModelSpec(name="evil", architecture="test_vit", weights=f"file:{path}"), CPU)


def test_weights_that_do_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    torch.manual_seed(0)
    save_file(timm.create_model("vit_tiny_patch16_224", depth=1).state_dict(), str(path))
    with pytest.raises(FailedPrecondition, match="does not fit the architecture"):
        load_model(ModelSpec(name="m", architecture="test_vit", weights=f"file:{path}"), CPU)


def test_missing_weights_file_names_the_file() -> None:
    with pytest.raises(FailedPrecondition, match=r"/no/such/weights\.safetensors"):
        load_model(
            ModelSpec(
                name="m", architecture="test_vit", weights="file:/no/such/weights.safetensors"
            ),
            CPU,
        )


def _count_connections(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Every address connected to from now on (the real connection is still made)."""
    attempts: list[tuple[str, int]] = []
    connect = socket.create_connection

    def counted(address: tuple[str, int], *args: Any, **kwargs: Any) -> socket.socket:
        attempts.append(address)
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", counted)
    return attempts


def test_hub_weights_offline_fail_without_touching_the_network(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert hub_constants.HF_HUB_OFFLINE, "conftest sets HF_HUB_OFFLINE=1 before any import"
    attempts = _count_connections(monkeypatch)
    with pytest.raises(FailedPrecondition, match="hub"):
        load_model(ModelSpec(name="m", architecture="vit_tiny_patch16_224", weights="hub"), CPU)
    assert attempts == []


def test_hub_unreachable_without_offline_mode_fails_after_one_probe(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The probe goes to the hub library's own endpoint (HF_ENDPOINT), once, with no retries."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "https://hub.invalid")
    attempts = _count_connections(monkeypatch)
    with pytest.raises(FailedPrecondition, match=r"hub\.invalid, which is unreachable"):
        load_model(
            ModelSpec(name="m", family="open_clip", architecture="ViT-B-32", weights="hub:openai"),
            CPU,
        )
    assert attempts == [("hub.invalid", 443)]


def test_same_seed_same_random_weights() -> None:
    pixels = np.random.default_rng(0).standard_normal((3, 160, 160)).astype(np.float32)
    first = _first_block_output(ModelSpec(name="a", architecture="test_vit", seed=5), pixels)
    again = _first_block_output(ModelSpec(name="b", architecture="test_vit", seed=5), pixels)
    other = _first_block_output(ModelSpec(name="c", architecture="test_vit", seed=6), pixels)
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)


def test_registry_states() -> None:
    specs = [
        ModelSpec(name="ok", architecture="test_vit"),
        ModelSpec(name="broken", architecture="test_vit", weights="file:/missing.safetensors"),
    ]
    registry = ModelRegistry(specs, "ok", CPU)
    with pytest.raises(Unavailable, match="still loading"):
        registry.get("ok")
    seen: list[tuple[str, ModelState]] = []
    registry.add_listener(lambda name, state: seen.append((name, state)))
    registry.start()
    assert registry.wait_until_settled(60)
    assert registry.get("").spec.name == "ok"
    with pytest.raises(FailedPrecondition, match=r"/missing\.safetensors"):
        registry.get("broken")
    with pytest.raises(NotFound):
        registry.get("absent")
    assert ("ok", ModelState.READY) in seen and ("broken", ModelState.FAILED) in seen
    registry.shutdown()


def test_registry_rejects_duplicate_or_unknown_default() -> None:
    spec = ModelSpec(name="x", architecture="test_vit")
    with pytest.raises(InvalidArgument) as caught:
        ModelRegistry([spec, spec], "x", CPU)
    assert caught.value.field == "models"
    with pytest.raises(InvalidArgument) as caught:
        ModelRegistry([spec], "y", CPU)
    assert caught.value.field == "default_model"


def test_models_file_and_flags(tmp_path: Path) -> None:
    (tmp_path / "w.safetensors").write_bytes(b"")
    path = tmp_path / "models.yaml"
    path.write_text(
        "default: b\nmodels:\n  - {name: a, architecture: test_vit}\n  - {name: b, architecture: test_vit, weights: 'file:w.safetensors'}\n"
    )
    parsed = load_models_file(path)
    assert parsed.default == "b"
    assert parsed.models[1].weights_file == tmp_path / "w.safetensors"
    flag = parse_model_flag("clip=open_clip:ViT-B-32@hub:openai")
    assert (flag.family, flag.architecture, flag.hub_tag) == ("open_clip", "ViT-B-32", "openai")
    with pytest.raises(InvalidArgument, match="NAME=FAMILY"):
        parse_model_flag("nonsense")
    path.write_text("models:\n  - {name: a, architecture: test_vit, weights: 'ftp://x'}\n")
    with pytest.raises(InvalidArgument, match="weights must be"):
        load_models_file(path)


def test_batch_commands_see_the_models_serve_would(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Job configured through VITSCOPE_* finds the same models as `vitscope-server serve`."""
    monkeypatch.setenv("VITSCOPE_MODELS", '["envvit=timm:test_vit@random"]')
    assert select_spec("envvit", None, []).architecture == "test_vit"
    flagged = select_spec("flagged", None, ["flagged=timm:test_vit@random"])
    assert flagged.name == "flagged"
    with pytest.raises(NotFound, match="envvit"):
        select_spec("envvit", None, ["flagged=timm:test_vit@random"])
