"""Demo figures for Explain: every method's map over held-out digits, and the deletion and
insertion curves with their AUCs against a random order."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

from vitscope.client import Client
from vitscope.explain import METHODS
from vitscope.figures import Figure
from vitscope.overlay import grid
from vitscope.plot_explain import plot_mean_curves

# Methods that read the whole attention matrix, which windowed attention does not have.
_ATTENTION_METHODS = ("rollout", "relevancy", "class_embedding")


def _methods(client: Client, model: str) -> list[str]:
    """Every method that applies to the model."""
    described = client.describe(model)
    windowed = any(
        s.get("layout") == "SITE_LAYOUT_WINDOW_ATTENTION" for s in described.sites.values()
    )
    methods = [m for m in METHODS if not (windowed and m in _ATTENTION_METHODS)]
    if described.prefix_token_count == 0:
        methods.remove("class_embedding")
    return methods


def explanation_figures(
    client: Client, model: str, out: Path, digits: list[tuple[str, Image.Image]]
) -> list[Figure]:
    """The true digit explained by every method, with faithfulness; none for a model without
    its own classes."""
    if not client.describe(model).class_names:
        return []
    methods = _methods(client, model)
    result = client.explain(
        [image for _, image in digits],
        methods,
        model=model,
        targets=[int(name[0]) for name, _ in digits],
        faithfulness=True,
    )
    tiles, captions = [], []
    for (name, image), explained in zip(digits, result.images, strict=True):
        tiles.append([image])
        captions.append([f"{name[:1]} -> {explained.prediction.get('class_name', '?')}"])
        for method, found in explained.maps.items():
            tiles[-1].append(Image.open(io.BytesIO(found.overlay_png)))
            pair = found.faithfulness
            aucs = f" d{pair.deletion.auc:.2f} i{pair.insertion.auc:.2f}" if pair else ""
            captions[-1].append(f"{method[:10]}{aucs}")
    maps = "explain_maps.png"
    grid(tiles, captions, tile=112).save(out / maps)
    curves = "explain_faithfulness.png"
    plot_mean_curves(
        result,
        out / curves,
        f"Deletion and insertion on {len(digits)} held-out digits ({model}), true digit as target",
    )
    names = ", ".join(methods)
    return [
        Figure(
            maps,
            f"Which patches explain the true digit in {model}, by {names} (brighter = more "
            "important; d/i: deletion and insertion AUC for that digit).",
        ),
        Figure(
            curves,
            "Faithfulness: the true digit's probability as patches are removed in map order "
            "(deletion, lower is better) or added to a blurred digit (insertion, higher is "
            "better), averaged over the digits, against a seeded random order.",
        ),
    ]
