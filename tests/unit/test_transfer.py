"""Results leave the device in one copy: the gathered path (what a GPU batch takes) gives
exactly the arrays that viewing each tensor gives."""

from __future__ import annotations

import numpy as np
import torch

from vitscope_server.core.runtime.transfer import to_host


def test_one_gathered_copy_equals_each_tensor_viewed_alone() -> None:
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(2, 3, 5, generator=generator),
        torch.randn(3, generator=generator).half(),  # 6 bytes: the next one starts unaligned
        torch.randn(4, 7, generator=generator).bfloat16(),
        torch.arange(9, dtype=torch.int64).reshape(3, 3),
        torch.randn(1, generator=generator),
        torch.arange(5, dtype=torch.int32),
        torch.tensor([True, False, True]),
        torch.arange(3, dtype=torch.uint8),
    ]
    gathered = to_host(tensors, gather=True)
    alone = to_host(tensors, gather=False)
    for tensor, one, other in zip(tensors, gathered, alone, strict=True):
        assert one.shape == tuple(tensor.shape) and one.dtype == other.dtype
        assert one.tobytes() == other.tobytes()
    assert alone[2].dtype == np.uint16  # bfloat16 travels as its bit pattern
    assert np.array_equal(
        alone[2].view(np.uint16), tensors[2].view(torch.int16).numpy().view(np.uint16)
    )


def test_host_tensors_are_viewed_without_a_copy() -> None:
    tensor = torch.randn(4, 4)
    (array,) = to_host([tensor])
    array[0, 0] = 123.0
    assert tensor[0, 0].item() == 123.0


def test_nothing_to_copy() -> None:
    assert to_host([]) == []
