"""De-MAR (seed paper ../shared/seeds/de-mar-paper.txt): the Transformer diffusion head, the
denoising head, training-time input noise, the MAR options and presets, the two sampling loops,
checkpoints, the four ablation rows and the shipped `digits-demar` model.

Functional checks re-derive the paper's equations in float64 on fresh random weights (every
parameter randomised, so no gate or projection sits at its zero initialisation).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from marfast import MAR, checkpoint, demar_base, demar_huge, demar_large
from marfast.checkpoint import CheckpointError, infer_config, load_model
from marfast.demar import SCORE_FLOOR, DenoisingHead, TransformerDiffLoss
from marfast.diffusion import GaussianDiffusion
from marfast.mar import DEFAULT_INPUT_NOISE_MAX_T, DEMAR_ABLATIONS, PRESETS
from marfast.sampler import plan_steps, sample_tokens_fast

from helpers import tiny_mar


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise(module, seed, std=0.3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return module


def tiny_head(depth=2, width=24, heads=3, channels=3, z_channels=10, steps="5"):
    return TransformerDiffLoss(channels, z_channels, depth, width, steps, num_heads=heads)


# ------------------------------------------------------------------------------------------------
# presets and options

@pytest.mark.parametrize("build, depth, width, paper_millions", [
    (demar_base, 4, 1024, 227), (demar_large, 6, 1280, 524), (demar_huge, 9, 1280, 995)])
def test_presets_match_the_papers_table_1(build, depth, width, paper_millions):
    with torch.device("meta"):
        model = build()
    assert model.head == "transformer" and model.denoising_head is not None
    assert len(model.diffloss.net.blocks) == depth and model.diffloss.net.model_channels == width
    assert model.input_noise_max_t == DEFAULT_INPUT_NOISE_MAX_T
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / 1e6 - paper_millions) / paper_millions < 0.02


def test_default_mar_is_unchanged_by_the_de_mar_options():
    plain = tiny_mar()
    assert plain.head == "mlp" and plain.denoising_head is None and plain.input_noise_max_t == 0
    assert not any(k in plain.config for k in ("head", "denoising_head", "input_noise_max_t"))
    assert not any(k.startswith("denoising_head") for k in plain.state_dict())


@pytest.mark.parametrize("kwargs, message", [
    (dict(head="gmm"), "head must be one of"),
    (dict(head_num_heads=4), "head='transformer' only"),
    (dict(denoising_width=16), "needs denoising_head=True"),
    (dict(denoising_head=True, input_noise_max_t=1001), "input_noise_max_t"),
    (dict(denoising_head=True, input_noise_max_t=2.5), "input_noise_max_t"),
    (dict(head="transformer", head_num_heads=7), "not divisible"),
])
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_mar(**kwargs)


@pytest.mark.parametrize("width, heads", [(16, 1), (1024, 16), (1280, 20), (1000, 10), (200, 2), (67, 1)])
def test_default_head_count_divides_the_width(width, heads):
    from marfast.demar import default_head_count

    assert default_head_count(width) == heads


# ------------------------------------------------------------------------------------------------
# the Transformer diffusion head

def transformer_head_by_the_equations(net, x, t, z, context):
    """Eq. 8-9 of the paper written out row by row in float64: x [G, P, C], t [G, P], z [G, P, Z],
    context [G, L, Z] -> [G, P, 2C]."""
    def norm(v):
        mean = v.mean(-1, keepdim=True)
        return (v - mean) / torch.sqrt(((v - mean) ** 2).mean(-1, keepdim=True) + 1e-6)

    def linear(layer, v):
        return v @ layer.weight.T + layer.bias

    half = net.time_embed.frequency_embedding_size // 2
    # the sinusoidal features are float32, as in the official TimestepEmbedder
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    out = torch.empty(*x.shape[:2], net.final_linear.out_features, dtype=torch.float64)
    for g in range(x.shape[0]):
        z_ctx = norm(context[g])
        for i in range(x.shape[1]):
            args = t[g, i].float() * freqs
            features = torch.cat([args.cos(), args.sin()]).double()
            te = linear(net.time_embed.mlp[2], F.silu(linear(net.time_embed.mlp[0], features)))
            c = linear(net.adaLN_modulation[1], F.silu(linear(net.cond_embed, z[g, i]) + te))
            h = linear(net.input_proj, x[g, i])
            for block in net.blocks:
                a1, b1, a2, b2 = (block.modulation_scale * c + block.modulation_shift).chunk(4)
                attn, heads, dh = block.attn, block.attn.num_heads, block.attn.head_dim
                q = linear(attn.q, a1 * norm(h)).reshape(heads, dh)
                k, v = linear(attn.kv, z_ctx).reshape(-1, 2, heads, dh).unbind(1)
                weights = torch.softmax(torch.einsum("hd,lhd->hl", q, k) / math.sqrt(dh), dim=-1)
                y = h + torch.tanh(b1) * norm(linear(attn.proj, torch.einsum("hl,lhd->hd", weights, v).reshape(-1)))
                ffn = linear(block.mlp[2], F.gelu(linear(block.mlp[0], a2 * norm(y))))
                h = y + torch.tanh(b2) * norm(ffn)
            out[g, i] = linear(net.final_linear, norm(h))
    return out


def head_inputs(gen, groups=2, rows=3, length=5, channels=3, z_channels=10, dtype=torch.float64):
    x = torch.randn(groups, rows, channels, generator=gen, dtype=dtype)
    t = torch.randint(0, 1000, (groups, rows), generator=gen)
    z = torch.randn(groups, rows, z_channels, generator=gen, dtype=dtype)
    context = torch.randn(groups, length, z_channels, generator=gen, dtype=dtype)
    return x, t, z, context


def test_transformer_head_computes_the_papers_equations():
    head = randomise(tiny_head().double(), seed=1)
    gen = torch.Generator().manual_seed(2)
    x, t, z, context = head_inputs(gen)
    net = head.net
    out = net(x, t, z, net.context_keys_values(context))
    assert out.shape == (2, 3, 6) and out.dtype == torch.float64
    torch.testing.assert_close(out, transformer_head_by_the_equations(net, x, t, z, context), rtol=1e-10, atol=1e-10)
    assert net.blocks[0].attn.last_backend == "math"


def test_each_row_sees_only_its_own_images_context_and_rows_do_not_interact():
    head = randomise(tiny_head().double(), seed=3)
    gen = torch.Generator().manual_seed(4)
    x, t, z, context = head_inputs(gen, groups=3, rows=4)
    net = head.net
    out = net(x, t, z, net.context_keys_values(context))
    changed = context.clone()
    changed[1] = torch.randn(changed[1].shape, generator=gen, dtype=changed.dtype)  # (a constant shift would be normed away)
    out_changed = net(x, t, z, net.context_keys_values(changed))
    torch.testing.assert_close(out_changed[[0, 2]], out[[0, 2]], rtol=0, atol=0)
    assert (out_changed[1] - out[1]).abs().max() > 1e-3
    perm = torch.tensor([2, 0, 3, 1])
    out_perm = net(x[:, perm], t[:, perm], z[:, perm], net.context_keys_values(context))
    torch.testing.assert_close(out_perm, out[:, perm], rtol=1e-12, atol=1e-12)


def test_fresh_head_blocks_are_identities_and_every_parameter_gets_a_gradient_once_trained_a_step():
    torch.manual_seed(0)
    head = tiny_head().double()
    gen = torch.Generator().manual_seed(5)
    x, t, z, context = head_inputs(gen)
    net = head.net
    out = net(x, t, z, net.context_keys_values(context))
    assert torch.equal(out, torch.zeros_like(out))  # zero output layer, identity blocks at init
    h = net.input_proj(x)
    c = net.adaLN_modulation(net.cond_embed(z) + net.time_embed(t.reshape(-1)).reshape(2, 3, -1))
    kv = net.context_keys_values(context)
    torch.testing.assert_close(net.blocks[0](h, c, *kv[0]), h, rtol=0, atol=0)
    target = torch.randn(2, 3, 3, generator=gen, dtype=torch.float64)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        head(target, z, context).backward()
        optimizer.step()
    head.zero_grad()
    head(target, z, context).backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert missing == []


def test_head_loss_is_the_diffusion_loss_of_the_grouped_denoiser():
    head = randomise(tiny_head().double(), seed=6)
    gen = torch.Generator().manual_seed(7)
    x0, t, z, context = head_inputs(gen)
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    mask = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]], dtype=torch.float64)
    loss = head(x0, z, context, mask, t=t, noise=noise)
    diffusion = GaussianDiffusion(1000)
    flat = lambda a: a.reshape(6, *a.shape[2:])  # noqa: E731
    x_t = diffusion.q_sample(flat(x0), flat(t), flat(noise))
    out = transformer_head_by_the_equations(head.net, x_t.reshape(2, 3, 3), t, z, context)
    per_row = diffusion.training_losses(flat(out), flat(x0), x_t, flat(t), flat(noise))
    torch.testing.assert_close(loss, (per_row * flat(mask)).sum() / mask.sum(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_head_sampling_is_the_ddpm_loop_over_grouped_rows(cfg):
    """sample() against a hand-written loop: rows regrouped per image, keys/values per image,
    CFG mixing of eps across the two halves, the shared respaced posterior step."""
    head = randomise(tiny_head().double(), seed=8, std=0.1)
    gen = torch.Generator().manual_seed(9)
    groups, rows_per_image = 4, 3
    _, _, z, context = head_inputs(gen, groups=groups, rows=rows_per_image)
    z_rows = z.reshape(-1, z.shape[-1])
    half = z_rows.shape[0] // 2 if cfg != 1.0 else z_rows.shape[0]
    x_start = torch.randn(half, 3, generator=gen, dtype=torch.float64)
    seed = 11
    out = head.sample(z_rows, context, temperature=0.7, cfg=cfg, noise=x_start,
                      generator=torch.Generator().manual_seed(seed))
    draws = torch.Generator().manual_seed(seed)
    diffusion = head.gen_diffusion
    x = torch.cat([x_start, x_start]) if cfg != 1.0 else x_start.clone()
    kv = head.net.context_keys_values(context)
    for step in reversed(range(diffusion.num_timesteps)):
        t = diffusion.timestep_map[step].expand(x.shape[0])
        x_in = torch.cat([x[:half]] * 2) if cfg != 1.0 else x
        net_out = head.net(x_in.reshape(groups, rows_per_image, 3), t.reshape(groups, -1), z, kv).reshape(-1, 6)
        eps, v = net_out[:, :3], net_out[:, 3:]
        if cfg != 1.0:
            guided = eps[half:] + cfg * (eps[:half] - eps[half:])
            eps = torch.cat([guided, guided])
        x = diffusion.p_sample_step(eps, v, x, step, torch.randn(x.shape, generator=draws, dtype=x.dtype), 0.7)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


def test_head_bad_inputs_raise():
    head = tiny_head()
    gen = torch.Generator().manual_seed(0)
    x, t, z, context = head_inputs(gen, dtype=torch.float32)
    with pytest.raises(ValueError, match="3 dimensions"):
        head(x[0], z, context)
    with pytest.raises(ValueError, match="same \\[G, P\\]"):
        head(x, z[:, :2], context)
    with pytest.raises(ValueError, match="context must hold 2 images"):
        head(x, z, context[:1])
    with pytest.raises(ValueError, match="mask must have shape"):
        head(x, z, context, torch.ones(6))
    with pytest.raises(ValueError, match="channels"):
        head.sample(z.reshape(6, -1), context[..., :4])
    with pytest.raises(ValueError, match="split evenly"):
        head.sample(z.reshape(6, -1)[:5], context)
    with pytest.raises(ValueError, match="even count"):
        head.sample(z.reshape(6, -1)[:3], context[:1], cfg=2.0)


# ------------------------------------------------------------------------------------------------
# the denoising head

def test_denoising_head_computes_the_papers_equations():
    head = randomise(DenoisingHead(3, 5, 7).double(), seed=12)
    gen = torch.Generator().manual_seed(13)
    noisy, z, clean = (torch.randn(9, d, generator=gen, dtype=torch.float64) for d in (3, 5, 3))
    o = F.silu(torch.cat([noisy, z], 1) @ head.refine_fc1.weight.T + head.refine_fc1.bias)
    y = o @ head.refine_fc2.weight.T + head.refine_fc2.bias + noisy  # eq. 2
    torch.testing.assert_close(head.refine(noisy, z), y, rtol=1e-12, atol=1e-12)
    a = F.silu(torch.cat([noisy, y, z], 1) @ head.assess_fc1.weight.T + head.assess_fc1.bias)
    s = a @ head.assess_fc2.weight.T + head.assess_fc2.bias  # eq. 4
    torch.testing.assert_close(head.assess(noisy, y, z), s, rtol=1e-12, atol=1e-12)
    floored = s.clamp_min(SCORE_FLOOR)
    mixed = (floored[:, :1] * noisy + floored[:, 1:] * y) / floored.sum(1, keepdim=True)
    torch.testing.assert_close(head(noisy, z), mixed, rtol=1e-12, atol=1e-12)
    refine_loss, assess_loss = head.losses(noisy, z, clean)
    cos = lambda u, v: (u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))  # noqa: E731
    torch.testing.assert_close(refine_loss, (y - clean).norm(dim=1).mean(), rtol=1e-12, atol=1e-12)  # eq. 3
    expected_assess = ((s[:, 0] - cos(noisy, clean)).abs() + (s[:, 1] - cos(y, clean)).abs()).mean()  # eq. 5-6
    torch.testing.assert_close(assess_loss, expected_assess, rtol=1e-12, atol=1e-12)


def test_denoising_head_bad_inputs_raise():
    head = DenoisingHead(3, 5, 7)
    noisy, z = torch.randn(4, 3), torch.randn(4, 5)
    with pytest.raises(ValueError, match="noisy tokens must have 3 channels"):
        head(torch.randn(4, 2), z)
    with pytest.raises(ValueError, match="z must have 5 channels"):
        head(noisy, torch.randn(4, 6))
    with pytest.raises(ValueError, match="same rows"):
        head(noisy, z[:3])
    with pytest.raises(ValueError, match="same rows"):
        head.losses(noisy, z, noisy[:2])
    with pytest.raises(TypeError, match="floating-point"):
        head(noisy.long(), z)


def test_denoising_head_gradients_and_detached_assessment():
    head = randomise(DenoisingHead(3, 5, 7).double(), seed=14)
    gen = torch.Generator().manual_seed(15)
    noisy, clean = (torch.randn(6, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    z = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    _, assess_loss = head.losses(noisy, z, clean)
    assess_loss.backward()
    assert all(p.grad is None for p in (head.refine_fc1.weight, head.refine_fc2.weight))  # the judge does not steer
    assert head.assess_fc1.weight.grad.abs().max() > 0 and z.grad.abs().max() > 0
    head.zero_grad()
    refine_loss, _ = head.losses(noisy, z, clean)
    refine_loss.backward()
    assert head.refine_fc1.weight.grad.abs().max() > 0 and head.assess_fc1.weight.grad is None
    assert torch.autograd.gradcheck(lambda zz: head.losses(noisy, zz, clean)[0], (z.detach().requires_grad_(),))


def test_denoising_head_starts_as_identity_and_handles_no_rows_and_low_scores():
    head = DenoisingHead(3, 5, 7).double()
    gen = torch.Generator().manual_seed(16)
    noisy, z = torch.randn(4, 3, generator=gen, dtype=torch.float64), torch.randn(4, 5, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(head.refine(noisy, z), noisy, rtol=0, atol=0)
    torch.testing.assert_close(head(noisy, z), noisy, rtol=1e-12, atol=1e-12)  # y = x', any weights
    losses = head.losses(noisy[:0], z[:0], noisy[:0])
    assert [float(v.detach()) for v in losses] == [0.0, 0.0]
    sum(losses).backward()
    with torch.no_grad():
        head.assess_fc2.weight.zero_()
        head.assess_fc2.bias.copy_(torch.tensor([-0.5, -2.0]))  # both scores negative: floored, equal weights
        head.refine_fc2.bias.fill_(1.0)
    torch.testing.assert_close(head(noisy, z), noisy + 0.5, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# MAR with the De-MAR options: training

def test_input_noise_is_ddpm_forward_noise_below_the_configured_level(monkeypatch):
    model = tiny_mar(denoising_head=True, input_noise_max_t=1)
    seen = {}
    original = MAR.forward_mae_encoder

    def spy(self, x, mask, class_embedding, generator=None):
        seen["x"], seen["mask"] = x.detach().clone(), mask.clone()
        return original(self, x, mask, class_embedding, generator)

    monkeypatch.setattr(MAR, "forward_mae_encoder", spy)
    latents = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    model(latents, torch.arange(4))
    clean = model.patchify(latents)
    # t = 0 only: x' = sqrt(abar_0) x + sqrt(1 - abar_0) eps, abar_0 = 1 - beta_0 of the cosine schedule
    abar0 = float(GaussianDiffusion(1000).alphas_cumprod[0])
    eps = (seen["x"] - math.sqrt(abar0) * clean) / math.sqrt(1 - abar0)
    assert abs(float(eps.std()) - 1.0) < 0.25 and abs(float(eps.mean())) < 0.25
    model = tiny_mar(denoising_head=True, input_noise_max_t=1000)
    model(latents, torch.arange(4))
    assert (seen["x"] - clean).abs().max() > 1.0  # the full range reaches pure noise
    plain = tiny_mar()
    plain(latents, torch.arange(4))
    torch.testing.assert_close(seen["x"], clean, rtol=0, atol=0)


def test_training_loss_adds_the_denoising_losses_on_the_unmasked_tokens(monkeypatch):
    torch.manual_seed(0)
    model = tiny_mar(denoising_head=True)
    calls = {}
    losses, forward_loss = DenoisingHead.losses, MAR.forward_loss

    def spy_losses(self, noisy, z, clean):
        out = losses(self, noisy, z, clean)
        calls["rows"], calls["denoising"] = noisy.shape[0], [float(v.detach()) for v in out]
        return out

    def spy_forward_loss(self, z, target, mask):
        out = forward_loss(self, z, target, mask)
        calls["diffusion"], calls["unmasked"] = float(out.detach()), int((mask == 0).sum())
        return out

    monkeypatch.setattr(DenoisingHead, "losses", spy_losses)
    monkeypatch.setattr(MAR, "forward_loss", spy_forward_loss)
    latents = torch.randn(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    loss = model(latents, torch.arange(3), generator=torch.Generator().manual_seed(2))
    assert calls["rows"] == calls["unmasked"] > 0
    assert min(calls["denoising"]) > 0
    assert float(loss.detach()) == pytest.approx(calls["diffusion"] + sum(calls["denoising"]), rel=1e-6)
    loss.backward()
    assert model.denoising_head.assess_fc1.weight.grad.abs().max() > 0
    assert model.encoder_blocks[0].attn.qkv.weight.grad.abs().max() > 0


@pytest.mark.parametrize("row", sorted(DEMAR_ABLATIONS))
def test_every_ablation_row_trains_and_its_two_sampling_loops_agree(row):
    torch.manual_seed(0)
    model = tiny_mar(**DEMAR_ABLATIONS[row])
    gen = torch.Generator().manual_seed(3)
    latents = torch.randn(8, 3, 4, 4, generator=gen).clamp(-2, 2)
    labels = torch.arange(8) % 10

    def eval_loss():
        with torch.no_grad():
            return float(model(latents, labels, generator=torch.Generator().manual_seed(4)))

    model.eval()
    before = eval_loss()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(25):
        optimizer.zero_grad()
        model(latents, labels, generator=gen).backward()
        optimizer.step()
    model.eval()
    assert eval_loss() < before
    for cfg in (1.0, 3.0):
        reference = model.sample_tokens(5, num_iter=4, cfg=cfg, labels=torch.arange(5),
                                        generator=torch.Generator().manual_seed(5))
        fast = model.sample_tokens_fast(5, num_iter=4, cfg=cfg, labels=torch.arange(5),
                                        generator=torch.Generator().manual_seed(5))
        assert reference.shape == (5, 3, 4, 4) and torch.isfinite(reference).all()
        assert torch.equal(reference, fast)


def test_sampling_refines_the_known_tokens_every_step(monkeypatch):
    torch.manual_seed(0)
    model = randomise(tiny_mar(denoising_head=True), seed=17, std=0.05).eval()
    calls = []
    original = DenoisingHead.forward

    def spy(self, noisy, z):
        calls.append(noisy.shape[0])
        return original(self, noisy, z)

    monkeypatch.setattr(DenoisingHead, "forward", spy)
    num_iter, bsz = 5, 2
    refined = model.sample_tokens_fast(bsz, num_iter=num_iter, cfg=2.0, labels=torch.tensor([1, 2]),
                                       generator=torch.Generator().manual_seed(6))
    plans = plan_steps(model, num_iter, 2.0, "linear")
    assert calls == [bsz * (model.seq_len - p.masked_before) for p in plans if p.masked_before < model.seq_len]
    model.denoising_head = None
    unrefined = model.sample_tokens_fast(bsz, num_iter=num_iter, cfg=2.0, labels=torch.tensor([1, 2]),
                                         generator=torch.Generator().manual_seed(6))
    assert not torch.equal(refined, unrefined)


# ------------------------------------------------------------------------------------------------
# checkpoints

def test_de_mar_checkpoints_round_trip(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = randomise(tiny_mar(head="transformer", head_num_heads=4, denoising_head=True, denoising_width=12,
                               input_noise_max_t=50), seed=18, std=0.05)
    model.save_pretrained(tmp_path / "demar")
    loaded = MAR.load(tmp_path / "demar")
    assert loaded.config == model.config
    assert loaded.diffloss.net.blocks[0].attn.num_heads == 4 and loaded.input_noise_max_t == 50
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in loaded.state_dict().items())
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "flat.safetensors"))
    with pytest.raises(CheckpointError, match="attention-head count"):
        load_model(tmp_path / "flat.safetensors")
    monkeypatch.setitem(checkpoint.HEADS_BY_WIDTH, 32, 2)  # the tiny width stands in for an official one
    mlp = randomise(tiny_mar(denoising_head=True, denoising_width=12), seed=19, std=0.05)
    inferred = infer_config(mlp.state_dict())
    assert (inferred["denoising_head"], inferred["denoising_width"]) == (True, 12)
    save_file(mlp.state_dict(), str(tmp_path / "flat_mlp.safetensors"))
    flat = load_model(tmp_path / "flat_mlp.safetensors")
    assert all(torch.equal(mlp.state_dict()[k], v) for k, v in flat.state_dict().items())


def test_de_mar_trains_with_the_trainer_and_its_checkpoint_loads(tmp_path):
    from marfast.train import TrainConfig, Trainer

    torch.manual_seed(0)
    init = tmp_path / "init"
    tiny_mar(head="transformer", head_num_heads=4, denoising_head=True).save_pretrained(init)
    latents = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(latents, torch.arange(16) % 10)
    config = TrainConfig(output_dir=str(tmp_path / "run"), model=str(init), batch_size=8, epochs=1, max_steps=2,
                         lr=1e-3, warmup_epochs=0.0, save_every_steps=2, log_every_steps=1, progress=False,
                         precision="fp32")
    history = Trainer(config, dataset=data, log=lambda *a: None).train()
    assert len(history) == 2 and all(math.isfinite(v) for v in history)
    loaded = MAR.load(tmp_path / "run" / "checkpoint-last.pth")  # config from the checkpoint's model_config
    ema = MAR.load(tmp_path / "run" / "ema")
    assert loaded.config == ema.config and loaded.diffloss.net.blocks[0].attn.num_heads == 4
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ema.state_dict().items())


def test_de_mar_presets_are_training_presets():
    assert {"demar_base", "demar_large", "demar_huge"} <= set(PRESETS)
    assert PRESETS["demar_base"]["diffloss_d"] == 4 and PRESETS["demar_huge"]["diffloss_w"] == 1280


# ------------------------------------------------------------------------------------------------
# GPU: bf16 under the flash attention backend

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_transformer_head_bf16_matches_float32_under_flash_attention():
    torch.manual_seed(0)
    head = randomise(TransformerDiffLoss(16, 768, 4, 1024, "100"), seed=19, std=0.02).cuda()
    gen = torch.Generator(device="cuda").manual_seed(20)
    x = torch.randn(8, 4, 16, device="cuda", generator=gen)
    t = torch.randint(0, 1000, (8, 4), device="cuda", generator=gen)
    z = torch.randn(8, 4, 768, device="cuda", generator=gen)
    context = torch.randn(8, 256, 768, device="cuda", generator=gen)
    expected = head.net(x, t, z, head.net.context_keys_values(context))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = head.net(x, t, z, head.net.context_keys_values(context))
    assert head.net.blocks[0].attn.last_backend in ("fa2", "fa4", "sdpa_flash")
    # bf16 GEMMs and attention (8-bit mantissa) through 4 post-normed blocks: 5% of the output scale
    scale = expected.abs().max()
    assert (got.float() - expected).abs().max() <= 0.05 * scale


# ------------------------------------------------------------------------------------------------
# digits: the recipe's variants and the shipped `digits-demar` model

def test_digits_recipe_builds_and_trains_every_ablation_row(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn")
    from marfast.recipes import digits as recipe

    assert set(recipe.VARIANTS) == set(DEMAR_ABLATIONS)
    with pytest.raises(ValueError, match="variant must be one of"):
        recipe.build_digits_model("gmm")
    model, stats = recipe.train(steps=2, batch_size=16, seed=1, progress=False, log=lambda *_: None,
                                variant="de_mar")
    assert stats["variant"] == "de_mar" and model.head == "transformer" and model.denoising_head is not None
    model.save_pretrained(tmp_path / "m")
    loaded = MAR.load(tmp_path / "m")
    assert loaded.config == model.config and loaded.config["tokenizer"]["type"] == "pixel_patch"
    images = loaded.sample([1, 2], num_iter=2, cfg=2.0, seed=0, progress=False)
    assert images.dtype == torch.uint8 and images.shape == (2, 8, 8)
    assert recipe.build_digits_model("denoising_head", input_noise_max_t=25).input_noise_max_t == 25
    for argv, message in ((["--input-noise-max-t", "25"], "needs a variant with the denoising head"),
                          (["--variant", "de_mar", "--input-noise-max-t", "2000"], "must lie in 0..1000")):
        with pytest.raises(SystemExit) as exc:
            recipe.main(argv + ["--out", str(tmp_path / "x")])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_packaged_de_mar_digits_meets_the_default_models_quality_bar():
    """The same bar as tests/test_digits.py applies to the default model (measured values:
    marfast/weights/digits-demar/METRICS.md)."""
    pytest.importorskip("sklearn", reason="the digits quality judge needs scikit-learn")
    from marfast.recipes.digits_quality import DEFAULT_CFG, DEFAULT_NUM_ITER, DigitsJudge, evaluate, format_metrics

    model = MAR.load("digits-demar")
    assert model.head == "transformer" and model.denoising_head is not None
    metrics = evaluate(model, DigitsJudge(), per_class=20, cfg=DEFAULT_CFG, num_iter=DEFAULT_NUM_ITER,
                       unconditional=100, seed=0)
    print("\n" + format_metrics(metrics))
    assert metrics["accuracy"] >= 0.95
    assert all(count > 0 for count in metrics["unconditional_class_counts"])
    assert metrics["fd_generated"] < metrics["fd_reference"]["noisy_train"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("row", sorted(DEMAR_ABLATIONS))
def test_gpu_every_ablation_row_samples_the_same_in_both_loops_and_under_cuda_graphs(row):
    """On CUDA in bf16 autocast (flash attention, the fused MLP head where the row has it): the
    sync-free loop, with and without CUDA graphs of the transformer steps, equals the reference."""
    torch.manual_seed(0)
    model = randomise(tiny_mar(**DEMAR_ABLATIONS[row], encoder_embed_dim=64, decoder_embed_dim=64,
                               encoder_num_heads=1, decoder_num_heads=1), seed=21, std=0.05).cuda().eval()
    labels = torch.arange(4, device="cuda")
    runs = {}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for name, cuda_graphs in (("fast", False), ("graphs", True)):
            runs[name] = sample_tokens_fast(model, 4, num_iter=4, cfg=2.0, labels=labels, cuda_graphs=cuda_graphs,
                                            generator=torch.Generator("cuda").manual_seed(1))
        runs["reference"] = model.sample_tokens(4, num_iter=4, cfg=2.0, labels=labels,
                                                generator=torch.Generator("cuda").manual_seed(1))
    assert torch.isfinite(runs["reference"]).all()
    assert torch.equal(runs["fast"], runs["reference"]) and torch.equal(runs["graphs"], runs["reference"])
