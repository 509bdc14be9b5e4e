"""SVDD-MC (Li et al. 2024, arXiv 2408.08252): a time-conditioned value network v(x_t, t) ~ E[r(x0) | x_t].

Training data are the pipeline's own samples x0 (or given latents), scored once with the reward;
the network regresses r(x0) on forward-noised x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps (the scheduler's
`add_noise`), t uniform over the training timesteps. Under the pre-trained model this regression
target is the alpha -> 0 soft value, so SVDD-MC needs no extra UNet call per candidate.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

__all__ = ["ValueNetwork", "train_value_function", "save_value_function", "load_value_function"]


def _timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class ValueNetwork(nn.Module):
    """SVDD-MC value network: a small CNN on latents with a sinusoidal time embedding; returns (n,) rewards.

    Outputs are in reward units: the net predicts a standardised value, de-standardised with the
    training rewards' mean and std stored as buffers.
    """

    def __init__(self, in_channels: int = 4, channels: int = 32, time_dim: int = 64) -> None:
        super().__init__()
        self.config = dict(in_channels=in_channels, channels=channels, time_dim=time_dim)
        self.time_dim = time_dim
        width = 2 * channels
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, width), nn.SiLU(), nn.Linear(width, width))
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1)
        self.conv_down1 = nn.Conv2d(channels, width, 3, stride=2, padding=1)
        self.conv_down2 = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 1))
        self.register_buffer("reward_mean", torch.zeros(()))
        self.register_buffer("reward_std", torch.ones(()))

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """latents (n, C, h, w), timesteps (n,) ints -> values (n,) in reward units."""
        dtype = self.conv_in.weight.dtype
        emb = self.time_mlp(_timestep_embedding(timesteps.reshape(-1), self.time_dim).to(dtype))
        h = nn.functional.silu(self.conv_in(latents.to(dtype)))
        h = nn.functional.silu(self.conv_down1(h) + emb[:, :, None, None])
        h = self.conv_down2(h).mean(dim=(2, 3))
        return self.head(h).squeeze(1).float() * self.reward_std + self.reward_mean


@torch.no_grad()
def _generate_latents(pipe, num_samples: int, sample_kwargs: dict, batch_size: int, seed: int) -> torch.Tensor:
    out = []
    for start in range(0, num_samples, batch_size):
        n = min(batch_size, num_samples - start)
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(n)]
        out.append(pipe(**sample_kwargs, generator=gens, output_type="latent").images)
    return torch.cat(out).float()


def train_value_function(
    pipe,
    reward_fn,
    latents: torch.Tensor | None = None,
    num_samples: int = 1024,
    sample_kwargs: dict | None = None,
    steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    channels: int = 32,
) -> ValueNetwork:
    """Train an SVDD-MC value network for `reward_fn` on `pipe`'s samples (or on given clean `latents`).

    Args:
        pipe: the pipeline whose samples define p_pre (its scheduler's `add_noise` makes x_t).
        reward_fn: images in [0, 1] -> (n,) rewards.
        latents: clean latents x0 to train on; None draws `num_samples` from `pipe(**sample_kwargs)`
            with seeds `seed + i`, one generator per image (e.g. dict(num_inference_steps=25, eta=1.0)).
        steps / batch_size / lr: AdamW regression of the standardised reward, t ~ U{0, ..., T - 1}.

    Returns:
        `ValueNetwork` in eval mode; pass it as `SVDDConfig(variant="mc", value_fn=net)`.

    Example:
        >>> net = train_value_function(pipe, rewards.ClassifierReward(7), num_samples=512,
        ...                            sample_kwargs=dict(num_inference_steps=25, eta=1.0))
        >>> net(torch.randn(2, 4, 16, 16), torch.tensor([999, 10])).shape
        torch.Size([2])

    Long by design: data, standardisation and the regression loop together (~40 lines of code), as one recipe.
    """
    from fastdiff.guidance.rewards import validate_reward
    from fastdiff.guidance.svdd import decode_latents

    if latents is None:
        chunk = 16 if hasattr(pipe, "vae") else 256  # a VAE decode is the costly part of a big chunk
        latents = _generate_latents(pipe, num_samples, dict(sample_kwargs or {}), chunk, seed)
    latents = latents.detach().float().cpu()
    rewards = torch.cat([validate_reward(reward_fn(decode_latents(pipe, chunk)), len(chunk))
                         for chunk in latents.split(256)])

    torch.manual_seed(seed)
    net = ValueNetwork(in_channels=latents.shape[1], channels=channels)
    net.reward_mean.fill_(rewards.mean())
    net.reward_std.fill_(rewards.std().clamp_min(1e-6))
    target = (rewards - net.reward_mean) / net.reward_std
    alphas_cumprod = pipe.scheduler.alphas_cumprod.float().cpu()
    num_train = len(alphas_cumprod)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(latents), (min(batch_size, len(latents)),), generator=gen)
        t = torch.randint(num_train, (len(idx),), generator=gen)
        noise = torch.randn(latents[idx].shape, generator=gen)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * latents[idx] + (1 - a).sqrt() * noise  # forward process q(x_t | x0)
        pred = (net(x_t, t) - net.reward_mean) / net.reward_std
        loss = nn.functional.mse_loss(pred, target[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval().requires_grad_(False)


def save_value_function(net: ValueNetwork, path: str | Path, metadata: dict | None = None) -> None:
    """Write the network to `path` (.safetensors) and its config + `metadata` to `path`.json."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    Path(str(path) + ".json").write_text(json.dumps({"config": net.config, **(metadata or {})}, indent=2))


def load_value_function(path: str | Path, device: str = "cpu") -> ValueNetwork:
    """Load a `ValueNetwork` written by `save_value_function` (eval mode, no gradients)."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: train one with `fastdiff train-value --out {path}`.")
    config = json.loads(Path(str(path) + ".json").read_text())["config"]
    net = ValueNetwork(**config)
    net.load_state_dict(load_file(str(path)))
    return net.eval().requires_grad_(False).to(device)
