"""Pretrained weights from a local hub cache, offline: `hub` and `hub:TAG` for timm and
open_clip. The cache is fabricated in the hub's layout (models--org--name/snapshots/<commit>/
FILE, refs/main) from random models, and read by a fresh process whose HF_HOME points at it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import open_clip
import timm
import torch
from safetensors.torch import save_file
from support.reference import spec as shared_spec

from vitscope_server.core.model.weights import file_digest

TIMM_KWARGS = {"depth": 1, "img_size": 32}
CLIP_KWARGS = shared_spec("clip")["kwargs"]
CASES: list[dict[str, Any]] = [
    {
        "spec": {"name": "timm-default", "architecture": "vit_tiny_patch16_224", "weights": "hub"},
        "repo": "timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k",
        "file": "model.safetensors",
        "build": lambda: timm.create_model("vit_tiny_patch16_224", **TIMM_KWARGS),
    },
    {
        "spec": {
            "name": "timm-tag",
            "architecture": "vit_tiny_patch16_224",
            "weights": "hub:augreg_in21k",
        },
        "repo": "timm/vit_tiny_patch16_224.augreg_in21k",
        "file": "model.safetensors",
        "build": lambda: timm.create_model(
            "vit_tiny_patch16_224", num_classes=21843, **TIMM_KWARGS
        ),
    },
    {
        "spec": {
            "name": "clip-tag",
            "family": "open_clip",
            "architecture": "ViT-B-32",
            "weights": "hub:laion2b_s34b_b79k",
        },
        "repo": "laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        "file": "open_clip_model.safetensors",
        "build": lambda: open_clip.create_model("ViT-B-32", **CLIP_KWARGS),
    },
]
# Reads the cache in a fresh process, as a server started with HF_HOME and HF_HUB_OFFLINE would.
LOADER = textwrap.dedent(
    """
    import json, sys, torch
    from vitscope_server.core.model.loading import load_model
    from vitscope_server.core.model.specs import ModelSpec
    out = {}
    for spec in json.loads(sys.argv[1]):
        loaded = load_model(ModelSpec.model_validate(spec), torch.device("cpu"))
        state = loaded.adapter.module.state_dict()
        out[spec["name"]] = {
            "identity": loaded.weights_identity,
            "sum": float(sum(v.double().sum() for v in state.values() if v.is_floating_point())),
        }
    print(json.dumps(out))
    """
)


def _fabricate(hub: Path, repo: str, filename: str, commit: str, model: torch.nn.Module) -> Path:
    folder = hub / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    path = snapshot / filename
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(commit)
    return path


def test_hub_weights_load_offline_from_the_cache(tmp_path: Path) -> None:
    hub = tmp_path / "hf" / "hub"
    expected = {}
    for i, case in enumerate(CASES):
        torch.manual_seed(100 + i)
        model = case["build"]()
        commit = f"{i:02d}" + "c0ffee" * 6 + "ab"
        path = _fabricate(hub, case["repo"], case["file"], commit, model)
        total = sum(v.double().sum() for v in model.state_dict().values() if v.is_floating_point())
        expected[case["spec"]["name"]] = (
            f"hub:{case['repo']}@{commit}/{case['file']} {file_digest(path)}",
            float(total),
        )
    specs = [
        {**c["spec"], "kwargs": TIMM_KWARGS if "family" not in c["spec"] else CLIP_KWARGS}
        for c in CASES
    ]
    specs[1]["kwargs"] = {**TIMM_KWARGS, "num_classes": 21843}
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(specs)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = json.loads(run.stdout.strip().splitlines()[-1])
    for name, (identity, total) in expected.items():
        assert loaded[name]["identity"] == identity
        # The weights served are the cached file's, not a fresh random init.
        assert abs(loaded[name]["sum"] - total) <= 1e-6 * max(1.0, abs(total)), name
