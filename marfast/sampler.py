"""Sync-free MAR sampling loop: the same latents as `MAR.sample_tokens`, with no host
synchronisation inside the AR loop.

Every row masks the same number of positions, so the schedule (positions masked before and after
each step, the CFG scale of each step) is computed on the host up front (`plan_steps`). Inside the
loop, the known and to-predict positions come from slices of the per-sample orders, sorted so
that they are visited position-ascending as boolean-mask indexing would: the encoder gathers the
buffer and known positions, the decoder scatters them into a mask-token sequence, and the
conditions of the positions to predict are gathered batch-major and position-ascending, which is
the row order of the reference loop. Each step's tensor shapes depend only on the step index.
The head is called exactly as the reference loop calls it, so every random draw (orders, x_T and
per-step noise of the diffusion head) has the same shape in the same order: for the same
generator the result equals the reference loop's.
"""
import os
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.func import functional_call
from tqdm import tqdm

from .attention import requested_backend as requested_attention_backend
from .mar import check_batch_size, next_mask_len, sampling_class_embeddings

CUDA_GRAPHS_ENV_VAR = "MARFAST_CUDA_GRAPHS"


@dataclass(frozen=True)
class StepPlan:
    """One AR step: positions with order ranks [0, masked_before) are masked when it starts; it
    predicts ranks [predict_from, masked_before); the head runs with CFG scale `cfg_scale`."""

    step: int
    masked_before: int
    predict_from: int
    cfg_scale: float

    @property
    def num_predicted(self):
        return self.masked_before - self.predict_from


def plan_steps(model, num_iter, cfg, cfg_schedule):
    """The host-side schedule of `MAR.sample_tokens`: a tuple of `num_iter` StepPlans."""
    seq_len, masked_now, plans = model.seq_len, model.seq_len, []
    for step in range(num_iter):
        mask_len = next_mask_len(seq_len, step, num_iter, masked_now)
        predict_from = 0 if step >= num_iter - 1 else mask_len
        plans.append(StepPlan(step, masked_now, predict_from, model.cfg_for_step(cfg, cfg_schedule, mask_len)))
        masked_now = mask_len
    return tuple(plans)


def sorted_positions(orders, start, stop):
    """Positions of order ranks [start, stop) of each row, ascending: long [B, stop - start]."""
    return orders[:, start:stop].sort(dim=1).values


def conditions_for_step(model, tokens, orders, class_embedding, plan, use_cfg, buffer_positions):
    """The transformer half of one AR step (no host synchronisation, shapes fixed by `plan`).

    tokens [B, L, Ct] (known positions hold sampled tokens), orders long [B, L], class_embedding
    [B', D] (B' = 2B with CFG: conditional rows, then the fake latent), buffer_positions long
    [buffer] (0..buffer-1). Returns the head conditions [B' * P, Dd] (with CFG the conditional
    rows first; within each half batch-major, position-ascending), the predicted positions
    long [B, P], P = plan.num_predicted, and the decoder outputs of every position [B', L, Dd].
    """
    bsz = tokens.shape[0]
    known = sorted_positions(orders, plan.masked_before, orders.shape[1])
    kept = torch.cat([buffer_positions.expand(bsz, -1), known + model.buffer_size], dim=1)
    enc_tokens = torch.cat([tokens, tokens]) if use_cfg else tokens
    if use_cfg:
        kept = torch.cat([kept, kept])
    x = model.embed_encoder_inputs(enc_tokens, class_embedding)
    x = model.run_encoder(x.gather(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1])))
    x = model.decoder_embed(x)
    x_after_pad = model.mask_token.to(x.dtype).repeat(x.shape[0], model.buffer_size + model.seq_len, 1)
    x_after_pad.scatter_(1, kept.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x)
    z_all = model.run_decoder(x_after_pad)
    predicted = sorted_positions(orders, plan.predict_from, plan.masked_before)
    index = predicted.unsqueeze(-1).expand(-1, -1, z_all.shape[-1])
    if use_cfg:
        z = torch.cat([z_all[:bsz].gather(1, index), z_all[bsz:].gather(1, index)])
    else:
        z = z_all.gather(1, index)
    return z.reshape(-1, z.shape[-1]), predicted, z_all


