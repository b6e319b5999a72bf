"""HART's residual diffusion head: a small AdaLN MLP denoiser and its IDDPM sampler.

HART predicts the last 64x64 scale twice: discrete tokens from the transformer's head, and the continuous
residual the codebook cannot express, drawn by this 8-step diffusion sampler conditioned on the last
hidden states. Module names follow the official ``DiffLoss`` (``net.time_embed.mlp.0`` ...), so the
``diffloss.*`` keys of the checkpoint load unchanged.

The sampler reproduces the official IDDPM arithmetic (cosine schedule in float64, respaced betas,
coefficients looked up in float64 then cast to float32, learned-range variance, x0 clamped to [-1, 1])
and its global-RNG draw order, which is what makes a seeded residual bit-comparable with the reference.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

VAE_SCALE = 0.6  # the residual latent is sampled in units of 1/0.6


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000) -> Tensor:
    """[cos, sin] sinusoid of (possibly fractional) steps; cos first, as in GLIDE/DiT."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid -> Linear -> SiLU -> Linear. Also HART's level embedding (scale index as the "time")."""

    def __init__(self, hidden: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: Tensor) -> Tensor:
        """``t`` of shape (N,) -> (N, hidden); a (1, N) row (the level ids) -> (1, N, hidden)."""
        if t.ndim == 2:
            return self.forward(t[0]).unsqueeze(0)
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


Guide = Callable[[Tensor, "Tensor | None", float], Tensor]


def diffusion_guidance(cond_eps: Tensor, uncond_eps: Tensor, cfg_scale: float) -> Tensor:
    """The diffusion head's CFG arithmetic, op for op as the official code: cond·(1 + s) − s·uncond."""
    return cond_eps * (1 + cfg_scale) - cfg_scale * uncond_eps


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class ResBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.in_ln = nn.LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(_modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """The denoiser: outputs ``[eps | v]`` (2·Cvae), v in [-1, 1] interpolating the log-variance."""

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, z_channels: int, num_res_blocks: int):
        super().__init__()
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(model_channels)
        self.cond_embed = nn.Linear(z_channels, model_channels)
        self.input_proj = nn.Linear(in_channels, model_channels)
        self.res_blocks = nn.ModuleList(ResBlock(model_channels) for _ in range(num_res_blocks))
        self.final_layer = FinalLayer(model_channels, out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The official init: xavier linears, N(0, 0.02) time MLP, zeroed modulations and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for blk in self.res_blocks:
            nn.init.zeros_(blk.adaLN_modulation[-1].weight)
            nn.init.zeros_(blk.adaLN_modulation[-1].bias)
        for p in (*self.final_layer.adaLN_modulation[-1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    def flops_per_row(self) -> int:
        """Multiply-adds x 2 of one ``forward`` row (for FLOP estimates; norms and activations left out)."""
        macs = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, nn.Linear))
        return 2 * macs

    def forward(self, x: Tensor, t: Tensor, c: Tensor) -> Tensor:
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        for blk in self.res_blocks:
            x = blk(x, y)
        return self.final_layer(x, y)

    def forward_with_cfg(self, x: Tensor, t: Tensor, c: Tensor, cfg_scale: float, guide: Guide | None = None) -> Tensor:
        """Rows are [cond | uncond]; both halves see the FIRST half of x and only eps is guided
        (``guide(cond_eps, uncond_eps, cfg_scale)``: the engine's guidance hook; default the official mix)."""
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = (guide or diffusion_guidance)(cond_eps, uncond_eps, cfg_scale)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    def forward_cond_only(self, x: Tensor, t: Tensor, c: Tensor, cfg_scale: float, guide: Guide | None = None) -> Tensor:
        """The conditional rows alone (a conditional-only scale): eps goes through ``guide`` with no
        unconditional eps (``None``), which returns the conditional eps unless a policy estimates one."""
        out = self.forward(x, t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels :]
        if guide is not None:
            eps = guide(eps, None, cfg_scale)
        return torch.cat([eps, rest], dim=1)


# ---------------------------------------------------------------------------------------------- schedule
def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> list[int]:
    """Kept original steps for a respacing such as ``"8"`` (IDDPM's rule, Python's banker's rounding)."""
    if isinstance(section_counts, str):
        if section_counts == "":
            return list(range(num_timesteps))
        section_counts = [int(s) for s in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return sorted(set(steps))


def cosine_betas(num_timesteps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta) for i in range(num_timesteps)]
    )


