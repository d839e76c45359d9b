"""The built-in digits ViT: its architecture, preprocessing and where its weights live.

Training (vitscope_server.train_classifier) and serving both read this module,
so the served model is exactly the trained one.
"""

from __future__ import annotations

from pathlib import Path

from vitscope_server.core.specs import ModelSpec

BUILTIN_DIR = Path(__file__).resolve().parent
DIGITS_WEIGHTS = BUILTIN_DIR / "vitscope-digits.safetensors"
# Trained inverter stores of the built-in models, one folder per model.
BUILTIN_INVERTERS = BUILTIN_DIR / "inverters"
DIGITS_NAME = "vitscope-digits"
DIGITS_RANDOM_NAME = "vitscope-digits-random"

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
# MNIST pixel statistics, replicated over the three input channels.
DIGITS_MEAN = (0.1307, 0.1307, 0.1307)
DIGITS_STD = (0.3081, 0.3081, 0.3081)
DIGITS_CLASS_NAMES = [str(d) for d in range(10)]
DIGITS_SEED = 0


def _digits_spec(name: str, weights: str) -> ModelSpec:
    return ModelSpec(
        name=name,
        family="timm",
        architecture=DIGITS_ARCHITECTURE,
        weights=weights,
        seed=DIGITS_SEED,
        kwargs=dict(DIGITS_KWARGS),
        class_names=list(DIGITS_CLASS_NAMES),
        mean=DIGITS_MEAN,
        std=DIGITS_STD,
        crop_pct=1.0,
        interpolation="bilinear",
    )


def builtin_specs() -> list[ModelSpec]:
    """The trained digits model (when its weights are present) and its random twin."""
    specs = [_digits_spec(DIGITS_RANDOM_NAME, "random")]
    if DIGITS_WEIGHTS.exists():
        specs.insert(0, _digits_spec(DIGITS_NAME, f"file:{DIGITS_WEIGHTS}"))
    return specs


def builtin_default_name() -> str:
    return DIGITS_NAME if DIGITS_WEIGHTS.exists() else DIGITS_RANDOM_NAME
