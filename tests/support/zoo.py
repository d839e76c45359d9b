"""The model zoo sweep: timm's vision-transformer families and open_clip's towers, grouped
by anatomy, one small random-init representative per group served through every RPC.

    python tests/support/zoo.py            # rerun the sweep, rewrite the table in docs/models.md
    python tests/support/zoo.py --groups   # also regroup timm's models (instantiates every one, slow)

Grouping timm's models needs every model built (on the meta device), so the groups and
their representatives are kept in tests/support/zoo_groups.json; the sweep test checks that they
still cover timm.list_models() and open_clip.list_models().
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import timm
import torch
import yaml
from timm.models._registry import _model_to_module

from vitscope import Client, FailedPreconditionError
from vitscope.errors import VitscopeError

ROOT = Path(__file__).resolve().parents[2]
GROUPS_FILE = Path(__file__).resolve().parent / "zoo_groups.json"
DOCS = ROOT / "docs" / "models.md"
BEGIN, END = "<!-- zoo-table:begin -->", "<!-- zoo-table:end -->"

TIMM_MODULES = (
    "vision_transformer",
    "vision_transformer_hybrid",
    "vision_transformer_relpos",
    "vision_transformer_sam",
    "deit",
    "cait",
    "eva",
    "beit",
    "convit",
    "pit",
    "coat",
    "twins",
    "swin_transformer",
    "swin_transformer_v2",
    "swin_transformer_v2_cr",
    "xcit",
    "crossvit",
    "tnt",
    "levit",
    "mvitv2",
    "volo",
    "visformer",
    "gcvit",
    "davit",
    "hiera",
    "hieradet_sam2",
    "vitamin",
    "tiny_vit",
    "pvt_v2",
    "naflexvit",
    "nextvit",
)
# Small configurations tried in turn for a timm representative: the first that builds and
# runs is kept (image sizes a window or stride constraint allows, then the native one).
_SHRINKS: tuple[dict[str, Any], ...] = (
    {"depth": 2, "embed_dim": 64, "num_heads": 2},
    {"depth": 2},
    {},
)
SMALL_KWARGS: tuple[dict[str, Any], ...] = tuple(
    {**shrink, **({"img_size": size} if size else {}), "num_classes": 5}
    for shrink in _SHRINKS
    for size in (64, 96, 128, 0)
)
RPCS = (
    "Describe",
    "Activations",
    "Optimize",
    "TopImages",
    "Project",
    "Memories",
    "Invert",
    "Rollout",
    "Relevancy",
)
CLIP_LABELS = {"class_names": ["cat", "dog"], "templates": ["a photo of a {}."]}


def timm_models() -> list[str]:
    return sorted(m for m in timm.list_models() if _model_to_module.get(m) in TIMM_MODULES)


def _type_names(modules: list[Any]) -> str:
    return ",".join(sorted({type(m).__name__ for m in modules})) or "-"


def timm_anatomy(model: torch.nn.Module) -> str:
    """The group key: classes of model, blocks, attention and MLP."""
    from vitscope_server.core.model.adapters.timm_blocks import ATTENTION_NAMES, find_blocks

    parts, _ = find_blocks(model)
    blocks = [model.get_submodule(p.path) for p in parts]
    attentions = [
        getattr(b, n)
        for b in blocks
        for n in ATTENTION_NAMES
        if isinstance(getattr(b, n, None), torch.nn.Module)
    ]
    mlps = [b.mlp for b in blocks if isinstance(getattr(b, "mlp", None), torch.nn.Module)]
    return " / ".join(
        (type(model).__name__, _type_names(blocks), _type_names(attentions), _type_names(mlps))
    )


def _builds_small(name: str) -> dict[str, Any] | None:
    """The first small kwargs with which the model builds and runs a forward."""
    for kwargs in SMALL_KWARGS:
        try:
            model = timm.create_model(name, pretrained=False, **kwargs).eval()
            size = kwargs.get("img_size") or model.pretrained_cfg["input_size"][1]
            with torch.inference_mode():
                model(torch.zeros(1, 3, size, size))
        except Exception:  # a kwarg the family does not take, or a size it cannot run at
            continue
        return kwargs
    return None


def _on_meta(name: str) -> torch.nn.Module:
    """The model without memory or init; two blocks deep where the family takes `depth`
    (building every block of the largest models costs minutes; the classes are the same)."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return timm.create_model(name, pretrained=False, depth=2)
        except Exception:  # families that take per-stage depths
            return timm.create_model(name, pretrained=False)


def group_timm_models() -> dict[str, Any]:
    """Every model of TIMM_MODULES built on the meta device and grouped by anatomy."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in timm_models():
        model = _on_meta(name)
        size = sum(p.numel() for p in model.parameters())
        groups.setdefault(timm_anatomy(model), []).append((size, name))
    return {key: pick_timm_representative(members) for key, members in sorted(groups.items())}


def pick_timm_representative(members: list[tuple[int, str]]) -> dict[str, Any]:
    """The smallest of the group's smallest members that builds small, with its kwargs."""
    for _, name in sorted(members)[:3]:
        kwargs = _builds_small(name)
        if kwargs is not None:
            break
    else:
        name, kwargs = sorted(members)[0][1], {}
    return {"example": name, "kwargs": kwargs, "members": sorted(m for _, m in members)}


