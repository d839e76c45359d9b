"""The zoo sweep: one small representative per anatomy group of timm's vision-transformer
families and of open_clip's towers, every RPC once through a real server. Each answers or
refuses cleanly, and docs/models.md shows exactly these outcomes."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import zoo

REGENERATE = "regenerate with `python tests/support/zoo.py --groups`"


def test_groups_cover_every_model_of_the_installed_libraries() -> None:
    groups = zoo.load_groups()
    timm_members = {m for g in groups["timm"].values() for m in g["members"]}
    assert timm_members == set(zoo.timm_models()), REGENERATE
    clip_members = {m for g in groups["open_clip"].values() for m in g["members"]}
    assert clip_members == set(zoo.open_clip_configs()), REGENERATE


# About two minutes of CPU: some 60 models loaded and called through every RPC.
@pytest.mark.timeout(900)
def test_every_representative_serves_or_refuses_cleanly(tmp_path: Path) -> None:
    specs = zoo.representatives()
    with zoo.served(specs, tmp_path) as client:
        outcomes = [zoo.sweep_model(client, spec) for spec in specs]
    errors = [
        (spec["architecture"], rpc, outcome)
        for spec, row in zip(specs, outcomes, strict=True)
        for rpc, outcome in row.items()
        if outcome.startswith("ERROR")
    ]
    assert errors == []
    assert zoo.render(specs, outcomes) == zoo.committed_table(), (
        "docs/models.md is not current; rewrite it with `python tests/support/zoo.py`"
    )
