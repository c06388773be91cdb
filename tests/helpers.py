"""Small shared test helpers: tiny model configurations and the official key list."""
import ast
from pathlib import Path

import torch

from marfast import MAR

# a copy of the project spec's shared/spec/official_state_dict_keys.txt, kept in the repository so
# a fresh clone tests against it
SPEC_KEYS = Path(__file__).resolve().parent / "data" / "official_state_dict_keys.txt"

TINY_MAR = dict(img_size=16, vae_stride=4, patch_size=1, vae_embed_dim=3,
                encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
                buffer_size=4, class_num=10, diffloss_d=2, diffloss_w=40, num_sampling_steps="6")


def tiny_mar(**overrides):
    return MAR(**{**TINY_MAR, **overrides})


def random_tiny_mar(seed=0, device="cpu", **overrides):
    """A tiny MAR (16 tokens) with every weight perturbed, so every position and condition matters
    (the official init zeroes the head's output layer, which would make z irrelevant)."""
    torch.manual_seed(seed)
    model = tiny_mar(**overrides).to(device).eval()
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, device=device))
    return model


def official_key_shapes():
    """{preset: {key: shape list}} from the official key list (tests/data)."""
    table = {}
    for line in SPEC_KEYS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        preset, key, shape = line.split(None, 2)
        table.setdefault(preset, {})[key] = ast.literal_eval(shape)
    return table
