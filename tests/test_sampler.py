"""The sync-free sampling loop (marfast.sampler) against the reference loop `MAR.sample_tokens`."""
import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from marfast.mar import mask_by_order, next_mask_len
from marfast.sampler import (CUDA_GRAPHS_ENV_VAR, PhaseTimer, conditions_for_step, conditions_with_weights,
                             plan_steps, run_ar_loop, sample_tokens_fast, step_graphs_for, step_linear_weights)

from helpers import random_tiny_mar

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def both_loops(model, bsz, num_iter, cfg, cfg_schedule, labels, temperature, seed):
    kwargs = dict(num_iter=num_iter, cfg=cfg, cfg_schedule=cfg_schedule, labels=labels, temperature=temperature)
    reference = model.sample_tokens(bsz, generator=torch.Generator(model.device).manual_seed(seed), **kwargs)
    fast = model.sample_tokens_fast(bsz, generator=torch.Generator(model.device).manual_seed(seed), **kwargs)
    return reference, fast


CASES = [  # num_iter, cfg, cfg_schedule, conditional, temperature, sample_clip
    (1, 1.0, "linear", True, 1.0, None),
    (1, 2.0, "constant", True, 1.0, None),
    (3, 1.0, "linear", False, 0.9, None),
    (3, 2.5, "linear", True, 1.0, None),
    (3, 4.0, "constant", False, 0.0, None),
    (5, 1.5, "linear", True, 1.0, (-3.0, 3.0)),
    (16, 1.0, "constant", True, 1.0, None),
    (16, 3.0, "linear", True, 1.1, None),
]


@pytest.mark.parametrize("num_iter, cfg, cfg_schedule, conditional, temperature, sample_clip", CASES)
def test_fast_loop_equals_reference_loop(num_iter, cfg, cfg_schedule, conditional, temperature, sample_clip):
    model = random_tiny_mar(seed=num_iter, sample_clip=sample_clip)
    labels = torch.tensor([3, 0, 7]) if conditional else None
    reference, fast = both_loops(model, 3, num_iter, cfg, cfg_schedule, labels, temperature, seed=11 * num_iter)
    assert fast.shape == (3, model.vae_embed_dim, 4, 4)
    assert torch.isfinite(reference).all()
    assert torch.equal(fast, reference), f"max difference {(fast - reference).abs().max().item()}"


def test_sample_uses_the_fast_loop_with_the_reference_result():
    model = random_tiny_mar(seed=3)
    labels = torch.tensor([1, 5])
    reference = model.sample_tokens(2, 4, 2.0, labels=labels, generator=torch.Generator().manual_seed(9))
    assert torch.equal(model.sample(labels, num_iter=4, cfg=2.0, seed=9, progress=False), reference)


def test_plan_matches_reference_schedule():
    model = random_tiny_mar()
    for num_iter in (1, 2, 7, 16):
        plans = plan_steps(model, num_iter, 3.0, "linear")
        masked = model.seq_len
        for step, plan in enumerate(plans):
            mask_len = next_mask_len(model.seq_len, step, num_iter, masked)
            assert plan.masked_before == masked
            assert plan.predict_from == (0 if step == num_iter - 1 else mask_len)
            assert plan.cfg_scale == model.cfg_for_step(3.0, "linear", mask_len)
            masked = mask_len
        assert sum(plan.num_predicted for plan in plans) == model.seq_len


