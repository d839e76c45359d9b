"""The built-in digits ViTs: their architecture, preprocessing and where their weights live.

`vitscope-digits` reads its prediction at the class token; `vitscope-digits-gap` is the same
network pooled by global average over patch tokens (no class token), the other design the
class-projection paper analyzes. Each has an untrained random twin as the control.

Training (`vitscope-server train-classifier`) and serving both read this module,
so the served model is exactly the trained one.
"""

from __future__ import annotations

from pathlib import Path

from vitscope_server.core.model.specs import ModelSpec, SaeSource

BUILTIN_DIR = Path(__file__).resolve().parent
DIGITS_WEIGHTS = BUILTIN_DIR / "vitscope-digits.safetensors"
# Trained inverter stores of the built-in models, one folder per model.
BUILTIN_INVERTERS = BUILTIN_DIR / "inverters"
# Trained SAEs of the built-in models: saes/MODEL/NAME/cfg.json (saes/SAE_CARD.md).
BUILTIN_SAES = BUILTIN_DIR / "saes"
DIGITS_NAME = "vitscope-digits"
DIGITS_RANDOM_NAME = "vitscope-digits-random"
DIGITS_GAP_WEIGHTS = BUILTIN_DIR / "vitscope-digits-gap.safetensors"
DIGITS_GAP_NAME = "vitscope-digits-gap"
DIGITS_GAP_RANDOM_NAME = "vitscope-digits-gap-random"

DIGITS_ARCHITECTURE = "vit_tiny_patch16_224"
DIGITS_KWARGS: dict[str, object] = {
    "img_size": 28,
    "patch_size": 4,
    "in_chans": 3,
    "embed_dim": 64,
    "depth": 6,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "num_classes": 10,
    "class_token": True,
    "global_pool": "token",
}
# How each built-in reads its prediction: at the class token, or averaged over patch tokens.
POOLING: dict[str, dict[str, object]] = {
    "token": {"class_token": True, "global_pool": "token"},
    "avg": {"class_token": False, "global_pool": "avg"},
}
# MNIST pixel statistics, replicated over the three input channels.
DIGITS_MEAN = (0.1307, 0.1307, 0.1307)
DIGITS_STD = (0.3081, 0.3081, 0.3081)
DIGITS_CLASS_NAMES = [str(d) for d in range(10)]
DIGITS_SEED = 0


def digits_kwargs(pool: str) -> dict[str, object]:
    return {**DIGITS_KWARGS, **POOLING[pool]}


def builtin_saes(model: str) -> list[SaeSource]:
    """The SAEs shipped for a built-in model, by folder name."""
    folder = BUILTIN_SAES / model
    if not folder.is_dir():
        return []
    return [
        SaeSource(name=sae.name, path=sae)
        for sae in sorted(folder.iterdir())
        if (sae / "cfg.json").is_file()
    ]


def _digits_spec(name: str, weights: str, pool: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="timm",
        architecture=DIGITS_ARCHITECTURE,
        weights=weights,
        seed=DIGITS_SEED,
        kwargs=digits_kwargs(pool),
        class_names=list(DIGITS_CLASS_NAMES),
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        crop_pct=1.0,
        interpolation="bilinear",
        saes=builtin_saes(name),
    )


def builtin_specs() -> list[ModelSpec]:
    """Each trained digits model (when its weights are present), then its random twin."""
    specs = []
    for name, random_name, weights, pool in (
        (DIGITS_NAME, DIGITS_RANDOM_NAME, DIGITS_WEIGHTS, "token"),
        (DIGITS_GAP_NAME, DIGITS_GAP_RANDOM_NAME, DIGITS_GAP_WEIGHTS, "avg"),
    ):
        if weights.exists():
            specs.append(_digits_spec(name, f"file:{weights}", pool))
        specs.append(_digits_spec(random_name, "random", pool))
    return specs


def builtin_default_name() -> str:
    return DIGITS_NAME if DIGITS_WEIGHTS.exists() else DIGITS_RANDOM_NAME
