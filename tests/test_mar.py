"""MAR reference model: official layout and API, training loss, sampling schedule, seeds, bad input."""
import inspect
import math

import numpy as np
import pytest
import torch

from marfast import MAR, mar_base, mar_huge, mar_large
from marfast.mar import next_mask_len

from helpers import official_key_shapes, random_tiny_mar, tiny_mar

PRESETS = {"mar_base": (mar_base, 6, 1024, 207924768), "mar_large": (mar_large, 8, 1280, 478326304),
           "mar_huge": (mar_huge, 12, 1536, 942403104)}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_state_dict_equals_official(name):
    build, depth, width, n_params = PRESETS[name]
    with torch.device("meta"):
        model = build(diffloss_d=depth, diffloss_w=width)
    mine = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert mine == official_key_shapes()[name]
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert model.encoder_blocks[0].norm1.eps == 1e-6 and model.z_proj_ln.eps == 1e-6


def test_official_method_signatures():
    params = lambda f: list(inspect.signature(f).parameters)
    assert params(MAR.forward_mae_encoder)[:4] == ["self", "x", "mask", "class_embedding"]
    assert params(MAR.forward_mae_decoder) == ["self", "x", "mask"]
    sig = inspect.signature(MAR.sample_tokens).parameters
    assert list(sig)[:8] == ["self", "bsz", "num_iter", "cfg", "cfg_schedule", "labels", "temperature", "progress"]
    assert (sig["num_iter"].default, sig["cfg"].default, sig["cfg_schedule"].default) == (64, 1.0, "linear")
    assert list(inspect.signature(MAR.__init__).parameters)[1:4] == ["img_size", "vae_stride", "patch_size"]


def test_encoder_decoder_shapes_follow_the_mask():
    model = tiny_mar().eval()
    b, known = 3, 5
    tokens = torch.randn(b, model.seq_len, model.token_embed_dim)
    orders = model.sample_orders(b)
    mask = torch.ones(b, model.seq_len)
    mask.scatter_(1, orders[:, :known], 0.0)
    x = model.forward_mae_encoder(tokens, mask, model.class_emb(torch.tensor([1, 2, 3])))
    assert x.shape == (b, model.buffer_size + known, 32)
    z = model.forward_mae_decoder(x, mask)
    assert z.shape == (b, model.seq_len, 32)