def _clip_tower_kind(vision: dict[str, Any]) -> str:
    if vision.get("timm_model_name"):
        trunk = str(vision["timm_model_name"])
        return f"timm {_model_to_module.get(trunk, '?')} pool={vision.get('timm_pool', 'avg')}"
    if isinstance(vision.get("layers"), (list, tuple)):
        return "ModifiedResNet"
    flags = sorted(
        k
        for k in (
            "attentional_pool",
            "final_ln_after_pool",
            "no_ln_pre",
            "qk_norm",
            "scaled_cosine_attn",
            "scale_heads",
            "scale_attn_inner",
            "scale_attn",
            "scale_fc",
        )
        if vision.get(k)
    )
    scale = ["layer_scale"] if vision.get("ls_init_value") is not None else []
    pool = f"pool={vision.get('pool_type', 'tok')}"
    return " ".join(["VisionTransformer", pool, *flags, *scale])


def open_clip_configs() -> list[str]:
    """open_clip configs that build offline: every one without a Hugging Face text tower."""
    return sorted(
        name
        for name in open_clip.list_models()
        if not (open_clip.get_model_config(name) or {}).get("text_cfg", {}).get("hf_model_name")
    )


def _smallest_timm(name: str, timm_groups: dict[str, Any]) -> str:
    """A small trunk of the same timm anatomy group (or module) as `name`, for towers built
    on timm: open_clip passes no depth to its trunk, so a giant trunk stays giant."""
    for group in timm_groups.values():
        if name in group["members"] and not group["kwargs"].get("depth"):
            return str(group["example"])
    module = _model_to_module.get(name)
    same = [m for m in timm.list_models() if _model_to_module.get(m) == module] or [name]
    return min(same, key=lambda m: sum(p.numel() for p in _on_meta(m).parameters()))


def group_open_clip(timm_groups: dict[str, Any]) -> dict[str, Any]:
    """Offline-buildable configs grouped by tower anatomy; the narrowest config represents
    each group, shrunk to a few small layers (towers on timm get a small trunk)."""
    groups: dict[str, list[tuple[int, str]]] = {}
    for name in open_clip_configs():
        vision = (open_clip.get_model_config(name) or {}).get("vision_cfg", {})
        layers = vision.get("layers", 4)
        width = int(vision.get("width", 0) or 0) * (layers if isinstance(layers, int) else 4)
        groups.setdefault(_clip_tower_kind(vision), []).append((width, name))
    result = {}
    for key, members in sorted(groups.items()):
        example = min(members)[1]
        result[key] = {
            "example": example,
            "kwargs": _shrunk_clip_kwargs(example, timm_groups),
            "members": sorted(m for _, m in members),
        }
    return result


def _shrunk_clip_kwargs(name: str, timm_groups: dict[str, Any]) -> dict[str, Any]:
    config = open_clip.get_model_config(name)
    vision = dict(config["vision_cfg"])
    if vision.get("timm_model_name"):
        trunk = _smallest_timm(str(vision["timm_model_name"]), timm_groups)
        # open_clip passes no img_size to its trunk: the tower runs at the trunk's own size.
        size = timm.models.get_pretrained_cfg(trunk).input_size[-1]
        vision.update(timm_model_name=trunk, image_size=size)
    elif isinstance(vision.get("layers"), (list, tuple)):
        vision.update(image_size=64, layers=[1, 1, 1, 1], width=16)
    else:
        vision.update(image_size=32, layers=2, width=64, head_width=32, patch_size=16)
    text = dict(config["text_cfg"])
    text.update(context_length=16, width=64, heads=2, layers=1)
    return {"embed_dim": 32, "vision_cfg": vision, "text_cfg": text}


def load_groups() -> dict[str, Any]:
    groups: dict[str, Any] = json.loads(GROUPS_FILE.read_text())
    return groups


def representatives() -> list[dict[str, Any]]:
    """The model specs the sweep serves: one per timm group and per open_clip group."""
    specs: list[dict[str, Any]] = []
    for family, prefix in (("timm", "timm"), ("open_clip", "clip")):
        for i, (key, group) in enumerate(load_groups()[family].items()):
            specs.append(
                {
                    "name": f"{prefix}-{i:02d}",
                    "family": family,
                    "architecture": group["example"],
                    "kwargs": group["kwargs"],
                    "group": key,
                }
            )
    return specs


def _reason(message: str) -> str:
    """The first clause of a refusal, without the status and model name, for a table cell."""
    reason = re.sub(r"^(FAILED_PRECONDITION: )?(methods\[0\]: )?(model \S+?: )?", "", message)
    reason = re.sub(r"^\S+ does not apply to model \S+?: ", "", reason)
    return reason.split(";")[0].strip().replace("|", "/")[:90]


