"""Runs in sae-lens's own virtualenv (tests/external_clients.py).

encode INPUT.npy FOLDER...: loads the SAE in each FOLDER with sae-lens and writes its codes
and reconstruction of INPUT to FOLDER/sae_lens_codes.npz.
write SITE FOLDER...: writes a randomly initialized sae-lens SAE to each FOLDER, its
architecture (standard, topk or jumprelu) the folder's name, with sae-lens's own save_model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sae_lens import (
    SAE,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.saes.sae import SAEMetadata


def encode(inputs: str, folder: str) -> None:
    sae = SAE.load_from_disk(folder, device="cpu")
    x = torch.from_numpy(np.load(inputs))
    with torch.no_grad():
        codes = sae.encode(x)
        recon = sae.decode(codes)
    np.savez(
        Path(folder) / "sae_lens_codes.npz",
        codes=codes.numpy(),
        recon=recon.numpy(),
        architecture=sae.cfg.architecture(),
    )


def write(site: str, folder: str) -> None:
    architecture = Path(folder).name
    metadata = SAEMetadata(hook_name=site, model_name="vitscope-digits")
    if architecture == "topk":
        sae: SAE = TopKSAE(TopKSAEConfig(d_in=64, d_sae=128, k=7, metadata=metadata))
    elif architecture == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=64, d_sae=128, metadata=metadata))
    else:
        sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=128, metadata=metadata))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for parameter in sae.parameters():
            parameter.copy_(torch.rand(parameter.shape, generator=generator) * 0.4 - 0.15)
    sae.save_model(folder)


if __name__ == "__main__":
    command, first, *folders = sys.argv[1:]
    for each in folders:
        (encode if command == "encode" else write)(first, each)