class SpacedDiffusion:
    """Float64 coefficient tables of a (respaced) cosine diffusion with learned-range variance."""

    def __init__(self, respacing: str = "", num_timesteps: int = 1000) -> None:
        base_ac = np.cumprod(1.0 - cosine_betas(num_timesteps), axis=0)
        self.timestep_map = space_timesteps(num_timesteps, respacing)
        keep = set(self.timestep_map)
        last, betas = 1.0, []
        for i, ac in enumerate(base_ac):
            if i in keep:
                betas.append(1 - ac / last)
                last = ac
        betas = np.array(betas, dtype=np.float64)
        self.betas = betas
        self.num_timesteps = len(betas)
        ac = np.cumprod(1.0 - betas, axis=0)
        ac_prev = np.append(1.0, ac[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(ac)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - ac)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / ac - 1)
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        self.posterior_log_variance_clipped = np.log(np.append(post_var[1], post_var[1:]))
        self.log_betas = np.log(betas)
        self.posterior_mean_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.posterior_mean_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)

    @staticmethod
    def _at(arr: np.ndarray, t: Tensor, like: Tensor) -> Tensor:
        """arr[t] looked up in float64, cast to float32, broadcast over the channel dim."""
        return torch.from_numpy(arr).to(t.device)[t].float()[:, None].to(like.dtype)

    def p_mean_variance(self, out: Tensor, x: Tensor, t: Tensor, clip: bool) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, log_variance, x0) of p(x_{t-1} | x_t) from the net output ``[eps | v]``."""
        C = x.shape[1]
        eps, v = out[:, :C], out[:, C:]
        min_log = self._at(self.posterior_log_variance_clipped, t, x)
        max_log = self._at(self.log_betas, t, x)
        frac = (v + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = self._at(self.sqrt_recip_alphas_cumprod, t, x) * x - self._at(self.sqrt_recipm1_alphas_cumprod, t, x) * eps
        if clip:
            x0 = x0.clamp(-1, 1)
        mean = self._at(self.posterior_mean_coef1, t, x) * x0 + self._at(self.posterior_mean_coef2, t, x) * x
        return mean, log_var, x0


def _normal_kl(m1: Tensor, lv1: Tensor, m2: Tensor, lv2: Tensor) -> Tensor:
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + ((m1 - m2) ** 2) * torch.exp(-lv2))


def _approx_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_ll(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    mid = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, mid))


class DiffLoss(nn.Module):
    """The diffusion head: training loss (eps MSE + VLB) and the respaced IDDPM sampler."""

    def __init__(self, target_channels: int, z_channels: int, depth: int, width: int, num_sampling_steps: str = "8"):
        super().__init__()
        self.in_channels = target_channels
        self.vae_scale = VAE_SCALE
        self.net = SimpleMLPAdaLN(target_channels, width, 2 * target_channels, z_channels, depth)
        self.num_sampling_steps = str(num_sampling_steps)
        self.train_diffusion = SpacedDiffusion("")
        self.gen_diffusion = SpacedDiffusion(self.num_sampling_steps)

    def sample_flops_per_row(self) -> int:
        """FLOPs :meth:`sample` spends per row of ``z``: the net runs on every row at every step (under CFG
        both halves are evaluated), so no pruning of the transformer changes this."""
        return self.gen_diffusion.num_timesteps * self.net.flops_per_row()

    def forward(self, target: Tensor, z: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training loss; draws ``randint`` steps then ``randn_like`` noise (global RNG by default)."""
        d = self.train_diffusion
        N = target.shape[0]
        t = torch.randint(0, d.num_timesteps, (N,), device=target.device, generator=generator)
        x0 = target / self.vae_scale
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        xt = d._at(d.sqrt_alphas_cumprod, t, x0) * x0 + d._at(d.sqrt_one_minus_alphas_cumprod, t, x0) * noise
        t_net = torch.tensor(d.timestep_map, device=t.device, dtype=t.dtype)[t]
        out = self.net(xt, t_net, z)
        C = x0.shape[1]
        eps = out[:, :C]
        frozen = torch.cat([eps.detach(), out[:, C:]], dim=1)
        true_mean = d._at(d.posterior_mean_coef1, t, x0) * x0 + d._at(d.posterior_mean_coef2, t, x0) * xt
        true_lv = d._at(d.posterior_log_variance_clipped, t, x0)
        mean, log_var, _ = d.p_mean_variance(frozen, xt, t, clip=False)
        kl = _normal_kl(true_mean, true_lv, mean, log_var).mean(dim=1) / math.log(2.0)
        nll = -_discretized_gaussian_ll(x0, mean, 0.5 * log_var).mean(dim=1) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        mse = ((noise - eps) ** 2).mean(dim=1)
        return (mse + vb).mean()

    @torch.no_grad()
    def sample(
        self, z: Tensor, temperature: float = 1.0, cfg: float = 1.0, generator: torch.Generator | None = None,
        guide: Guide | None = None, cond_only: bool = False,
    ) -> Tensor:
        """Residual tokens for conditions ``z`` (rows [cond | uncond] when ``cfg != 1``), times 0.6.

        RNG order (official): the initial noise for the conditional rows (duplicated to both halves under
        CFG), then one normal draw over ALL rows at every step, even the last one where it is unused.
        Without a ``generator`` the initial noise comes from the CPU global generator and the step noise
        from the global generator of z's device, exactly like the reference on GPU.

        ``guide``: where eps is guided (the engine's guidance hook; default the official arithmetic).
        ``cond_only`` (with ``cfg != 1``): ``z`` holds the conditional rows only (a conditional-only scale);
        the net runs on them alone, and the step noise is still drawn for both halves (the first half
        used), so the RNG stream and the result equal forwarding both halves and keeping the conditional.
        """
        if cond_only and cfg != 1.0:
            return self._sample_cond_only(z, temperature, cfg, generator, guide)
        n = z.shape[0] // 2 if cfg != 1.0 else z.shape[0]
        if generator is None:
            noise = torch.randn(n, self.in_channels).to(device=z.device, dtype=z.dtype)
        else:
            noise = torch.randn(n, self.in_channels, generator=generator, device=generator.device).to(z.device, z.dtype)
        if cfg != 1.0:
            noise = torch.cat([noise, noise], dim=0)

            def model(x: Tensor, t: Tensor) -> Tensor:
                return self.net.forward_with_cfg(x, t, z, cfg, guide)
        else:

            def model(x: Tensor, t: Tensor) -> Tensor:
                return self.net(x, t, z)

        d = self.gen_diffusion
        tmap = torch.tensor(d.timestep_map, device=z.device)
        x = noise
        for i in reversed(range(d.num_timesteps)):
            t = torch.full((x.shape[0],), i, dtype=torch.long, device=z.device)
            mean, log_var, _ = d.p_mean_variance(model(x, tmap[t]), x, t, clip=True)
            if generator is None:
                step_noise = torch.randn_like(x)
            else:
                step_noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device, x.dtype)
            nonzero = float(i != 0)
            x = mean + nonzero * torch.exp(0.5 * log_var) * step_noise * temperature
        return x * self.vae_scale

    def _sample_cond_only(self, z: Tensor, temperature: float, cfg: float, generator: torch.Generator | None,
                          guide: Guide | None) -> Tensor:
        """:meth:`sample` for the conditional rows only, drawing what the two-half sampler draws."""
        n = z.shape[0]
        if generator is None:
            x = torch.randn(n, self.in_channels).to(device=z.device, dtype=z.dtype)
        else:
            x = torch.randn(n, self.in_channels, generator=generator, device=generator.device).to(z.device, z.dtype)
        d = self.gen_diffusion
        tmap = torch.tensor(d.timestep_map, device=z.device)
        for i in reversed(range(d.num_timesteps)):
            t = torch.full((n,), i, dtype=torch.long, device=z.device)
            out = self.net.forward_cond_only(x, tmap[t], z, cfg, guide)
            mean, log_var, _ = d.p_mean_variance(out, x, t, clip=True)
            shape = (2 * n, x.shape[1])
            if generator is None:
                step_noise = torch.randn(shape, device=x.device, dtype=x.dtype)[:n]
            else:
                step_noise = torch.randn(shape, generator=generator, device=generator.device)[:n].to(x.device, x.dtype)
            nonzero = float(i != 0)
            x = mean + nonzero * torch.exp(0.5 * log_var) * step_noise * temperature
        return x * self.vae_scale


__all__ = ["DiffLoss", "diffusion_guidance", "SimpleMLPAdaLN",
           "SpacedDiffusion", "TimestepEmbedder", "space_timesteps", "timestep_embedding"]
