"""KL VAE: original key layout, attention formula, encode/decode shapes, checkpoint loading."""
import pytest
import torch
from safetensors.torch import save_file

from marfast.checkpoint import CheckpointError
from marfast.vae import LATENT_SCALE, AttnBlock, KLAutoencoder, load_vae


def test_kl16_layout_and_size():
    with torch.device("meta"):
        vae = KLAutoencoder()
    sd = vae.state_dict()
    assert sum(t.numel() for t in sd.values()) == 66_456_019
    assert tuple(sd["encoder.down.4.attn.1.q.weight"].shape) == (512, 512, 1, 1)
    assert "encoder.down.3.attn.0.q.weight" not in sd and "decoder.up.4.attn.0.q.weight" not in sd
    assert tuple(sd["decoder.up.0.block.2.conv2.weight"].shape) == (128, 128, 3, 3)
    assert tuple(sd["quant_conv.weight"].shape) == (32, 32, 1, 1) and tuple(sd["encoder.conv_out.weight"].shape) == (32, 512, 3, 3)
    assert tuple(sd["decoder.up.1.block.0.nin_shortcut.weight"].shape) == (128, 256, 1, 1)


def test_attention_matches_the_explicit_formula():
    torch.manual_seed(0)
    block = AttnBlock(32).double()
    x = torch.randn(2, 32, 3, 5, dtype=torch.float64)
    n = block.norm(x)
    q, k, v = (conv(n).flatten(2) for conv in (block.q, block.k, block.v))  # [B, C, HW]
    w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * 32**-0.5, dim=-1)
    out = torch.einsum("bcj,bij->bci", v, w).reshape(2, 32, 3, 5)
    torch.testing.assert_close(block(x), x + block.proj_out(out))


def tiny_vae():
    torch.manual_seed(0)
    return KLAutoencoder(embed_dim=4, ch_mult=(1, 2), ch=32, resolution=32)


def test_encode_decode_shapes_and_scale():
    vae = tiny_vae().eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean = vae.encode(images, sample=False)
    assert mean.shape == (2, 4, 16, 16)
    moments = vae.quant_conv(vae.encoder(images))
    torch.testing.assert_close(mean, moments[:, :4] * LATENT_SCALE)
    g = torch.Generator().manual_seed(1)
    assert not torch.equal(vae.encode(images, generator=g), mean)
    assert vae.decode(mean).shape == (2, 3, 32, 32)
    out = vae.decode_to_uint8(mean)
    assert out.dtype == torch.uint8 and out.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="NaN or infinite"):
        vae.decode_to_uint8(mean.clone().index_fill_(0, torch.tensor([1]), float("inf")))
    with pytest.raises(ValueError, match="images must be"):
        vae.encode(torch.rand(2, 3, 31, 32))
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.rand(2, 5, 16, 16))


def test_load_ckpt_and_safetensors(tmp_path, monkeypatch):
    import marfast.vae as vae_module

    monkeypatch.setattr(vae_module, "KLAutoencoder", lambda: tiny_vae())
    vae = tiny_vae()
    state = vae.state_dict()
    torch.save({"model": {**state, "loss.discriminator.main.0.weight": torch.zeros(2)}}, tmp_path / "kl.ckpt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "kl.safetensors"))
    for name in ("kl.ckpt", "kl.safetensors"):
        loaded = load_vae(tmp_path / name)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}, str(tmp_path / "kl_bf16.safetensors"))
    assert all(p.dtype == torch.float32 for p in load_vae(tmp_path / "kl_bf16.safetensors").parameters())
    broken = dict(state)
    broken.pop("decoder.conv_out.bias")
    torch.save({"model": broken}, tmp_path / "broken.ckpt")
    with pytest.raises(CheckpointError, match="missing keys: decoder.conv_out.bias"):
        load_vae(tmp_path / "broken.ckpt")
