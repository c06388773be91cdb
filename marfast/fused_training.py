"""Fused training path of the denoiser: `denoiser_forward_fused(net, x, t, c) == net(x, t, c)`.

Same function as `SimpleMLPAdaLN.forward` (marfast.diffloss), built for forward + backward speed
and activation memory:
- the adaLN modulations of all residual blocks come from one GEMM on SiLU(y); blocks read their
  shift / scale / gate as column slices of it (no chunk copies). The final layer's modulation is
  a second GEMM, computed last: its own storage is freed after the final layer's backward, the
  first to run, so it is not held at the peak of the backward (the last block's). Each block's
  autograd Function takes its modulation weight and bias as inputs and does that GEMM's backward
  for its own slice, so the gradient of all modulations is never held at once; the kernels write the
  slice's gradients into one [N, 3W] buffer and reduce its row sums (the bias gradient);
- LayerNorm + modulate and the gated residual are Triton kernels (marfast.kernels); the
  Linear layers are cuBLAS matmuls with the bias folded in (addmm);
- each block saves only its input x, the first MLP pre-activation a and the LayerNorm statistics
  (plus its slice of the modulations): 5 [N, W] tensors against the reference's 11. The backward
  recomputes SiLU(a), the MLP output h (one extra GEMM, the price of one [N, W] per block) and the
  LayerNorm-modulate output (inside the LayerNorm backward kernel, which also adds the residual
  gradient); the kernels reduce the bias gradients as row sums on the way;
- SiLU(y), y = time_embed(t) + cond_embed(c), is the only [N, W] tensor of the conditioning kept
  for backward (y is recomputed there with one GEMM); for integer timesteps the time embedding is
  evaluated once for the 1000 training timesteps and gathered per row.
Tensors are float32, float16 or bfloat16; the kernels accumulate and keep LayerNorm statistics in
fp32. The compute dtype is the autocast dtype when autocast is on for the device, else the
parameters' dtype; weights are cast to it inside the autograd graph, so gradients reach the
original parameters in their own dtype. With `net.grad_checkpointing` (training, grad enabled)
each block's modulation GEMM and fused block are recomputed in backward, as in the reference.
"""
import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from .diffusion import NUM_TRAIN_TIMESTEPS
from .kernels.gated_residual import gated_residual_backward, gated_residual_forward
from .kernels.layernorm_modulate import SUPPORTED_DTYPES, layernorm_modulate_backward, layernorm_modulate_forward
from .kernels.silu_backward import silu_backward


def _no_autocast(device):
    return torch.autocast(device.type, enabled=False)


def _backward_without_autocast(backward):
    """Run an autograd Function's backward with autocast off, whatever context calls it: the
    matmuls must run in the dtype the forward computed in."""
    @functools.wraps(backward)
    def wrapped(ctx, grad, *more_grads):
        with _no_autocast(grad.device):
            return backward(ctx, grad, *more_grads)
    return wrapped


def _modulation_backward(d_modulation, silu_y, ada_weight, d_ada_bias, needs):
    """Gradients of modulation = silu_y @ ada_weight^T + ada_bias from d_modulation [N, M] and its
    row sum d_ada_bias [M] (reduced by the kernels). needs: needs_input_grad of (silu_y,
    ada_weight, ada_bias). Returns (d_silu_y, d_ada_weight, d_ada_bias), None where not needed."""
    d_silu_y = d_modulation.mm(ada_weight) if needs[0] else None
    d_ada_weight = d_modulation.t().mm(silu_y) if needs[1] else None
    return d_silu_y, d_ada_weight, d_ada_bias if needs[2] else None


def _check_modulation_is_detached(ctx):
    if ctx.needs_input_grad[1]:
        raise ValueError("modulation must not require grad: its gradient reaches silu_y, ada_weight and ada_bias "
                         "through the Function's own backward (compute it under torch.no_grad())")


