"""compile_blocks: the same sites, read from blocks compiled by torch.compile, within float
rounding of the eager server's. Compiling takes a minute or more on a CPU, hence a system test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from support.servers import TEST_MODELS, start

from vitscope import Client
from vitscope_server.transport.app import RunningServer

VIT = next(spec for spec in TEST_MODELS if spec["name"] == "vit")
SITES = ["embed", "blocks.0.out", "blocks.1.out", "blocks.1.mlp.hidden", "blocks.0.attn.probs"]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    running: RunningServer = start(
        tmp_path_factory.mktemp("compiled"), [VIT], default_model="vit", compile_blocks=True
    )
    try:
        with Client(f"127.0.0.1:{running.port}", timeout=600) as client:
            yield client
    finally:
        running.stop(0)


@pytest.mark.timeout(1200)
def test_compiled_blocks_read_the_eager_values(compiled: Client, client: Client) -> None:
    rng = np.random.default_rng(5)
    size = client.describe("vit").input_size
    images = [rng.standard_normal(size).astype(np.float32) for _ in range(3)]
    for batch in (images[:1], images):  # a second batch size: no recompile is needed
        eager = client.activations(batch, SITES, model="vit", top_predictions=2)
        fast = compiled.activations(batch, SITES, model="vit", top_predictions=2)
        for site in SITES:
            assert fast[site].shape == eager[site].shape
            np.testing.assert_allclose(fast[site], eager[site], rtol=1e-4, atol=1e-5)
        for mine, theirs in zip(fast.predictions, eager.predictions, strict=True):
            assert [p.class_index for p in mine] == [p.class_index for p in theirs]


def test_the_setting_is_a_flag(tmp_path: Path) -> None:
    from vitscope_server.cli import build_parser
    from vitscope_server.settings import ServerSettings
    from vitscope_server.settings_flags import settings_from_args

    args = build_parser().parse_args(["serve", "--compile-blocks"])
    assert settings_from_args(args, ServerSettings).compile_blocks is True
