"""`vitscope project`: class-embedding projection of one image, as a table and two pictures."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vitscope.client import Client
from vitscope.plot_projection import plot_identifiability
from vitscope.projection import ClassProjection, ImportanceEvaluation

_COLUMNS = (
    ("identifiable_patch_percent", "ident%"),
    ("cls_rank", "cls_rank"),
    ("block_change_rate", "chg_blk"),
    ("attention_change_rate", "chg_att"),
    ("mlp_change_rate", "chg_mlp"),
    ("composition_input", "top1=in"),
    ("composition_attention", "top1=att"),
    ("composition_mlp", "top1=mlp"),
    ("composition_none", "none"),
)


def add_commands(commands: Any) -> None:
    project = commands.add_parser(
        "project", help="project an image's tokens to class space per block (Vilas et al. 2023)"
    )
    project.add_argument("image", type=Path)
    project.add_argument("--model", default="")
    project.add_argument(
        "--target",
        dest="class_target",
        default=None,
        help="class index or name (default: prediction)",
    )
    project.add_argument(
        "--compare", default="", help="a second model drawn alongside, e.g. a random twin"
    )
    project.add_argument("--out", type=Path, required=True, help="folder for the pictures")
    project.add_argument(
        "--evaluate-maps",
        action="store_true",
        help="accuracy keeping the top-n patch tokens by importance (and at random), with its AUC",
    )


def _target(text: str | None) -> int | str | None:
    if text is None:
        return None
    return int(text) if text.lstrip("-").isdigit() else text


def table(result: ClassProjection) -> str:
    image = result.images[0]
    lines = [
        f"target: {image.target_name} ({image.target_index})"
        f"{' = prediction' if image.target_is_prediction else ''}; "
        f"prediction: {image.prediction.get('class_name', '')}",
        "block " + " ".join(f"{label:>8}" for _, label in _COLUMNS),
    ]
    for block in image.blocks:
        cells = []
        for key, _ in _COLUMNS:
            value = block[key]
            cells.append(f"{int(value):>8d}" if key == "cls_rank" else f"{value:>8.2f}")
        lines.append(f"{int(block['block']):>5} " + " ".join(cells))
    return "\n".join(lines)


def evaluation_table(evaluation: ImportanceEvaluation) -> str:
    """Accuracy per number of kept patch tokens, by importance and at random, with the AUCs."""
    rows = [
        ("n", [f"{n:>5d}" for n in evaluation.keep_counts], ""),
        *(
            (label, [f"{a:>5.2f}" for a in curve.accuracy], f"  AUC {curve.normalized_auc:.3f}")
            for label, curve in (
                ("importance", evaluation.importance_order),
                ("random", evaluation.random_order),
            )
        ),
    ]
    return "\n".join(f"{label:>10} " + " ".join(cells) + auc for label, cells, auc in rows)


def run(client: Client, args: argparse.Namespace) -> bool:
    if args.command != "project":
        return False
    args.out.mkdir(parents=True, exist_ok=True)
    targets = [_target(args.class_target)]
    has_class_token = client.describe(args.model).prefix_token_count > 0
    result = client.project(
        [args.image],
        model=args.model,
        targets=targets,
        importance_maps=has_class_token or args.evaluate_maps,
        evaluate_importance=args.evaluate_maps,
    )
    name = args.model or result.provenance.get("model", "model")
    print(table(result))
    if result.importance_evaluation is not None:
        print("\nkeeping the top-n patch tokens (and the prefix tokens):")
        print(evaluation_table(result.importance_evaluation))
    results = {name: result}
    if args.compare:
        target = result.images[0].target_name
        known = target in client.describe(args.compare).class_names
        results[args.compare] = client.project(
            [args.image], model=args.compare, targets=[target if known else None]
        )
        print(f"\n{args.compare}:")
        print(table(results[args.compare]))
    print(f"wrote {plot_identifiability(results, args.out / 'identifiability.png')}")
    importance = result.images[0].importance
    if importance is not None:
        path = args.out / "importance.png"
        path.write_bytes(importance.overlay_png)
        print(f"wrote {path}")
    else:
        print(f"{name} has no class token: no importance map")
    return True