class FusedResBlockFunction(torch.autograd.Function):
    """One ResBlock: x + gate * fc2(SiLU(fc1(LN(x) * (1 + scale) + shift))).

    apply(x [N, W], modulation [N, 3W], silu_y [N, W], ada_weight [3W, W], ada_bias [3W],
    ln_weight [W] or None, ln_bias [W] or None, fc1_weight [W, W], fc1_bias [W], fc2_weight [W, W],
    fc2_bias [W], eps) -> [N, W].
    `modulation` (shift | scale | gate, any row stride, no gradient of its own) must equal
    silu_y @ ada_weight^T + ada_bias: the caller computes it, for all blocks in one GEMM, and the
    backward sends its gradient to silu_y, ada_weight and ada_bias. Saves x, the modulation,
    a = fc1(...) and fp32 mean/rstd; the backward recomputes SiLU(a), h = fc2(SiLU(a)) (one GEMM:
    keeping h would cost one more [N, W] activation per block) and the modulated x.
    """

    @staticmethod
    def forward(ctx, x, modulation, silu_y, ada_weight, ada_bias, ln_weight, ln_bias, fc1_weight, fc1_bias,
                fc2_weight, fc2_bias, eps):
        _check_modulation_is_detached(ctx)
        width = x.shape[1]
        shift, scale, gate = modulation[:, :width], modulation[:, width:2 * width], modulation[:, 2 * width:]
        modulated, mean, rstd = layernorm_modulate_forward(x, ln_weight, ln_bias, scale, shift, eps)
        with _no_autocast(x.device):
            pre_act = torch.addmm(fc1_bias, modulated, fc1_weight.t())
            del modulated
            h = torch.addmm(fc2_bias, F.silu(pre_act), fc2_weight.t())
        out = gated_residual_forward(x, gate, h)
        ctx.save_for_backward(x, modulation, silu_y, ada_weight, ln_weight, ln_bias, fc1_weight, fc2_weight,
                              fc2_bias, mean, rstd, pre_act)
        return out

    @staticmethod
    @once_differentiable
    @_backward_without_autocast
    def backward(ctx, dout):
        (x, modulation, silu_y, ada_weight, ln_weight, ln_bias, fc1_weight, fc2_weight, fc2_bias,
         mean, rstd, pre_act) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        width = x.shape[1]
        shift, scale, gate = modulation[:, :width], modulation[:, width:2 * width], modulation[:, 2 * width:]
        dout = dout.contiguous()
        d_modulation = torch.empty((x.shape[0], 3 * width), dtype=x.dtype, device=x.device)
        act = F.silu(pre_act)
        h = torch.addmm(fc2_bias, act, fc2_weight.t())
        _, dh, d_fc2_bias, d_gate_sum = gated_residual_backward(
            dout, gate, h, dgate=d_modulation[:, 2 * width:], dh=h, dh_colsum=True, dgate_colsum=True)
        del h
        d_fc2_weight = dh.t().mm(act) if needs[9] else None
        del act
        d_pre_act = dh.mm(fc2_weight)
        del dh
        _, d_fc1_bias = silu_backward(d_pre_act, pre_act, d_pre_act=d_pre_act, colsum=needs[8])
        d_modulated = d_pre_act.mm(fc1_weight)
        dx, d_ln_weight, d_ln_bias, _, _, modulated, (d_scale_sum, d_shift_sum) = layernorm_modulate_backward(
            d_modulated, x, ln_weight, ln_bias, scale, mean, rstd, dresidual=dout, shift=shift,
            recompute_out=needs[7], modulation_colsums=True, out=d_modulated,
            dshift=d_modulation[:, :width], dscale=d_modulation[:, width:2 * width])
        d_fc1_weight = d_pre_act.t().mm(modulated) if needs[7] else None
        del d_pre_act, modulated, d_modulated
        d_silu_y, d_ada_weight, d_ada_bias = _modulation_backward(
            d_modulation, silu_y, ada_weight, torch.cat([d_shift_sum, d_scale_sum, d_gate_sum]), needs[2:5])
        return (dx, None, d_silu_y, d_ada_weight, d_ada_bias, d_ln_weight, d_ln_bias,
                d_fc1_weight, d_fc1_bias, d_fc2_weight, d_fc2_bias, None)


class FusedFinalLayerFunction(torch.autograd.Function):
    """Final layer: linear(LN(x) * (1 + scale) + shift) with a parameter-free LayerNorm.

    apply(x [N, W], modulation [N, 2W], silu_y [N, W], ada_weight [2W, W], ada_bias [2W],
    weight [O, W], bias [O], eps) -> [N, O]. `modulation` (shift | scale, any row stride) must
    equal silu_y @ ada_weight^T + ada_bias, as for FusedResBlockFunction. Saves x, the
    modulation and fp32 mean/rstd; the modulated x is recomputed.
    """

    @staticmethod
    def forward(ctx, x, modulation, silu_y, ada_weight, ada_bias, weight, bias, eps):
        _check_modulation_is_detached(ctx)
        width = x.shape[1]
        modulated, mean, rstd = layernorm_modulate_forward(
            x, None, None, modulation[:, width:], modulation[:, :width], eps)
        with _no_autocast(x.device):
            out = torch.addmm(bias, modulated, weight.t())
        ctx.save_for_backward(x, modulation, silu_y, ada_weight, weight, mean, rstd)
        return out

    @staticmethod
    @once_differentiable
    @_backward_without_autocast
    def backward(ctx, dout):
        x, modulation, silu_y, ada_weight, weight, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad
        width = x.shape[1]
        dout = dout.contiguous()
        d_modulation = torch.empty((x.shape[0], 2 * width), dtype=x.dtype, device=x.device)
        d_modulated = dout.mm(weight)
        dx, _, _, _, _, modulated, (d_scale_sum, d_shift_sum) = layernorm_modulate_backward(
            d_modulated, x, None, None, modulation[:, width:], mean, rstd, shift=modulation[:, :width],
            recompute_out=needs[5], modulation_colsums=True, out=d_modulated,
            dshift=d_modulation[:, :width], dscale=d_modulation[:, width:])
        d_weight = dout.t().mm(modulated) if needs[5] else None
        d_bias = dout.sum(0) if needs[6] else None
        del modulated, d_modulated
        d_silu_y, d_ada_weight, d_ada_bias = _modulation_backward(
            d_modulation, silu_y, ada_weight, torch.cat([d_shift_sum, d_scale_sum]), needs[2:5])
        return dx, None, d_silu_y, d_ada_weight, d_ada_bias, d_weight, d_bias, None


def compute_dtype(net, device):
    """The dtype the fused path computes in: autocast's dtype when enabled on `device`, else the
    dtype of the net's parameters."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return net.input_proj.weight.dtype


def _cast(tensor, dtype):
    return None if tensor is None else tensor.to(dtype)


def _condition(time_rows, index, c, cond_weight):
    """y = time_rows[index] + c @ cond_weight^T (index None: time_rows has one row per row of c)."""
    gathered = time_rows if index is None else F.embedding(index, time_rows)
    return torch.addmm(gathered, c, cond_weight.t())


class ConditionSiLUFunction(torch.autograd.Function):
    """SiLU(y) for y = time_rows[index] + c @ cond_weight^T, keeping neither y nor SiLU(y).

    apply(time_rows [T, W] (the time embedding per timestep, cond_embed's bias folded in), index
    long [N] or None (then T == N and row i of time_rows belongs to row i), c [N, Z], cond_weight
    [W, Z]) -> [N, W]. Saves time_rows, index, c and cond_weight (c is the caller's tensor, held
    anyway); the backward recomputes y with one gather and one GEMM, which frees one [N, W]
    activation for the whole backward.
    """

    @staticmethod
    def forward(ctx, time_rows, index, c, cond_weight):
        with _no_autocast(c.device):
            y = _condition(time_rows, index, c, cond_weight)
        ctx.save_for_backward(time_rows, index, c, cond_weight)
        return F.silu(y, inplace=True)

    @staticmethod
    @once_differentiable
    @_backward_without_autocast
    def backward(ctx, d_silu_y):
        time_rows, index, c, cond_weight = ctx.saved_tensors
        needs = ctx.needs_input_grad
        y = _condition(time_rows, index, c, cond_weight)
        dy = torch.ops.aten.silu_backward.grad_input(d_silu_y, y, grad_input=y)
        d_time_rows = d_c = d_cond_weight = None
        if needs[0]:
            d_time_rows = dy if index is None else torch.ops.aten.embedding_dense_backward(
                dy, index, time_rows.shape[0], -1, False)
        if needs[2]:
            d_c = dy.mm(cond_weight)
        if needs[3]:
            d_cond_weight = dy.t().mm(c)
        return d_time_rows, None, d_c, d_cond_weight


def _silu_time_and_condition(net, t, c, dtype):
    """SiLU(time_embed(t) + cond_embed(c)): [N, W] in dtype.

    Integer t (original timesteps 0..999) gathers rows of the embedding evaluated once for all
    training timesteps (the gather's backward sums the gradient per timestep in fp32); floating t
    evaluates the embedding per row as the reference does.
    """
    cond_weight, cond_bias = net.cond_embed.weight.to(dtype), net.cond_embed.bias.to(dtype)
    if t.is_floating_point():
        return ConditionSiLUFunction.apply(net.time_embed(t).to(dtype) + cond_bias, None, c, cond_weight)
    low, high = torch.stack([t.min(), t.max()]).tolist() if t.numel() else (0, 0)
    if low < 0 or high >= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"integer timesteps must lie in 0..{NUM_TRAIN_TIMESTEPS - 1}")
    table = net.time_embed(torch.arange(NUM_TRAIN_TIMESTEPS, device=t.device)).to(dtype) + cond_bias
    return ConditionSiLUFunction.apply(table, t.long(), c, cond_weight)


def _checkpointed_block(x, silu_y, ada_weight, ada_bias, *block_args):
    """A block that computes its own modulation GEMM (under gradient checkpointing)."""
    with torch.no_grad(), _no_autocast(x.device):
        modulation = torch.addmm(ada_bias, silu_y, ada_weight.t())
    return FusedResBlockFunction.apply(x, modulation, silu_y, ada_weight, ada_bias, *block_args)


def _block_args(block, dtype):
    return (_cast(block.in_ln.weight, dtype), _cast(block.in_ln.bias, dtype),
            block.mlp[0].weight.to(dtype), block.mlp[0].bias.to(dtype),
            block.mlp[2].weight.to(dtype), block.mlp[2].bias.to(dtype), block.in_ln.eps)


def _check_inputs(net, x, t, c):
    for name, tensor in (("x", x), ("t", t), ("c", c)):
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if x.dim() != 2 or x.shape[1] != net.in_channels:
        raise ValueError(f"x must have shape [N, {net.in_channels}], got {tuple(x.shape)}")
    z_channels = net.cond_embed.in_features
    if c.dim() != 2 or c.shape[1] != z_channels:
        raise ValueError(f"c must have shape [N, {z_channels}], got {tuple(c.shape)}")
    if t.shape != (x.shape[0],) or c.shape[0] != x.shape[0]:
        raise ValueError(f"x, t and c must have the same number of rows, got {tuple(x.shape)}, "
                         f"{tuple(t.shape)}, {tuple(c.shape)}")
    if not x.is_floating_point() or not c.is_floating_point():
        raise TypeError(f"x and c must be floating point, got {x.dtype} and {c.dtype}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"t must hold integer or floating timesteps, got {t.dtype}")
    if not (x.device == t.device == c.device == net.input_proj.weight.device):
        raise ValueError(f"x, t, c and the net must be on one device, got {x.device}, {t.device}, {c.device} "
                         f"and {net.input_proj.weight.device}")


def denoiser_forward_fused(net, x, t, c):
    """net(x, t, c) of a SimpleMLPAdaLN with the fused training kernels.

    x: [N, in_channels]; t: [N] original timesteps (integer 0..999, or floating); c: [N, Z].
    Returns [N, out_channels] in the compute dtype (see `compute_dtype`), differentiable with
    respect to x, c and every parameter of `net`.
    """
    _check_inputs(net, x, t, c)
    dtype = compute_dtype(net, x.device)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the fused denoiser computes in float32, float16 or bfloat16, got {dtype}; "
                        f"use the reference path (backend='torch') for {dtype}")
    x, c = x.to(dtype), c.to(dtype)
    h = F.linear(x, net.input_proj.weight.to(dtype), net.input_proj.bias.to(dtype))
    silu_y = _silu_time_and_condition(net, t, c, dtype)
    ada_layers = [block.adaLN_modulation[-1] for block in net.res_blocks]
    ada_weights = [layer.weight.to(dtype) for layer in ada_layers]
    ada_biases = [layer.bias.to(dtype) for layer in ada_layers]
    if net.grad_checkpointing and net.training and torch.is_grad_enabled():
        for block, ada_weight, ada_bias in zip(net.res_blocks, ada_weights, ada_biases):
            h = checkpoint(_checkpointed_block, h, silu_y, ada_weight, ada_bias, *_block_args(block, dtype),
                           use_reentrant=False)
    elif ada_layers:
        with torch.no_grad(), _no_autocast(x.device):
            all_modulations = torch.addmm(torch.cat(ada_biases), silu_y, torch.cat(ada_weights).t())
        modulations = all_modulations.split([w.shape[0] for w in ada_weights], dim=1)
        for block, modulation, ada_weight, ada_bias in zip(net.res_blocks, modulations, ada_weights, ada_biases):
            h = FusedResBlockFunction.apply(h, modulation, silu_y, ada_weight, ada_bias, *_block_args(block, dtype))
    final_ada = net.final_layer.adaLN_modulation[-1]
    final_ada_weight, final_ada_bias = final_ada.weight.to(dtype), final_ada.bias.to(dtype)
    with torch.no_grad(), _no_autocast(x.device):
        final_modulation = torch.addmm(final_ada_bias, silu_y, final_ada_weight.t())
    final = net.final_layer
    return FusedFinalLayerFunction.apply(h, final_modulation, silu_y, final_ada_weight, final_ada_bias,
                                         final.linear.weight.to(dtype), final.linear.bias.to(dtype),
                                         final.norm_final.eps)