def _outcome(call: Callable[[], object]) -> str:
    """ "ok", or "refused: <reason>" for FAILED_PRECONDITION; anything else is an error."""
    try:
        call()
    except FailedPreconditionError as exc:
        return f"refused: {_reason(str(exc))}"
    except VitscopeError as exc:
        return f"ERROR {exc}"
    return "ok"


def _feature_site(description: Any) -> str:
    last = description.block_count - 1
    hidden = f"blocks.{last}.mlp.hidden"
    return hidden if hidden in description.sites else f"blocks.{last}.out"


def _sites(description: Any) -> list[str]:
    """Every site, but the heads of the first block alone: each block's heads hold `heads`
    times attn.out, too much to read for every block of the largest models."""
    heads = [s for s in description.sites if s.endswith(".attn.heads")]
    return [s for s in description.sites if s not in heads[1:]]


def sweep_model(client: Client, spec: dict[str, Any]) -> dict[str, str]:
    """Every RPC once on one served model; outcomes by RPC."""
    name = spec["name"]
    try:
        description = client.describe(name)
    except FailedPreconditionError as exc:
        reason = _reason(str(exc).partition(" failed to load: ")[2]).split(" (")[0]
        if re.match(r"^\w+(Error|Exception): ", reason):  # an exception, not a refusal
            return {"Describe": f"ERROR load crashed: {reason}"} | dict.fromkeys(RPCS[1:], "-")
        return {"Describe": f"not loaded: {reason}"} | dict.fromkeys(RPCS[1:], "-")
    size = tuple(description.input_size)
    pixels = list(np.random.default_rng(0).standard_normal((2, *size)).astype(np.float32))
    site = _feature_site(description)
    last = description.block_count - 1
    labels = CLIP_LABELS if spec["family"] == "open_clip" else {}
    calls: dict[str, Callable[[], object]] = {
        "Activations": lambda: client.activations(pixels, _sites(description), model=name),
        "Optimize": lambda: client.optimize_features(
            [(site, 0)], model=name, steps=1, copies=1, jitter=1
        ),
        "TopImages": lambda: client.top_activating_images(
            site, [0], images=pixels, top_k=1, model=name
        ),
        "Project": lambda: client.project(pixels[:1], model=name, top_k=1, **labels),
        # The last block: the one every model with a classifier projects (a hierarchical
        # model's earlier stages are narrower than its head).
        "Memories": lambda: client.project_memories(last, model=name, top_k=1, **labels),
        "Invert": lambda: client.invert(
            pixels[:1], [1], model=name, method="optimization", steps=1
        ),
        "Rollout": lambda: client.explain(pixels[:1], ["rollout"], model=name, **labels),
        "Relevancy": lambda: client.explain(pixels[:1], ["relevancy"], model=name, **labels),
    }
    return {"Describe": "ok"} | {rpc: _outcome(call) for rpc, call in calls.items()}


@contextmanager
def served(specs: list[dict[str, Any]], folder: Path) -> Iterator[Client]:
    from vitscope_server.settings import ServerSettings
    from vitscope_server.transport.app import create_server

    models = [{k: v for k, v in s.items() if k != "group"} for s in specs]
    models_file = folder / "zoo-models.yaml"
    models_file.write_text(yaml.safe_dump({"models": models}))
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        metrics_port=-1,
        models_file=models_file,
        default_model=specs[0]["name"],
        # Every site of a model at its native size (up to 1024 px): over the default per-request
        # budget for the largest grids; the sweep checks answers, tests/integration/test_budget.py budgets.
        request_memory_bytes=8 << 30,
    )
    running = create_server(settings)
    try:
        assert running.registry.wait_until_settled(timeout=900)
        with Client(f"127.0.0.1:{running.port}", timeout=300) as client:
            yield client
    finally:
        running.stop(0)


def render(specs: list[dict[str, Any]], outcomes: list[dict[str, str]]) -> str:
    header = (
        "| family | group (model / block / attention / MLP classes) | example | "
        + " | ".join(RPCS)
        + " |"
    )
    lines = [header, "|" + "---|" * (3 + len(RPCS))]
    for spec, outcome in zip(specs, outcomes, strict=True):
        cells = [spec["family"], spec["group"].replace("|", "/"), f"`{spec['architecture']}`"]
        lines.append("| " + " | ".join(cells + [outcome[r] for r in RPCS]) + " |")
    return "\n".join(lines) + "\n"


def committed_table() -> str:
    text = DOCS.read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip("\n") + "\n"


def write_table(table: str) -> None:
    text = DOCS.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOCS.write_text(text[:start] + "\n" + table + text[end:])


def main(argv: list[str]) -> None:
    import tempfile

    if "--groups" in argv:
        timm_groups = group_timm_models()
        groups = {"timm": timm_groups, "open_clip": group_open_clip(timm_groups)}
        GROUPS_FILE.write_text(json.dumps(groups, indent=1, sort_keys=True) + "\n")
    specs = representatives()
    with tempfile.TemporaryDirectory() as folder, served(specs, Path(folder)) as client:
        outcomes = [sweep_model(client, spec) for spec in specs]
    write_table(render(specs, outcomes))


if __name__ == "__main__":
    main(sys.argv[1:])
