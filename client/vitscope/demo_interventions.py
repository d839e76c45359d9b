"""Demo figures for Intervene: activation patching of one digit into another at every
block and patch position, and each head's ablation effect."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from vitscope.client import Client
from vitscope.figures import Figure
from vitscope.plot_interventions import plot_patching


def intervention_figures(
    client: Client, model: str, out: Path, digits: list[tuple[str, Image.Image]]
) -> list[Figure]:
    """The residual patched from a second digit into the first, per block and patch; none
    for a model without classes or whose blocks change grid."""
    described = client.describe(model)
    if not described.class_names or len(digits) < 2:
        return []
    grids = {
        (s.get("grid_height"), s.get("grid_width"))
        for n, s in described.sites.items()
        if n.endswith(".out") and n.startswith("blocks.")
    }
    if len(grids) != 1:
        return []
    (base_name, base), (source_name, source) = digits[0], digits[1]
    result = client.patching_sweep(
        [base], [source], model=model, target=int(source_name[0]), other=int(base_name[0])
    )
    name = "patching_residual.png"
    plot_patching(
        result,
        out / name,
        f"Residual of digit {source_name[0]} patched into digit {base_name[0]} ({model})",
    )
    return [
        Figure(
            name,
            f"Activation patching: the residual stream after each block, at one patch position "
            f"at a time, copied from a {source_name[0]} into a {base_name[0]}; color is the "
            f"normalized effect on the logit difference {source_name[0]} - {base_name[0]} "
            "(1: the patch carries the whole difference, 0: none).",
        )
    ]