@pytest.mark.parametrize("use_cfg", [False, True])
def test_step_conditions_equal_reference_encoder_decoder(use_cfg):
    """Mid-sampling state: the gathered conditions are the reference's z rows of the positions
    that leave the mask, batch-major and position-ascending."""
    model = random_tiny_mar(seed=4)
    bsz, num_iter, step = 3, 4, 2
    plan = plan_steps(model, num_iter, 2.0 if use_cfg else 1.0, "linear")[step]
    orders = model.sample_orders(bsz, torch.Generator().manual_seed(2))
    mask = mask_by_order(plan.masked_before, orders).float()
    tokens = torch.randn(bsz, model.seq_len, model.token_embed_dim) * (1 - mask).unsqueeze(-1)
    class_embedding = model.class_emb(torch.tensor([1, 2, 3]))
    enc_tokens, enc_mask = tokens, mask
    if use_cfg:
        class_embedding = torch.cat([class_embedding, model.fake_latent.repeat(bsz, 1)])
        enc_tokens, enc_mask = torch.cat([tokens, tokens]), torch.cat([mask, mask])
    with torch.no_grad():
        z_all = model.forward_mae_decoder(model.forward_mae_encoder(enc_tokens, enc_mask, class_embedding), enc_mask)
        to_predict = torch.logical_xor(mask.bool(), mask_by_order(plan.predict_from, orders))
        expected = torch.cat([z_all[:bsz][to_predict], z_all[bsz:][to_predict]]) if use_cfg else z_all[to_predict]
        z, predicted, _ = conditions_for_step(model, tokens, orders, class_embedding, plan, use_cfg,
                                           torch.arange(model.buffer_size))
    assert torch.equal(z, expected)
    assert torch.equal(predicted, to_predict.nonzero()[:, 1].reshape(bsz, -1))


def test_step_on_low_precision_linear_weights_equals_autocast():
    """The CUDA graphs' transformer steps run on autocast-dtype copies of the step's Linear weights:
    under autocast the conditions are bitwise those of the fp32 weights; the copies cover every
    Linear the step runs and nothing else; the substitution is real and leaves the model as it was."""
    model = random_tiny_mar(seed=5)
    plan = plan_steps(model, 4, 2.0, "linear")[1]
    orders = model.sample_orders(2, torch.Generator().manual_seed(3))
    tokens = torch.randn(2, model.seq_len, model.token_embed_dim)
    class_embedding = torch.cat([model.class_emb(torch.tensor([1, 2])), model.fake_latent.repeat(2, 1)])

    def step(m):
        return conditions_for_step(m, tokens, orders, class_embedding, plan, True, torch.arange(model.buffer_size))

    weights = step_linear_weights(model, torch.bfloat16)
    linears = {f"{name}.weight" for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
               and name.split(".")[0] in ("z_proj", "encoder_blocks", "decoder_embed", "decoder_blocks")}
    assert set(weights) == linears and len(linears) == 2 + 4 * (len(model.encoder_blocks) + len(model.decoder_blocks))
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    assert step_linear_weights(model, torch.float32) == {}
    before = {name: p for name, p in model.named_parameters()}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = step(model)
        substituted = conditions_with_weights(model, weights, step)
        zeroed = conditions_with_weights(model, {"z_proj.weight": torch.zeros_like(weights["z_proj.weight"])}, step)
    assert all(torch.equal(a, b) for a, b in zip(substituted, expected))
    assert not torch.equal(zeroed[0], expected[0])
    assert all(p is before[name] for name, p in model.named_parameters()) and model.z_proj.weight.dtype == torch.float32


SYNC_PRONE_OPS = {"nonzero", "_local_scalar_dense", "masked_select", "masked_scatter", "item", "_unique2",
                  "unique_consecutive", "unique_dim"}


class OpRecorder(TorchDispatchMode):
    """Records (op name, input shapes) and flags ops that synchronise with the host on CUDA."""

    def __init__(self):
        super().__init__()
        self.ops, self.sync_prone = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        self.ops.append((name, tuple(tuple(t.shape) for t in tensors)))
        bool_index = name.startswith("index") and any(t.dtype in (torch.bool, torch.uint8) for t in tensors[1:])
        if name in SYNC_PRONE_OPS or bool_index:
            self.sync_prone.append(name)
        return func(*args, **kwargs)


def record_fast_loop(model, seed, labels, num_iter=3, cfg=2.5):
    """Ops of the AR loop alone (the label checks before it synchronise, by design)."""
    bsz = labels.shape[0]
    orders = model.sample_orders(bsz, torch.Generator().manual_seed(seed))
    class_embedding = torch.cat([model.class_emb(labels), model.fake_latent.repeat(bsz, 1)])
    tokens = torch.zeros(bsz, model.seq_len, model.token_embed_dim)
    recorder = OpRecorder()
    with recorder:
        run_ar_loop(model, tokens, orders, class_embedding, plan_steps(model, num_iter, cfg, "linear"), 1.0,
                    generator=torch.Generator().manual_seed(seed))
    return recorder