def refine_known_tokens(model, tokens, orders, z_all, plan):
    """De-MAR's denoising head on the positions known when `plan` starts: tokens [B, L, Ct] are
    updated in place from the conditional decoder outputs z_all[:B] (no host synchronisation)."""
    bsz, seq_len, channels = tokens.shape
    if plan.masked_before == seq_len:
        return
    known = sorted_positions(orders, plan.masked_before, seq_len)
    token_index = known.unsqueeze(-1).expand(-1, -1, channels)
    z_known = z_all[:bsz].gather(1, known.unsqueeze(-1).expand(-1, -1, z_all.shape[-1]))
    refined = model.denoising_head(tokens.gather(1, token_index).reshape(-1, channels),
                                   z_known.reshape(-1, z_all.shape[-1]))
    tokens.scatter_(1, token_index, refined.reshape(bsz, -1, channels).to(tokens.dtype))


STEP_LINEARS = ("z_proj", "encoder_blocks", "decoder_embed", "decoder_blocks")


def step_linear_weights(model, dtype):
    """{parameter name: weight in dtype} for the float32 weights of the nn.Linear layers that
    `conditions_for_step` runs (under `STEP_LINEARS`); empty for float32 or float64 dtype."""
    if dtype not in (torch.bfloat16, torch.float16):
        return {}
    weights = {}
    for attribute in STEP_LINEARS:
        for name, module in getattr(model, attribute).named_modules(prefix=attribute):
            if isinstance(module, nn.Linear) and module.weight.dtype == torch.float32:
                weights[f"{name}.weight"] = module.weight.detach().to(dtype)
    return weights


class _StepCall(nn.Module):
    """forward() = step(model): lets `functional_call` substitute the model's parameters."""

    def __init__(self, model, step):
        super().__init__()
        self.model, self.step = model, step

    def forward(self):
        return self.step(self.model)


def conditions_with_weights(model, weights, step):
    """step(model) with the parameters named in `weights` ({name: tensor}) replaced by those
    tensors for the call (`torch.func.functional_call`); the model is unchanged afterwards."""
    if not weights:
        return step(model)
    return functional_call(_StepCall(model, step), {f"model.{name}": w for name, w in weights.items()}, ())


class StepGraphs:
    """CUDA graphs of the transformer half of the AR steps (`conditions_for_step`) for one batch
    size, CFG setting, autocast state and set of parameter tensors.

    Static input buffers `tokens` [B, L, Ct], `orders` long [B, L] and `class_embedding` [B', D]
    are read by every replay. One graph per step shape (masked_before, predict_from) is captured
    by `capture` (which runs each step once eagerly first and synchronises: call it before the
    loop); all graphs share one memory pool, which is safe in any replay order because each
    replay's outputs are consumed before the next replay. It keeps no reference to the model (it
    is cached in a WeakKeyDictionary keyed by the model). Autocast is re-entered with its
    weight-cast cache off during capture, as CUDA graphs require; so that the graphs do not cast
    every Linear weight at every replay, the float32 weights of the step's Linear layers are held
    as copies in autocast's dtype (bf16/fp16: `step_linear_weights`, half the transformer's fp32
    size in extra memory) and the steps run on them. Autocast would compute the same casts, so
    the results do not change.
    """

    def __init__(self, model, bsz, use_cfg):
        if model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, got {model.device}")
        if model.training:
            raise ValueError("CUDA-graph sampling needs the model in eval mode (no dropout)")
        dev = model.device
        self.use_cfg = use_cfg
        self.autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
        self.tokens = torch.zeros(bsz, model.seq_len, model.token_embed_dim, device=dev, dtype=model.token_dtype)
        self.orders = torch.zeros(bsz, model.seq_len, dtype=torch.long, device=dev)
        self.class_embedding = torch.zeros(2 * bsz if use_cfg else bsz, model.fake_latent.shape[-1],
                                           dtype=model.fake_latent.dtype, device=dev)
        self.buffer_positions = torch.arange(model.buffer_size, device=dev)
        self.low_weights = step_linear_weights(model, self.autocast[1] if self.autocast[0] else torch.float32)
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(dev)
        self.graphs = {}

    @staticmethod
    def step_key(plan):
        return plan.masked_before, plan.predict_from

    def load(self, tokens, orders, class_embedding):
        """Copy the loop's starting state into the static buffers (no synchronisation)."""
        for name, value in (("tokens", tokens), ("orders", orders), ("class_embedding", class_embedding)):
            buffer = getattr(self, name)
            if value.shape != buffer.shape:
                raise ValueError(f"{name} must have shape {tuple(buffer.shape)} for these graphs, got {tuple(value.shape)}")
            buffer.copy_(value)

    def _step(self, model, plan):
        return conditions_with_weights(model, self.low_weights, lambda m: conditions_for_step(
            m, self.tokens, self.orders, self.class_embedding, plan, self.use_cfg, self.buffer_positions))

    def capture(self, model, plans):
        """Capture the graphs of `model`'s steps in `plans` that have none yet (synchronises)."""
        missing = {self.step_key(plan): plan for plan in plans if self.step_key(plan) not in self.graphs}
        if not missing:
            return
        enabled, dtype = self.autocast
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=enabled, cache_enabled=False):
            self.stream.wait_stream(torch.cuda.current_stream())
            # every step once eagerly, outside any capture: lazy initialisation (library handles,
            # workspaces) and the Triton kernels' tuning and timed choices for the step's shapes
            with torch.cuda.stream(self.stream):
                for plan in missing.values():
                    self._step(model, plan)
            for key, plan in missing.items():
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
                    outputs = self._step(model, plan)
                self.graphs[key] = (graph, outputs)
            torch.cuda.current_stream().wait_stream(self.stream)

    def run(self, plan):
        """Replay the step's graph: (conditions [B' * P, Dd], predicted positions long [B, P],
        decoder outputs [B', L, Dd])."""
        graph, outputs = self.graphs[self.step_key(plan)]
        graph.replay()
        return outputs


