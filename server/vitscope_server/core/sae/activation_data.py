"""Activation datasets: a site's token vectors for a list of images, in safetensors shards.

Layout of a dataset folder:
- `manifest.json`: what every shard holds (model and weights identity, site, tokens kept,
  dtype, the image list's digest, images per shard, seed, library versions);
- `shard-NNNNN.safetensors`: `activations` [tokens, d] in the manifest's dtype, `image`
  [tokens] (the image's index in the list) and `token` [tokens] (its position in the site's
  sequence), for images [N·S, (N+1)·S) of the list.

Safetensors, not memory-mapped .npy: it stores float16 and bfloat16 (numpy has no
bfloat16), it is read zero-copy through a memory map into torch, its header carries the
shard's identity, and it is the format the SAE weights already use. A shard is written
to a temporary name and renamed, so a shard file on disk is complete: a killed job resumes
by skipping shards that exist, and the workers of an Indexed Job share no file but the
manifest, which each writes identically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vitscope_server.core.model.adapters import Layout, SiteDef
from vitscope_server.core.model.capture import read_site
from vitscope_server.core.model.datasets import Shard, dataset, item_list_digest, shard_range
from vitscope_server.core.model.images import prepare_batch
from vitscope_server.core.model.loading import LoadedModel
from vitscope_server.core.model.provenance import library_versions
from vitscope_server.core.model.sites import resolve_site
from vitscope_server.core.runtime.atomic_files import write_atomically, write_text_atomically
from vitscope_server.core.runtime.cancel import NEVER_CANCELLED
from vitscope_server.core.runtime.errors import FailedPrecondition, InvalidArgument, Reason

DATASET_FORMAT = "vitscope-activations/1"
MANIFEST = "manifest.json"
StoredDType = Literal["float32", "float16", "bfloat16"]
TokensKept = Literal["all", "patches", "prefix"]
# Largest decoded image, as the server's default max_image_pixels.
MAX_IMAGE_PIXELS = 40_000_000
# One worker doing every shard.
WHOLE = Shard(0, 1)
STORED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ExtractConfig(BaseModel):
    """What an extraction keeps: which tokens of each image (and at most how many, sampled
    with the seed per image, so sharding never changes the sample), in which dtype. Each
    field is an `extract` flag."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    site: str = Field(description="The site whose token vectors are written.")
    tokens: TokensKept = Field("all", description="Tokens kept: all, patches or prefix.")
    tokens_per_image: int = Field(
        0, ge=0, description="At most this many kept tokens per image, drawn with the seed; 0: all."
    )
    dtype: StoredDType = Field("float32", description="Stored dtype: float32, float16, bfloat16.")
    images_per_shard: int = Field(1024, ge=1, description="Images per shard file.")
    batch: int = Field(64, ge=1, description="Images per forward.")
    seed: int = Field(0, description="Seed of the per-image token sample.")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _manifest(
    loaded: LoadedModel,
    data: str,
    names: list[str],
    site: SiteDef,
    width: int,
    config: ExtractConfig,
) -> dict[str, Any]:
    return {
        "format": DATASET_FORMAT,
        "model": loaded.spec.name,
        "weights_identity": loaded.weights_identity,
        "site": site.name,
        "d": width,
        "data": data,
        "num_images": len(names),
        "image_list_digest": item_list_digest(names),
        "num_shards": -(-len(names) // config.images_per_shard),
        "config": config.model_dump(),
        "libraries": library_versions(),
    }


def _claim_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Writes the manifest, or checks that the one there describes the same dataset."""
    path = out / MANIFEST
    if path.exists():
        existing = json.loads(path.read_text())
        different = sorted(
            key for key in manifest if key != "libraries" and existing.get(key) != manifest[key]
        )
        if different:
            raise FailedPrecondition(
                f"--out {out} holds another dataset (it differs in {different}); use a new folder",
                field="--out",
            )
        return
    write_text_atomically(path, json.dumps(manifest, indent=1))


def _kept_tokens(site: SiteDef, count: int, config: ExtractConfig) -> torch.Tensor:
    prefix = site.num_prefix_tokens
    if config.tokens == "prefix":
        if prefix == 0:
            raise InvalidArgument("--tokens", f"site {site.name!r} has no prefix tokens")
        return torch.arange(prefix)
    return torch.arange(prefix if config.tokens == "patches" else 0, count)


def _sample(kept: torch.Tensor, image: int, config: ExtractConfig) -> torch.Tensor:
    """tokens_per_image of one image's kept tokens, drawn with (seed, image), in order."""
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + image)
    chosen = torch.randperm(len(kept), generator=generator)[: config.tokens_per_image]
    return kept[chosen.sort().values]