def test_training_loss_backward_and_seed():
    model = tiny_mar(label_drop_prob=0.0)
    with torch.no_grad():  # the official init zeroes the head's adaLN and output layers: no gradient reaches z
        for p in model.diffloss.parameters():
            p.normal_(0, 0.1)
    latents, labels = torch.randn(4, 3, 4, 4), torch.tensor([0, 3, 9, 3])
    a = model(latents, labels, generator=torch.Generator().manual_seed(0))
    b = model(latents, labels, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)  # the head draws its timesteps and noise from the global RNG
    torch.manual_seed(1)
    a2 = model(latents, labels, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    b2 = model(latents, labels, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(a) and torch.equal(a2, b2) and a.shape == ()
    a.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["z_proj.weight"] is not None and grads["diffloss.net.input_proj.weight"] is not None
    assert grads["class_emb.weight"][[0, 3, 9]].abs().sum() > 0
    assert grads["class_emb.weight"][[1, 2]].abs().sum() == 0


def test_mask_ratio_distribution():
    model = tiny_mar()
    g = torch.Generator().manual_seed(0)
    ratios = [model.random_masking(torch.zeros(2, model.seq_len, 1), model.sample_orders(2, g), g).sum(1) for _ in range(400)]
    counts = torch.stack(ratios)
    assert torch.all(counts[:, 0] == counts[:, 1])  # one ratio per batch
    assert counts.min() >= math.ceil(16 * 0.7) and counts.max() <= 16
    assert counts.float().mean() > 14  # truncated normal centred at 1.0


def test_mask_schedule_predicts_every_token_once():
    for seq_len in (16, 256):
        for num_iter in (1, 2, 7, 64, seq_len):
            if num_iter > seq_len:
                continue
            masked, predicted = seq_len, 0
            for step in range(num_iter):
                nxt = next_mask_len(seq_len, step, num_iter, masked)
                pred = masked if step == num_iter - 1 else masked - nxt
                assert pred >= 1
                predicted += pred
                masked = nxt
            assert predicted == seq_len
    # official numbers: 256 tokens, 64 steps
    assert next_mask_len(256, 0, 64, 256) == math.floor(256 * np.cos(math.pi / 2 * 1 / 64))


@pytest.mark.parametrize("cfg,schedule", [(1.0, "linear"), (3.0, "linear"), (2.0, "constant")])
def test_sample_is_reproducible_from_a_seed(cfg, schedule):
    model = tiny_mar()
    state = np.random.get_state()
    a = model.sample([1, 2, 2], num_iter=4, cfg=cfg, cfg_schedule=schedule, seed=7, progress=False)
    b = model.sample(torch.tensor([1, 2, 2]), num_iter=4, cfg=cfg, cfg_schedule=schedule, seed=7, progress=False)
    c = model.sample([1, 2, 2], num_iter=4, cfg=cfg, cfg_schedule=schedule, seed=8, progress=False)
    assert a.shape == (3, 3, 4, 4) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert np.array_equal(np.random.get_state()[1], state[1])  # NumPy's global RNG is never used


@pytest.mark.parametrize("autocast,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_sample_runs_under_autocast_and_decodes_outside_it(autocast, dtype):
    """sample(autocast=...) computes the transformer and the head in that dtype (their Linear layers
    see autocast on) and decodes in the tokenizer's own dtype; the weights stay float32."""
    model = random_tiny_mar(sample_clip=(-3.0, 3.0))  # a random head's x0 would overflow fp16 otherwise
    seen = {"linear": set(), "decode": None}
    model.encoder_blocks[0].attn.qkv.register_forward_hook(
        lambda module, inputs, output: seen["linear"].add(output.dtype))
    model.diffloss.net.input_proj.register_forward_hook(lambda module, inputs, output: seen["linear"].add(output.dtype))

    class Tokenizer:
        def decode(self, latents):
            seen["decode"] = (torch.is_autocast_enabled("cpu"), latents.dtype)
            return latents

    model.tokenizer = Tokenizer()
    plain = model.sample([1, 2], num_iter=3, cfg=2.0, seed=3, progress=False)
    seen["linear"].clear()
    low = model.sample([1, 2], num_iter=3, cfg=2.0, seed=3, progress=False, autocast=autocast)
    assert seen["linear"] == {dtype} and seen["decode"] == (False, torch.float32)
    assert low.dtype == torch.float32 and torch.isfinite(low).all() and not torch.equal(low, plain)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="autocast must be None or one of"):
        model.sample([1], num_iter=2, autocast="int8")


def test_sample_tokens_official_call_and_unconditional():
    model = tiny_mar().eval()
    torch.manual_seed(0)
    out = model.sample_tokens(2, 16, 1.0, "linear", None, 1.0, False)
    assert out.shape == (2, 3, 4, 4) and torch.isfinite(out).all()
    out = model.sample_tokens(bsz=2, num_iter=3, cfg=2.0, labels=torch.tensor([4, 5]), temperature=0.5)
    assert out.shape == (2, 3, 4, 4)


def test_every_token_is_written_by_sampling():
    model = tiny_mar().eval()
    model.diffloss.sample = lambda z, *a, **k: torch.full((z.shape[0], 3), 7.0)
    out = model.sample_tokens(2, num_iter=5, cfg=1.0)
    assert torch.all(out == 7.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("variant", [{}, dict(head="transformer", denoising_head=True)], ids=["mar", "de_mar"])
def test_models_cast_to_another_dtype_sample_and_train(dtype, variant):
    """A model cast to bf16/fp16 (`MAR.load(..., dtype=)`) keeps its tokens and targets in float32,
    a float64 model in float64; both loops sample and the loss trains with latents of any float dtype."""
    # clipped x0: tokens of a latent's size (fp16 holds them); no zero-initialised layer: every weight gets a gradient
    model = random_tiny_mar(sample_clip=(-3.0, 3.0), **variant).to(dtype)
    token_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    labels = torch.tensor([1, 2])
    reference = model.sample_tokens(2, 3, cfg=2.0, labels=labels, generator=torch.Generator().manual_seed(1))
    fast = model.sample_tokens_fast(2, 3, cfg=2.0, labels=labels, generator=torch.Generator().manual_seed(1))
    assert reference.dtype == fast.dtype == token_dtype and torch.isfinite(reference).all()
    if dtype == torch.float64:
        torch.testing.assert_close(fast, reference, rtol=1e-9, atol=1e-9)
    assert model.sample([1, 2], num_iter=2, seed=0, progress=False).dtype == token_dtype
    model.train()
    for latents_dtype in (torch.float32, torch.float64):
        model.zero_grad()
        loss = model(torch.randn(2, 3, 4, 4, dtype=latents_dtype), labels, generator=torch.Generator().manual_seed(2))
        loss.backward()
        assert loss.dtype == token_dtype and torch.isfinite(loss)
        assert model.encoder_blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_bad_inputs_raise_clear_errors():
    model = tiny_mar()
    with pytest.raises(ValueError, match="latents must have shape"):
        model(torch.randn(2, 4, 4, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="latents must have shape"):
        model(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        model(torch.randn(2, 3, 4, 4), torch.tensor([0, 10]))
    with pytest.raises(ValueError, match="expected 2 labels"):
        model(torch.randn(2, 3, 4, 4), torch.tensor([0]))
    with pytest.raises(TypeError, match="labels"):
        model(torch.randn(2, 3, 4, 4), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="labels must lie"):
        model.sample([-1], progress=False)
    for bad in (0, 17, 2.5):
        with pytest.raises(ValueError, match="num_iter must be an integer in 1..16"):
            model.sample([1], num_iter=bad, progress=False)
    assert model.sample([1], num_iter=np.int64(2), seed=0, progress=False).shape == (1, 3, 4, 4)
    for bad in ([1.7, 2.9], [True, False], [None]):
        with pytest.raises(TypeError, match="labels must be integers"):
            model.sample(bad, progress=False)
    with pytest.raises(TypeError, match="labels must be a 1-D integer tensor or a list of ints"):
        model.sample(3, progress=False)
    with pytest.raises(ValueError, match="at least one class label"):
        model.sample([], progress=False)
    for sample_tokens in (model.sample_tokens, model.sample_tokens_fast):
        for bad in (0, 2.0, True):
            with pytest.raises(ValueError, match="bsz must be a positive integer"):
                sample_tokens(bad, num_iter=2)
    with pytest.raises(ValueError, match="temperature"):
        model.sample([1], num_iter=2, temperature=-1.0, progress=False)
    with pytest.raises(ValueError, match="cfg_schedule"):
        model.sample([1], num_iter=2, cfg_schedule="cosine", progress=False)
    with pytest.raises(ValueError, match="pil=True needs an attached tokenizer"):
        model.sample([1], num_iter=2, pil=True, progress=False)
    with pytest.raises(ValueError, match="seed or generator"):
        model.sample([1], num_iter=2, seed=1, generator=torch.Generator(), progress=False)
    with pytest.raises(ValueError, match="divisible"):
        MAR(img_size=10, vae_stride=4)
    for option, message in ((dict(diffusion_batch_mul=0), "diffusion_batch_mul must be a positive integer"),
                            (dict(class_num=0), "class_num must be a positive integer"),
                            (dict(label_drop_prob=1.5), "label_drop_prob must lie in")):
        with pytest.raises(ValueError, match=message):
            tiny_mar(**option)