def test_fast_loop_has_no_sync_prone_ops_and_seed_independent_shapes():
    model = random_tiny_mar(seed=5)
    record_fast_loop(model, 0, torch.tensor([1, 1]))  # warm-up: the head caches its tables on first use
    first = record_fast_loop(model, 1, torch.tensor([2, 4]))
    second = record_fast_loop(model, 2, torch.tensor([9, 0]))
    assert first.sync_prone == []
    assert len(first.ops) > 100
    assert first.ops == second.ops  # the op sequence and every shape depend only on the step
    reference = OpRecorder()
    with reference:
        model.sample_tokens(2, 2, 2.5, generator=torch.Generator().manual_seed(1))
    assert "nonzero" in reference.sync_prone  # the recorder does see the reference loop's syncs


def test_phase_timer_splits_transformer_and_head():
    model = random_tiny_mar(seed=6)
    timer = PhaseTimer("cpu")
    reference = model.sample_tokens(2, 3, 2.0, generator=torch.Generator().manual_seed(1))
    fast = sample_tokens_fast(model, 2, 3, 2.0, generator=torch.Generator().manual_seed(1), timer=timer)
    assert torch.equal(fast, reference)
    assert set(timer.records) == {"transformer", "head"}
    assert all(len(times) == 3 for times in timer.records.values())
    assert all(total > 0 for total in timer.totals().values())


def test_bad_arguments_raise_like_the_reference():
    model = random_tiny_mar()
    with pytest.raises(ValueError, match="num_iter"):
        model.sample_tokens_fast(2, num_iter=model.seq_len + 1)
    with pytest.raises(ValueError, match="cfg_schedule"):
        model.sample_tokens_fast(2, num_iter=2, cfg_schedule="cosine")
    with pytest.raises(ValueError, match="expected 2 labels"):
        model.sample_tokens_fast(2, num_iter=2, labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="class_embedding"):
        run_ar_loop(model, torch.zeros(2, model.seq_len, model.token_embed_dim), model.sample_orders(2),
                    model.fake_latent.repeat(3, 1), plan_steps(model, 2, 1.0, "linear"), 1.0)


def test_cuda_graphs_switch(monkeypatch):
    model = random_tiny_mar()
    monkeypatch.setenv(CUDA_GRAPHS_ENV_VAR, "1")
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        model.sample_tokens_fast(2, num_iter=2)
    with torch.inference_mode():  # inference-tensor parameters have no version counter to key the cache on
        built_without_autograd = random_tiny_mar()
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device"):
        built_without_autograd.sample_tokens_fast(2, num_iter=2)
    monkeypatch.setenv(CUDA_GRAPHS_ENV_VAR, "yes")
    with pytest.raises(ValueError, match="MARFAST_CUDA_GRAPHS must be 0 or 1"):
        model.sample_tokens_fast(2, num_iter=2)
    monkeypatch.setenv(CUDA_GRAPHS_ENV_VAR, "0")
    reference = model.sample_tokens(2, 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.sample_tokens_fast(2, 2, generator=torch.Generator().manual_seed(0)), reference)


# ------------------------------------------------------------------------------------------------
# GPU: equality on CUDA (fp32 and bf16 autocast) and no host synchronisation inside the loop


def gpu_model_and_state(bsz=4, num_iter=8, cfg=3.0, seed=0):
    model = random_tiny_mar(seed=seed, device="cuda", encoder_embed_dim=128, encoder_num_heads=2,
                            decoder_embed_dim=128, decoder_num_heads=2)
    labels = torch.arange(bsz, device="cuda") % model.num_classes
    return model, labels


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_gpu_fast_loop_equals_reference_loop(autocast, cfg):
    model, labels = gpu_model_and_state(cfg=cfg)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        reference, fast = both_loops(model, 4, 8, cfg, "linear", labels, 1.0, seed=21)
    assert torch.isfinite(reference).all()
    assert torch.equal(fast, reference), f"max difference {(fast - reference).abs().max().item()}"