_step_graphs = weakref.WeakKeyDictionary()


def _forget_step_graphs(model, incompatible_keys):
    _step_graphs.pop(model, None)


def step_graphs_for(model, bsz, use_cfg):
    """The StepGraphs of `model` for this batch size, CFG setting and the current autocast state and
    attention backend request, cached on the model (one configuration at a time, so the graphs'
    memory pool of a previous configuration is released). Parameters replaced or updated in place
    since the capture (e.g. by `.to(dtype)`, `load_state_dict` or an optimizer step; writes through
    `.data` bypass version counters) invalidate the cache; so does any `load_state_dict` into the
    model (a post-hook: under inference_mode it writes inference tensors, which have no version)."""
    key = (bsz, use_cfg, model.training, torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
           requested_attention_backend(),
           tuple((p.data_ptr(), None if p.is_inference() else p._version, p.dtype, p.shape)
                 for p in model.parameters()))
    cached = _step_graphs.get(model)
    if cached is None or cached[0] != key:
        _step_graphs.pop(model, None)
        cached = (key, StepGraphs(model, bsz, use_cfg))
        _step_graphs[model] = cached
        if _forget_step_graphs not in model._load_state_dict_post_hooks.values():
            model.register_load_state_dict_post_hook(_forget_step_graphs)
    return cached[1]


def cuda_graphs_requested():
    """MARFAST_CUDA_GRAPHS=1 turns on CUDA-graph replay of the transformer steps (default off)."""
    value = os.environ.get(CUDA_GRAPHS_ENV_VAR, "0").strip()
    if value not in ("0", "1"):
        raise ValueError(f"{CUDA_GRAPHS_ENV_VAR} must be 0 or 1, got {value!r}")
    return value == "1"


class PhaseTimer:
    """Total time of named phases of a loop without host synchronisation inside it.

    On CUDA each phase is bracketed by CUDA events (read once, in `totals`, after a synchronise);
    on other devices by the wall clock. Use `with timer.phase(name): ...`.
    """

    def __init__(self, device):
        self.use_events = torch.device(device).type == "cuda"
        self.records = {}

    @contextmanager
    def phase(self, name):
        if self.use_events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.records.setdefault(name, []).append((start, end))
        else:
            start = time.perf_counter()
            yield
            self.records.setdefault(name, []).append(time.perf_counter() - start)

    def totals(self):
        """Seconds spent in each phase: {name: float}."""
        if not self.use_events:
            return {name: sum(times) for name, times in self.records.items()}
        torch.cuda.synchronize()
        return {name: sum(s.elapsed_time(e) for s, e in pairs) / 1e3 for name, pairs in self.records.items()}


