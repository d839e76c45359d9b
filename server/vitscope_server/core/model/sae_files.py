"""SAE files in SAELens's layout: `cfg.json`, `sae_weights.safetensors` and, optionally,
`sparsity.safetensors` (log10 firing frequency per latent).

The config's `metadata.hook_name` is the vitscope site the SAE reads; `metadata.vitscope`
holds the provenance (model, weights, dataset manifest, recipe, seed, versions) and the
metrics measured when it was trained. A training-time input scale is folded into the
weights before saving (as SAELens does), so `normalize_activations` is "none" and either
side's encode of the same file gives the same codes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vitscope_server.core.model.sae import SaeInfo, SaeKind, ServedSae, SparseAutoencoder
from vitscope_server.core.runtime.atomic_files import write_atomically, write_text_atomically
from vitscope_server.core.runtime.errors import FailedPrecondition, Reason

SAE_CONFIG = "cfg.json"
SAE_WEIGHTS = "sae_weights.safetensors"
SAE_SPARSITY = "sparsity.safetensors"
# The SAELens file-format revision these files follow (its loaders read the layout by it).
SAELENS_FORMAT_VERSION = "6.0.0"
SAE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
# SAELens architecture name -> how vitscope encodes it.
_ARCHITECTURES = {"standard": SaeKind.RELU, "topk": SaeKind.TOPK, "jumprelu": SaeKind.JUMPRELU}
_SAELENS_NAMES = {kind: name for name, kind in _ARCHITECTURES.items()}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SaeFile:
    """An SAE as read from disk: its module, its site and its config's metadata."""

    module: SparseAutoencoder
    site: str
    config: dict[str, Any]

    @property
    def vitscope(self) -> dict[str, Any]:
        """The provenance and metrics vitscope recorded (empty for SAEs written elsewhere)."""
        value = self.config.get("metadata", {}).get("vitscope", {})
        return value if isinstance(value, dict) else {}


def _unusable(folder: Path, what: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"SAE {folder}: {what}", reason=Reason.WEIGHTS_UNUSABLE, subject=str(folder)
    )


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / SAE_CONFIG).read_text())
    except OSError as exc:
        raise _unusable(folder, f"{SAE_CONFIG} cannot be read: {exc.strerror}") from exc
    except json.JSONDecodeError as exc:
        raise _unusable(folder, f"{SAE_CONFIG} is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise _unusable(folder, f"{SAE_CONFIG} is not a JSON object")
    return config


def _kind(folder: Path, config: dict[str, Any]) -> SaeKind:
    architecture = config.get("architecture", "standard")
    if architecture not in _ARCHITECTURES:
        raise _unusable(
            folder,
            f"architecture {architecture!r} is not served; allowed: {sorted(_ARCHITECTURES)}",
        )
    if config.get("normalize_activations", "none") != "none":
        raise _unusable(
            folder,
            f"normalize_activations {config['normalize_activations']!r}: only 'none' is "
            "served (fold a constant input scale into the weights)",
        )
    reshaped = config.get("reshape_activations", "none") != "none"
    if config.get("rescale_acts_by_decoder_norm") or reshaped:
        raise _unusable(
            folder, "rescale_acts_by_decoder_norm and reshape_activations are unsupported"
        )
    return _ARCHITECTURES[architecture]


def read_sae(folder: Path) -> SaeFile:
    """The SAE in `folder`, in float32 on the CPU; its site is `metadata.hook_name`."""
    config = _read_config(folder)
    kind = _kind(folder, config)
    site = config.get("metadata", {}).get("hook_name") or config.get("hook_name")
    if not isinstance(site, str) or not site:
        raise _unusable(folder, "metadata.hook_name (the site the SAE reads) is missing")
    try:
        tensors = load_file(folder / SAE_WEIGHTS)
    except (OSError, SafetensorError) as exc:
        raise _unusable(folder, f"{SAE_WEIGHTS} cannot be read: {exc}") from exc
    try:
        d_in, d_sae = int(config["d_in"]), int(config["d_sae"])
        module = SparseAutoencoder(
            d_in,
            d_sae,
            kind,
            k=int(config.get("k", 0)) if kind is SaeKind.TOPK else 0,
            apply_b_dec_to_input=bool(config.get("apply_b_dec_to_input", True)),
        )
        state = {name: value.float() for name, value in tensors.items()}
        if kind is not SaeKind.JUMPRELU:
            state.setdefault("threshold", torch.zeros(d_sae))
        module.load_state_dict(state, strict=True)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise _unusable(folder, f"weights do not match {SAE_CONFIG}: {exc}") from exc
    return SaeFile(module.eval().requires_grad_(False), site, config)


def write_sae(
    folder: Path,
    module: SparseAutoencoder,
    site: str,
    vitscope: dict[str, Any],
    log_frequency: torch.Tensor | None = None,
) -> None:
    """Writes the SAE (float32) in SAELens's layout; `vitscope` is kept as metadata.vitscope."""
    config: dict[str, Any] = {
        "architecture": _SAELENS_NAMES[module.kind],
        "d_in": module.d_in,
        "d_sae": module.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": module.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": SAELENS_FORMAT_VERSION,
            "hook_name": site,
            "model_name": vitscope.get("model", ""),
            "vitscope": vitscope,
        },
    }
    if module.kind is SaeKind.TOPK:
        config["k"] = module.k
        config["rescale_acts_by_decoder_norm"] = False
    names = ["W_enc", "b_enc", "W_dec", "b_dec"]
    if module.kind is SaeKind.JUMPRELU:
        names.append("threshold")
    state = {n: getattr(module, n).detach().float().cpu().contiguous() for n in names}
    write_atomically(folder / SAE_WEIGHTS, lambda temp: save_file(state, str(temp)))
    if log_frequency is not None:
        sparsity = {"sparsity": log_frequency.detach().float().cpu().contiguous()}
        write_atomically(folder / SAE_SPARSITY, lambda temp: save_file(sparsity, str(temp)))
    write_text_atomically(folder / SAE_CONFIG, json.dumps(config, indent=1))


def served_sae(name: str, folder: Path, device: torch.device) -> ServedSae:
    """An SAE file loaded for serving under `name`, on the model's device."""
    if not SAE_NAME.match(name):
        raise FailedPrecondition(
            f"SAE name {name!r}: use letters, digits, '_' and '-' (not starting with '_' or '-')",
            reason=Reason.WEIGHTS_UNUSABLE,
            subject=name,
        )
    sae = read_sae(folder)
    recorded = sae.vitscope
    metrics = recorded.get("metrics", {})
    info = SaeInfo(
        name=name,
        site=sae.site,
        d_in=sae.module.d_in,
        d_sae=sae.module.d_sae,
        kind=sae.module.kind,
        k=sae.module.k,
        trained_as=str(recorded.get("recipe", {}).get("kind", sae.config.get("architecture"))),
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        path=str(folder),
    )
    return ServedSae(info, sae.module.to(device))