def run_without_sync(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
def test_gpu_transformer_steps_do_not_synchronise(autocast):
    model, labels = gpu_model_and_state()
    bsz, plans = labels.shape[0], plan_steps(model, 8, 3.0, "linear")
    orders = model.sample_orders(bsz)
    tokens = torch.randn(bsz, model.seq_len, model.token_embed_dim, device="cuda")
    class_embedding = torch.cat([model.class_emb(labels), model.fake_latent.repeat(bsz, 1)])
    buffer_positions = torch.arange(model.buffer_size, device="cuda")

    def steps():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            for plan in plans:
                conditions_for_step(model, tokens, orders, class_embedding, plan, True, buffer_positions)

    steps()  # warm-up: lazy initialisation (cuBLAS handles, kernel caches) may synchronise once
    run_without_sync(steps)


@pytest.mark.gpu
@requires_cuda
def test_gpu_ar_loop_with_head_does_not_synchronise():
    """The whole AR loop, the default diffusion head included, under sync debug mode "error"."""
    model, labels = gpu_model_and_state()
    bsz, plans = labels.shape[0], plan_steps(model, 8, 3.0, "linear")
    class_embedding = torch.cat([model.class_emb(labels), model.fake_latent.repeat(bsz, 1)])

    def loop():
        tokens = torch.zeros(bsz, model.seq_len, model.token_embed_dim, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            run_ar_loop(model, tokens, model.sample_orders(bsz), class_embedding, plans, 1.0,
                        generator=torch.Generator("cuda").manual_seed(0))

    loop()
    run_without_sync(loop)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16_autocast"])
@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_gpu_cuda_graph_loop_equals_reference_loop(autocast, cfg):
    model, labels = gpu_model_and_state(cfg=cfg)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        for seed in (31, 32):  # the second call replays the cached graphs
            reference = model.sample_tokens(4, 8, cfg, labels=labels, generator=torch.Generator("cuda").manual_seed(seed))
            graphed = sample_tokens_fast(model, 4, 8, cfg, labels=labels, cuda_graphs=True,
                                         generator=torch.Generator("cuda").manual_seed(seed))
            assert torch.equal(graphed, reference), f"max difference {(graphed - reference).abs().max().item()}"
        graphs = step_graphs_for(model, 4, cfg != 1.0)
        assert len(graphs.graphs) == 8
        assert bool(graphs.low_weights) == autocast
        assert all(w.dtype == torch.bfloat16 for w in graphs.low_weights.values())


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_cache_follows_configuration_and_parameters():
    model, labels = gpu_model_and_state()
    graphs = step_graphs_for(model, 4, True)
    assert step_graphs_for(model, 4, True) is graphs
    assert step_graphs_for(model, 2, True) is not graphs
    graphs = step_graphs_for(model, 4, True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert step_graphs_for(model, 4, True) is not graphs
    graphs = step_graphs_for(model, 4, True)
    model.z_proj.weight.data = model.z_proj.weight.data.clone()  # new storage: the old graphs are stale
    assert step_graphs_for(model, 4, True) is not graphs
    graphs = step_graphs_for(model, 4, True)
    with torch.no_grad():
        model.decoder_blocks[0].mlp.fc1.weight.mul_(1.5)  # in place: stale weight copies under autocast
    assert step_graphs_for(model, 4, True) is not graphs
    graphs = step_graphs_for(model, 4, True)
    model.load_state_dict(model.state_dict())  # every load drops the graphs (a post-hook)
    assert step_graphs_for(model, 4, True) is not graphs
    model.train()
    with pytest.raises(ValueError, match="eval mode"):
        step_graphs_for(model, 4, True)


@pytest.mark.gpu
@requires_cuda
def test_gpu_cuda_graph_ar_loop_does_not_synchronise():
    """Graph replay of the transformer steps and the default head, after capture, under sync debug "error"."""
    model, labels = gpu_model_and_state()
    bsz, plans = labels.shape[0], plan_steps(model, 8, 3.0, "linear")
    class_embedding = torch.cat([model.class_emb(labels), model.fake_latent.repeat(bsz, 1)])

    def loop():
        tokens = torch.zeros(bsz, model.seq_len, model.token_embed_dim, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            run_ar_loop(model, tokens, model.sample_orders(bsz), class_embedding, plans, 1.0,
                        generator=torch.Generator("cuda").manual_seed(0), graphs=step_graphs_for(model, bsz, True))

    loop()  # captures
    run_without_sync(loop)
