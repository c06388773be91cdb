"""Gaussian diffusion for the per-token Diffusion Loss, as in the official MAR.

Everything the head needs lives here: the cosine schedule, timestep respacing, the learned-range
variance, the posterior, one reverse DDPM step, the reference sampling loop and the training loss
(eps MSE plus the variational bound). Tables are built in float64 on the CPU and cast to the
working dtype and device where they are used (the official code casts them to float32).
"""
import math

import torch

NUM_TRAIN_TIMESTEPS = 1000


def cosine_alpha_bar(s):
    """alpha_bar of the cosine schedule at normalised time s in [0, 1] (float)."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def cosine_betas(num_timesteps=NUM_TRAIN_TIMESTEPS, max_beta=0.999):
    """Betas of the cosine schedule: float64 tensor [num_timesteps]."""
    betas = [
        min(1 - cosine_alpha_bar((i + 1) / num_timesteps) / cosine_alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float64, device="cpu")


def parse_num_steps(num_sampling_steps):
    """Accept the official string form ("100") or an int; return a positive int."""
    if isinstance(num_sampling_steps, bool):
        raise TypeError("num_sampling_steps must be an int or a decimal string, not a bool")
    if isinstance(num_sampling_steps, str):
        if not num_sampling_steps.strip().isdigit():
            raise ValueError(f"num_sampling_steps must be a decimal number such as '100', got {num_sampling_steps!r}")
        num_sampling_steps = int(num_sampling_steps)
    if not isinstance(num_sampling_steps, int):
        raise TypeError(f"num_sampling_steps must be an int or a decimal string, got {type(num_sampling_steps).__name__}")
    if not 1 <= num_sampling_steps <= NUM_TRAIN_TIMESTEPS:
        raise ValueError(f"num_sampling_steps must be in 1..{NUM_TRAIN_TIMESTEPS}, got {num_sampling_steps}")
    return num_sampling_steps


def space_timesteps(num_timesteps, num_steps):
    """The original timesteps kept when respacing to `num_steps` (official single-section rule).

    Indices are spread evenly over 0..num_timesteps-1 by accumulating a fractional stride and
    rounding each partial sum (Python's round, as the official code does).
    """
    if num_steps == num_timesteps:
        return list(range(num_timesteps))
    stride = (num_timesteps - 1) / (num_steps - 1) if num_steps > 1 else 1
    taken, cur = [], 0.0
    for _ in range(num_steps):
        taken.append(round(cur))
        cur += stride
    return taken


class GaussianDiffusion:
    """Diffusion tables and math for a (possibly respaced) cosine schedule.

    `timestep_map[i]` is the original 0..999 timestep of respaced step i; the network is always
    fed the original index. All tables are float64 [num_timesteps] tensors on the CPU.
    """

    def __init__(self, num_steps=NUM_TRAIN_TIMESTEPS):
        self.num_timesteps = parse_num_steps(num_steps)
        base_alpha_bar = torch.cumprod(1.0 - cosine_betas(), dim=0)
        kept = space_timesteps(NUM_TRAIN_TIMESTEPS, self.num_timesteps)
        last, betas = 1.0, []
        for i in kept:
            betas.append(1.0 - base_alpha_bar[i].item() / last)
            last = base_alpha_bar[i].item()
        self.timestep_map = torch.tensor(kept, dtype=torch.long, device="cpu")
        self.betas = torch.tensor(betas, dtype=torch.float64, device="cpu")
        alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1.0 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1.0 / self.alphas_cumprod - 1.0).sqrt()
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        if self.num_timesteps > 1:
            clipped = torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        else:
            clipped = self.posterior_variance.clamp_min(self.betas[0].item())
        self.posterior_log_variance_clipped = clipped.log()
        self.log_betas = self.betas.log()
        self.posterior_mean_coef1 = self.betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)
        self._cache = {}

    def table(self, name, device, dtype):
        """Table `name` cast to (device, dtype), cached."""
        key = (name, torch.device(device), dtype)
        if key not in self._cache:
            self._cache[key] = getattr(self, name).to(device=device, dtype=dtype)
        return self._cache[key]

    def _at(self, name, t, like):
        """table[t] as a column [N, 1] in like's dtype and device (t: long [N] respaced steps)."""
        return self.table(name, like.device, like.dtype)[t].unsqueeze(-1)

    def q_sample(self, x0, t, noise):
        """Diffuse x0 [N, C] to step t [N]."""
        return self._at("sqrt_alphas_cumprod", t, x0) * x0 + self._at("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior_mean(self, x0, x_t, t):
        return self._at("posterior_mean_coef1", t, x_t) * x0 + self._at("posterior_mean_coef2", t, x_t) * x_t

    def p_mean_log_variance(self, eps, v, x_t, t):
        """Mean and log-variance of p(x_{t-1} | x_t) from the net's eps and variance value v."""
        frac = (v + 1) / 2
        log_var = frac * self._at("log_betas", t, x_t) + (1 - frac) * self._at("posterior_log_variance_clipped", t, x_t)
        x0 = self._at("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        return x0, self.q_posterior_mean(x0, x_t, t), log_var

    def p_sample_step(self, eps, v, x_t, t, noise, temperature=1.0, clip_x0=None):
        """One reverse step: x_{t-1} [N, C] from x_t, the net output (eps, v) and fresh noise.

        `t` is a python int (respaced index). `clip_x0=(lo, hi)` clamps the x0 prediction.
        """
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long, device=x_t.device)
        x0, mean, log_var = self.p_mean_log_variance(eps, v, x_t, tt)
        if clip_x0 is not None:
            mean = self.q_posterior_mean(x0.clamp(*clip_x0), x_t, tt)
        if t == 0:
            return mean
        return mean + torch.exp(0.5 * log_var) * noise * temperature

    def training_losses(self, model_out, x0, x_t, t, noise):
        """Per-row loss [N]: eps MSE plus the variational bound in bits (eps detached).

        model_out: [N, 2C] net output at (x_t, t); t: long [N] in this diffusion's steps.
        """
        c = x0.shape[-1]
        eps, v = model_out[:, :c], model_out[:, c:]
        mse = ((noise - eps) ** 2).mean(dim=-1)
        true_mean = self.q_posterior_mean(x0, x_t, t)
        true_log_var = self._at("posterior_log_variance_clipped", t, x_t)
        _, mean, log_var = self.p_mean_log_variance(eps.detach(), v, x_t, t)
        kl = normal_kl(true_mean, true_log_var, mean, log_var).mean(dim=-1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(dim=-1) / math.log(2.0)
        return mse + torch.where(t == 0, nll, kl)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """Log-likelihood of x in [-1, 1] under a Gaussian discretised to 256 bins (elementwise)."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding [N, dim] ([cos, sin]) of timesteps t [N] (original 0..999 indices)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb
