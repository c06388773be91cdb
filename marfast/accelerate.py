"""`accelerate(model)`: swap marfast's DiffLoss into a MAR-style model built by another codebase."""
from .diffloss import BACKENDS, DiffLoss
from .diffusion import parse_num_steps


def _head_sizes(head):
    """(target_channels, z_channels, depth, width) read from an official-style head's weights."""
    try:
        net = head.net
        width, channels = net.input_proj.weight.shape
        z_channels = net.cond_embed.weight.shape[1]
        depth = len(net.res_blocks)
    except AttributeError as err:
        raise TypeError(f"model.diffloss ({type(head).__name__}) is not an official-style head with "
                        f"net.input_proj, net.cond_embed and net.res_blocks: {err}") from None
    return channels, z_channels, depth, width


def _sampling_steps(head, num_sampling_steps):
    if num_sampling_steps is not None:
        return parse_num_steps(num_sampling_steps)
    steps = getattr(getattr(head, "gen_diffusion", None), "num_timesteps", None)
    if steps is None:
        raise ValueError(f"cannot read the number of sampling steps from {type(head).__name__} "
                         "(no gen_diffusion.num_timesteps); pass num_sampling_steps")
    return parse_num_steps(int(steps))


def _adopt_parameters(new_head, head):
    """Make `new_head` hold `head`'s Parameter objects (same names): whatever refers to them (an
    optimizer, an EMA list, hooks on the tensors) keeps working, with requires_grad and .grad kept."""
    old = dict(head.named_parameters())
    for name, _ in list(new_head.named_parameters()):
        owner, leaf = name.rsplit(".", 1)
        setattr(new_head.get_submodule(owner), leaf, old[name])


def accelerate(model, *, backend="auto", num_sampling_steps=None):
    """Replace `model.diffloss` (an official-style head) by marfast's DiffLoss, in place; return model.

    The head is any module whose state dict holds exactly the official `net.*` parameters (as
    LTH14/mar's DiffLoss does). The new head takes over the old head's Parameter objects (checked
    by a strict state-dict load first), so an optimizer or EMA built on the model keeps training
    them, and keeps the dtype, device, requires_grad flags, training mode and
    gradient-checkpointing flag; module hooks registered on the old head are not carried over, and a
    model already wrapped by DDP or FSDP must be accelerated before wrapping. `backend`: "auto" runs
    the fused Triton kernels on CUDA. num_sampling_steps defaults to the old head's
    `gen_diffusion.num_timesteps`. A model whose head already is a marfast DiffLoss gets its backend
    set (and its sampling steps, when given).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    head = getattr(model, "diffloss", None)
    if head is None:
        raise TypeError(f"{type(model).__name__} has no `diffloss` head to accelerate")
    if isinstance(head, DiffLoss):
        head.backend = backend
        if num_sampling_steps is not None:
            head.set_sampling_steps(num_sampling_steps)
        return model
    channels, z_channels, depth, width = _head_sizes(head)
    steps = _sampling_steps(head, num_sampling_steps)
    new_head = DiffLoss(channels, z_channels, depth, width, steps,
                        grad_checkpointing=bool(getattr(head.net, "grad_checkpointing", False)), backend=backend)
    new_head.load_state_dict(head.state_dict(), strict=True)  # checks names and shapes (it has no buffers)
    _adopt_parameters(new_head, head)
    new_head.train(head.training)
    model.diffloss = new_head
    return model