@contextmanager
def _untimed(name):
    yield


@torch.no_grad()
def run_ar_loop(model, tokens, orders, class_embedding, plans, temperature, *, generator=None, progress=False,
                timer=None, graphs=None):
    """The AR loop; fills `tokens` [B, L, Ct] in place with no host synchronisation.

    orders long [B, L]; class_embedding [B', D] (B' = 2B with CFG: conditional rows, then the
    fake latent); plans from `plan_steps`; temperature a float. timer: optional PhaseTimer that
    receives the phases "transformer" (encoder and decoder with their gathers and scatters),
    "denoising head" (De-MAR models only) and "head" (the diffusion head's sampling and the token
    write) of every step. graphs: optional
    StepGraphs; the transformer steps are then replayed CUDA graphs (any missing graph is captured
    before the loop, which synchronises).
    """
    bsz = tokens.shape[0]
    if class_embedding.shape[0] not in (bsz, 2 * bsz):
        raise ValueError(f"class_embedding must have {bsz} rows (no CFG) or {2 * bsz} (CFG), got {class_embedding.shape[0]}")
    use_cfg = class_embedding.shape[0] == 2 * bsz
    if graphs is None:
        work_tokens, buffer_positions = tokens, torch.arange(model.buffer_size, device=tokens.device)

        def conditions(plan):
            return conditions_for_step(model, work_tokens, orders, class_embedding, plan, use_cfg, buffer_positions)
    else:
        if graphs.use_cfg != use_cfg:
            raise ValueError("the graphs were captured for a different CFG setting")
        graphs.load(tokens, orders, class_embedding)
        graphs.capture(model, plans)
        work_tokens, conditions = graphs.tokens, graphs.run
    phase = timer.phase if timer is not None else _untimed
    for plan in tqdm(plans, desc="MAR steps", leave=False) if progress else plans:
        with phase("transformer"):
            z, predicted, z_all = conditions(plan)
        if model.denoising_head is not None:
            with phase("denoising head"):
                refine_known_tokens(model, work_tokens, orders, z_all, plan)
        with phase("head"):
            sampled = model.sample_head(z, z_all, temperature, plan.cfg_scale, generator)
            if use_cfg:
                sampled = sampled[: sampled.shape[0] // 2]
            sampled = sampled.reshape(bsz, plan.num_predicted, tokens.shape[-1]).to(tokens.dtype)
            work_tokens.scatter_(1, predicted.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]), sampled)
    if work_tokens is not tokens:
        tokens.copy_(work_tokens)
    return tokens


@torch.no_grad()
def sample_tokens_fast(model, bsz, num_iter=64, cfg=1.0, cfg_schedule="linear", labels=None, temperature=1.0,
                       progress=False, *, generator=None, timer=None, cuda_graphs=None):
    """`MAR.sample_tokens` without host synchronisation in the AR loop: latents [bsz, C, H, W].

    Same arguments and, for the same generator, the same result as the reference loop (the
    argument checks before the loop may synchronise). timer: see `run_ar_loop`. cuda_graphs:
    replay the transformer steps as CUDA graphs (cached per model and configuration; needs CUDA
    and eval mode); None reads MARFAST_CUDA_GRAPHS (default off).
    """
    check_batch_size(bsz)
    cfg, temperature = model.check_sampling_args(num_iter, cfg, cfg_schedule, temperature)
    if labels is not None:
        model.check_labels(labels, bsz)
        labels = labels.to(model.device)
    if cuda_graphs is None:
        cuda_graphs = cuda_graphs_requested()
    plans = plan_steps(model, num_iter, cfg, cfg_schedule)
    tokens = torch.zeros(bsz, model.seq_len, model.token_embed_dim, device=model.device, dtype=model.token_dtype)
    orders = model.sample_orders(bsz, generator)
    class_embedding = sampling_class_embeddings(model, bsz, labels, cfg != 1.0)
    graphs = step_graphs_for(model, bsz, cfg != 1.0) if cuda_graphs else None
    run_ar_loop(model, tokens, orders, class_embedding, plans, temperature, generator=generator, progress=progress,
                timer=timer, graphs=graphs)
    return model.unpatchify(tokens)
