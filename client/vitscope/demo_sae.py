"""Demo page for sparse autoencoders: a few latents of the model's first served SAE, each
with its optimized image, its patch map and the sample digits that excite it most."""

from __future__ import annotations

from pathlib import Path

from vitscope.cli_features import feature_grid
from vitscope.client import Client
from vitscope.figures import Figure, sample_digits, strongest_channels

LATENTS = 4
TOP_K = 3


def sae_figures(client: Client, model: str, out: Path) -> list[Figure]:
    """Nothing when the model serves no SAE."""
    saes = client.describe(model).saes
    if not saes:
        return []
    name, sae = next(iter(saes.items()))
    site = f"{sae['site']}@sae:{name}"
    digits = sample_digits()
    images = [image for _, image in digits]
    latents = strongest_channels(client, model, images, site, count=LATENTS)
    result = client.optimize_features(
        [(site, latent) for latent in latents], model=model, seed=0, timeout=600
    )
    tops = client.top_activating_images(site, latents, images=images, top_k=TOP_K, model=model)
    figure = feature_grid(
        [f.image for f in result.features],
        [f.patch_map for f in result.features],
        [f"latent {f.channel} {f.objective:.2f}" for f in result.features],
        tops,
        digits,
    )
    file = f"sae_{name}.png"
    figure.save(out / file)
    explained = sae.get("metrics", {}).get("explained_variance")
    quality = f", {explained:.1%} of the variance explained" if explained is not None else ""
    return [
        Figure(
            file,
            f"Latents {latents} of the sparse autoencoder {name!r} on {sae['site']} of {model} "
            f"({sae['width']} latents, {sae['kind']}{quality}): each latent's optimized image "
            f"and patch map, and its {TOP_K} most exciting sample digits.",
        )
    ]