def _shard_tensors(
    loaded: LoadedModel,
    site: SiteDef,
    load: Callable[[int], Any],
    images: range,
    config: ExtractConfig,
) -> dict[str, torch.Tensor]:
    rows, image_ids, token_ids = [], [], []
    adapter = loaded.adapter
    for start in range(images.start, images.stop, config.batch):
        batch = range(start, min(start + config.batch, images.stop))
        pixels = prepare_batch(adapter, [load(i) for i in batch], len(batch), MAX_IMAGE_PIXELS)
        with torch.inference_mode():
            tokens = read_site(adapter, site, pixels.to(loaded.device), NEVER_CANCELLED)
        tokens = tokens.to(STORED_DTYPES[config.dtype]).cpu()
        kept = _kept_tokens(site, tokens.shape[1], config)
        if not config.tokens_per_image or config.tokens_per_image >= len(kept):
            # Every kept token of every image: one gather for the batch.
            rows.append(tokens[:, kept].reshape(-1, tokens.shape[-1]))
            image_ids.append(torch.tensor(list(batch)).repeat_interleave(len(kept)))
            token_ids.append(kept.repeat(len(batch)))
            continue
        for row, image in enumerate(batch):
            chosen = _sample(kept, image, config)
            rows.append(tokens[row, chosen])
            image_ids.append(torch.full((len(chosen),), image, dtype=torch.int64))
            token_ids.append(chosen.to(torch.int64))
    return {
        "activations": torch.cat(rows).contiguous(),
        "image": torch.cat(image_ids),
        "token": torch.cat(token_ids),
    }


def _write_shard(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> None:
    write_atomically(path, lambda temp: save_file(tensors, str(temp), metadata=header))


def extract_activations(
    loaded: LoadedModel,
    data: str,
    out: Path,
    config: ExtractConfig,
    worker: Shard = WHOLE,
    report: Callable[[dict[str, Any]], None] = lambda event: None,
) -> dict[str, Any]:
    """Writes this worker's shards of the dataset that are not on disk yet; returns the
    manifest. `report` receives one event per shard written."""
    names, load = dataset(data)
    site = resolve_site(loaded.adapter, config.site, "--site")
    shape = loaded.site_shapes.get(site.name)
    if site.layout is not Layout.TOKENS or shape is None or len(shape) != 3:
        raise InvalidArgument("--site", f"{site.name!r} holds no [tokens, channels] tensor")
    manifest = _manifest(loaded, data, names, site, int(shape[-1]), config)
    _claim_manifest(out, manifest)
    for index in shard_range(manifest["num_shards"], worker):
        path = out / shard_name(index)
        if path.exists():
            continue
        started = time.perf_counter()
        images = range(
            index * config.images_per_shard,
            min((index + 1) * config.images_per_shard, len(names)),
        )
        tensors = _shard_tensors(loaded, site, load, images, config)
        _write_shard(path, tensors, {"format": DATASET_FORMAT, "site": site.name})
        seconds = time.perf_counter() - started
        report(
            {
                "event": "shard",
                "shard": index,
                "images": len(images),
                "tokens": int(tensors["activations"].shape[0]),
                "images_per_second": len(images) / max(seconds, 1e-9),
            }
        )
    return manifest


class ActivationDataset:
    """A complete dataset folder, read shard by shard (each a zero-copy memory map)."""

    def __init__(self, folder: Path) -> None:
        try:
            self.manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise FailedPrecondition(
                f"--dataset {folder}: no readable {MANIFEST} ({exc})",
                reason=Reason.WEIGHTS_UNUSABLE,
                field="--dataset",
            ) from exc
        if self.manifest.get("format") != DATASET_FORMAT:
            raise FailedPrecondition(
                f"--dataset {folder}: not a {DATASET_FORMAT} dataset", field="--dataset"
            )
        self.folder = folder
        missing = [i for i in range(self.num_shards) if not self.shard_path(i).exists()]
        if missing:
            raise FailedPrecondition(
                f"--dataset {folder}: shards {missing[:8]} of {self.num_shards} are missing; "
                "run the extraction to completion (it resumes)",
                field="--dataset",
            )
        self.shard_tokens = [self._count(i) for i in range(self.num_shards)]

    @property
    def num_shards(self) -> int:
        return int(self.manifest["num_shards"])

    @property
    def width(self) -> int:
        return int(self.manifest["d"])

    @property
    def num_tokens(self) -> int:
        return sum(self.shard_tokens)

    def shard_path(self, index: int) -> Path:
        return self.folder / shard_name(index)

    def _count(self, index: int) -> int:
        with safe_open(str(self.shard_path(index)), framework="pt") as handle:
            return int(handle.get_slice("activations").get_shape()[0])

    def shard(self, index: int) -> torch.Tensor:
        """Shard `index`'s activations as float32 [tokens, d]."""
        return load_file(str(self.shard_path(index)))["activations"].float()

    def shards(self, order: list[int]) -> Iterator[torch.Tensor]:
        for index in order:
            yield self.shard(index)
