"""Demo figures for Invert: digits from every depth by both methods, and the color experiment."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from vitscope.client import Client
from vitscope.figures import Figure
from vitscope.inversion import Inversion
from vitscope.overlay import grid

OPTIMIZATION_STEPS = 150
COLOR_PHOTO = "chelsea"


def _strip(
    inversion: Inversion, originals: list[tuple[str, Image.Image]], depths: list[int]
) -> tuple[list[list[Image.Image]], list[list[str]]]:
    tiles, captions = [], []
    for index, (name, image) in enumerate(originals):
        row, caption = [image], [name]
        for depth in depths:
            reconstruction = inversion[depth]
            row.append(reconstruction.images[index])
            psnr = reconstruction.psnr[index] if reconstruction.psnr else float("nan")
            caption.append(f"d{depth} {psnr:.1f}dB")
        tiles.append(row)
        captions.append(caption)
    return tiles, captions


def _hue_rotated(image: Image.Image, degrees: int) -> Image.Image:
    hue, saturation, value = image.convert("HSV").split()
    shift = round(degrees / 360 * 256)
    hue = hue.point(lambda h: (h + shift) % 256)
    return Image.merge("HSV", (hue, saturation, value)).convert("RGB")


def _color_variants() -> list[tuple[str, Image.Image]]:
    from skimage import data

    photo = Image.fromarray(getattr(data, COLOR_PHOTO)()).convert("RGB")
    return [
        ("photo", photo),
        ("hue +120", _hue_rotated(photo, 120)),
        ("hue +240", _hue_rotated(photo, 240)),
        ("grayscale", photo.convert("L").convert("RGB")),
    ]


def inversion_figures(
    client: Client, model: str, out: Path, digits: list[tuple[str, Image.Image]]
) -> list[Figure]:
    depths = list(range(client.describe(model).block_count + 1))
    chosen = [(name[:1], image) for name, image in digits[:4]]
    images = [image for _, image in chosen]
    figures = []
    if client.list_inverters(model):
        learned = client.invert(images, depths, model=model, method="learned")
        grid(*_strip(learned, chosen, depths), tile=80).save(out / "inversion_learned.png")
        figures.append(
            Figure(
                "inversion_learned.png",
                f"Learned modular inversion of {model}: held-out digits reconstructed from every "
                "depth (d0 = patch embedding, dk = after block k-1) by chaining the trained "
                "inverse modules; PSNR against the model's input under each.",
            )
        )
    optimized = client.invert(
        images, depths, model=model, method="optimization", steps=OPTIMIZATION_STEPS
    )
    grid(*_strip(optimized, chosen, depths), tile=80).save(out / "inversion_optimization.png")
    figures.append(
        Figure(
            "inversion_optimization.png",
            f"Training-free inversion of {model}: pixels optimized ({OPTIMIZATION_STEPS} Adam "
            "steps, TV prior) until their representation at each depth matches the digit's.",
        )
    )
    color_depths = [0, 2, 4, depths[-1]]
    variants = _color_variants()
    color = client.invert(
        [image for _, image in variants],
        color_depths,
        model=model,
        method="optimization",
        steps=OPTIMIZATION_STEPS,
    )
    grid(*_strip(color, variants, color_depths), tile=96).save(out / "inversion_color.png")
    figures.append(
        Figure(
            "inversion_color.png",
            f"Color experiment (Rathjens et al.) on skimage's '{COLOR_PHOTO}' photo, hue-rotated "
            f"and grayscale, inverted by optimization through {model} at its input size. The "
            "model only ever saw grayscale digits, and optimization needs no training data: "
            "this shows which color information this model's representation happens to keep "
            "at each depth, not what a model trained on natural photos keeps.",
        )
    )
    return figures
