"""DistriFusion (arXiv 2402.19481) band-aware layers (one per layer type); PCPP (arXiv 2412.02962) attention.

Each rank holds one row band of every activation. Each layer gets a diffusers `ModelHook` on the original
module (role "patch_parallel.layers", innermost, so hooks other accelerators put on the same module still
run); its `new_forward` computes the band with the module's weights and what the band needs from the others:

| layer | needs from other bands |
|---|---|
| `nn.Conv2d`, kernel > 1 (`PatchConv2d`) | `pad` halo rows above and below |
| self-attention (`PatchSelfAttention`) | keys and values of every band (PCPP: nearest tokens of the two neighbours) |
| `nn.GroupNorm` (`PatchGroupNorm`) | per-group mean and variance of every band |

In a synchronous step the exchange is waited on at once (fresh data). In an asynchronous step the layer
first waits on the exchange it started at the previous UNet call with the same row chunk and batch size
(stale data of the other bands, the local band always fresh), computes, then starts the exchange of its
fresh data for the next such call. Warm-up counts denoising steps of the step clock (`fastdiff.compose`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch import nn

from fastdiff.parallel.comm import Communicator, Pending
from fastdiff.parallel.config import PatchParallelConfig
from fastdiff.parallel.split_batch import BatchSplit

_SUPPORTED_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


class PatchState:
    """Shared state of one patch-parallel UNet: config, communicator, step clock and the layer hooks."""

    def __init__(self, config: PatchParallelConfig, comm: Communicator, split: BatchSplit | None = None,
                 clock: Any = None) -> None:
        self.config, self.comm, self.split, self.clock = config, comm, split, clock
        self.layers: list[PatchLayer] = []
        self.inputs_checked = False  # the first UNet call of each pipeline call checks the ranks' latents

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def step(self) -> int:
        """The denoising step of the running pipeline call, from the step clock (0 without one)."""
        return self.clock.step if self.clock is not None else 0

    @property
    def chunk(self) -> Hashable:
        """The row chunk of the running UNet call, from the step clock (0 unless a loop pinned one)."""
        return self.clock.chunk if self.clock is not None else 0

    def synchronous(self) -> bool:
        """Whether this UNet call exchanges fresh data (mode "sync", or a warm-up step)."""
        return self.config.mode == "sync" or self.step < self.config.warmup_steps

    def partial(self) -> bool:
        """Whether self-attention is restricted to the neighbours' nearest tokens (PCPP, after warm-up)."""
        return self.config.conditioning == "partial" and self.step >= self.config.warmup_steps

    def reset(self, drain: bool = True) -> None:
        """Start a new pipeline call: wait for (drain) the exchanges still in flight, forget stale buffers."""
        self.inputs_checked = False
        for layer in self.layers:
            layer.forget(drain)
        self.comm.step = 0
        if self.split is not None:
            self.split.pair.step = 0

    def reset_counts(self) -> None:
        """Forget the received-byte counts (patch group and, with split_cfg, the pair)."""
        self.comm.reset_counts()
        if self.split is not None:
            self.split.pair.reset_counts()


class PatchLayer(ModelHook):
    """DistriFusion (arXiv 2402.19481) band-aware layer: a diffusers hook on the original module.

    `new_forward` computes this rank's band with the module's own weights. Stale exchanges of asynchronous
    steps are kept per `(chunk, batch size)` of the input, so row chunks and batches of other sizes never
    read each other's activations; a key seen for the first time exchanges synchronously.
    """

    def __init__(self, state: PatchState, layer_id: int) -> None:
        super().__init__()
        self.state = state
        self.layer_id = layer_id
        self._stale: dict[tuple[Hashable, int], Pending] = {}

    def forget(self, drain: bool = True) -> None:
        pending, self._stale = list(self._stale.values()), {}
        if drain:
            for p in pending:
                p.wait()

    def _key(self, x: torch.Tensor) -> tuple[Hashable, int]:
        return self.state.chunk, x.shape[0]

    def _exchange(self, key: tuple[Hashable, int], start: Callable[[], Pending]) -> Any:
        """Run one exchange (`start()` -> Pending): fresh now when synchronous, else the last call's data of `key`.

        Returns the received data; in an asynchronous call the fresh exchange is left in flight for the next
        call with the same key. A key without data yet (new chunk or batch size) exchanges synchronously.
        """
        if self.state.synchronous() or key not in self._stale:
            received = start().wait()
            self._stale[key] = Pending.done(received)
            return received
        received = self._stale[key].wait()
        self._stale[key] = start()
        return received


class PatchConv2d(PatchLayer):
    """DistriFusion (arXiv 2402.19481) conv: the band plus `pad` halo rows of its neighbours, no row padding.

    role "first" (`conv_in`): the input is the full latent; the band and its true halo rows are sliced
    from it (exact, no communication). role "last" (`conv_out`): the output bands are all-gathered
    synchronously so that every rank holds the full output.
    """

    def __init__(self, state: PatchState, layer_id: int, role: Literal["first", "inner", "last"] = "inner") -> None:
        super().__init__(state, layer_id)
        self.role = role

    def new_forward(self, module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        st, p = self.state, module.padding[0]
        n, r = st.world_size, st.rank
        if self.role == "first":
            h = x.shape[2] // n
            if st.config.mode == "naive":
                band = F.pad(x[:, :, r * h:(r + 1) * h], (0, 0, p, p))
            else:
                band = F.pad(x, (0, 0, p, p))[:, :, r * h:(r + 1) * h + 2 * p]
        else:
            above, below = self._halos(x, p)
            band = torch.cat([above, x, below], dim=2)
        out = F.conv2d(band, module.weight, module.bias, module.stride, (0, module.padding[1]), module.dilation,
                       module.groups)
        if self.role == "last":
            out = torch.cat(st.comm.all_gather(out, "output").wait(), dim=2)
        return out

    def _halos(self, x: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
        st = self.state
        if st.config.mode == "naive":
            zeros = x.new_zeros(x.shape[0], x.shape[1], p, x.shape[3])
            return zeros, zeros
        top, bottom = x[:, :, :p], x[:, :, -p:]
        zeros = x.new_zeros(top.shape)
        r, n = st.rank, st.world_size
        if st.config.conditioning == "partial":  # PCPP transport: halos only to the two neighbours
            def start() -> Pending:
                return st.comm.neighbours(top, bottom, self.layer_id, "conv")
        else:  # DistriFusion transport: every band's top and bottom rows to every rank
            def start() -> Pending:
                return st.comm.all_gather(torch.stack([top, bottom]), "conv",
                                          finish=lambda rows: (rows[r - 1][1] if r > 0 else None,
                                                               rows[r + 1][0] if r < n - 1 else None))
        above, below = self._exchange(self._key(x), start)
        return (zeros if above is None else above), (zeros if below is None else below)


class PatchGroupNorm(PatchLayer):
    """DistriFusion (arXiv 2402.19481) GroupNorm: statistics over all bands (biased variance, like `nn.GroupNorm`).

    Each band contributes (mean, variance) per sample and group; equal band sizes give the exact global
    mean = avg(mean_j) and variance = avg(var_j + (mean_j - mean)^2). Asynchronous steps use the other
    bands' statistics from the last call: group_norm "stale" uses them as they are (local band fresh),
    "corrected" (DistriFusion) adds the fresh-minus-stale change of the local band's moments to the stale
    global moments (local variance where the result is negative), "sync" exchanges fresh ones anyway.
    """

    def new_forward(self, module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        gn, st = module, self.state
        b, c = x.shape[:2]
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        xg = x.reshape(b, gn.num_groups, -1).to(stat_dtype)
        var_l, mean_l = torch.var_mean(xg, dim=-1, correction=0)
        local = torch.stack([mean_l, var_l])  # (2, B, G)
        mode, rule = st.config.mode, st.config.group_norm
        if mode == "naive":
            mean, var = mean_l, var_l
        elif rule == "sync" or st.synchronous():
            stats = st.comm.all_gather(local, "norm").wait()
            self._stale[self._key(x)] = Pending.done(stats)
            mean, var = _combine(torch.stack(stats))
        else:
            stale = self._exchange(self._key(x), lambda: st.comm.all_gather(local, "norm"))
            stats = torch.stack(stale)
            if rule == "stale":
                stats = stats.clone()
                stats[st.rank] = local
                mean, var = _combine(stats)
            else:  # corrected: stale global moments + (fresh - stale) local moments
                moments = torch.stack([stats[:, 0], stats[:, 1] + stats[:, 0] ** 2], dim=1)  # (N, 2, B, G)
                fresh = torch.stack([mean_l, var_l + mean_l**2])
                m = moments.mean(0) + fresh - moments[st.rank]
                mean, var = m[0], m[1] - m[0] ** 2
                var = torch.where(var < 0, var_l, var)
        y = (xg - mean[..., None]) * torch.rsqrt(var[..., None] + gn.eps)
        y = y.reshape(x.shape).to(x.dtype)
        if gn.affine:
            shape = (1, c) + (1,) * (x.ndim - 2)
            y = y * gn.weight.reshape(shape) + gn.bias.reshape(shape)
        return y


def _combine(stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2, B, G) per-band (mean, biased variance) of equal-size bands -> global (mean, variance)."""
    means, variances = stats[:, 0], stats[:, 1]
    mean = means.mean(0)
    return mean, (variances + (means - mean) ** 2).mean(0)


class PatchSelfAttention(PatchLayer):
    """DistriFusion (arXiv 2402.19481) self-attention: local queries attend to the keys/values of all bands.

    With conditioning="partial" (PCPP), after warm-up the context is the last floor(f*L) tokens of the
    band above, the local band and the first floor(f*L) tokens of the band below (L local tokens).
    Mirrors diffusers' `AttnProcessor2_0`; a call with `encoder_hidden_states` runs the module as it is.
    """

    def new_forward(self, module: nn.Module, hidden_states: torch.Tensor,
                    encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                    **kwargs: Any) -> torch.Tensor:
        attn = module
        if encoder_hidden_states is not None:
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        if attention_mask is not None:
            raise ValueError("patch-parallel self-attention does not support attention_mask: call the UNet without it.")
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, ch, height, width = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        batch = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key, value = attn.to_k(hidden_states), attn.to_v(hidden_states)
        ck = key.shape[-1]
        context = self._context(torch.cat([key, value], dim=-1))
        key, value = context[..., :ck], context[..., ck:]
        head_dim = ck // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.reshape(batch, -1, attn.heads, value.shape[-1] // attn.heads).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * out.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, ch, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _context(self, kv: torch.Tensor) -> torch.Tensor:
        """Local keys+values (B, L, Ck+Cv) -> the context attended to (B, L_ctx, Ck+Cv)."""
        st = self.state
        if st.config.mode == "naive":
            return kv
        r, n = st.rank, st.world_size
        key = self._key(kv)
        if st.partial():
            k = max(1, int(st.config.partial_fraction * kv.shape[1]))
            if not st.synchronous() and key in self._stale:
                self._stale[key] = _as_neighbours(self._stale[key], r, n, k)
            above, below = self._exchange(key, lambda: st.comm.neighbours(kv[:, :k], kv[:, -k:], self.layer_id, "attn"))
            return torch.cat([t for t in (above, kv, below) if t is not None], dim=1)
        bands = list(self._exchange(key, lambda: st.comm.all_gather(kv, "attn")))
        bands[r] = kv
        return torch.cat(bands, dim=1)


def _as_neighbours(pending: Pending, rank: int, world_size: int, k: int) -> Pending:
    """Turn a full gather (list of bands) kept from a warm-up call into PCPP's (above, below) boundary tokens."""
    received = pending.wait()
    if not isinstance(received, list):
        return pending
    above = received[rank - 1][:, -k:] if rank > 0 else None
    below = received[rank + 1][:, :k] if rank < world_size - 1 else None
    return Pending.done((above, below))


# --- which layers get wrapped, and at which resolution level (used by enable and by the byte formulas) ---


@dataclass(frozen=True)
class LayerSpec:
    """One wrapped layer: its name in the UNet, kind, role, downsampling level of its input, and sizes."""

    name: str
    kind: Literal["conv", "attn", "norm"]
    level: int
    role: Literal["first", "inner", "last"] = "inner"
    in_channels: int = 0
    out_channels: int = 0
    pad: int = 0
    kv_channels: int = 0
    groups: int = 0


def _level(name: str, unet: nn.Module) -> int:
    """Downsampling level (input at H/2^level) of a layer, from its place in a diffusers UNet."""
    num_down = sum(1 for blk in unet.down_blocks if getattr(blk, "downsamplers", None))
    m = re.match(r"down_blocks\.(\d+)\.", name)
    if m:
        return int(m.group(1))
    if name.startswith("mid_block."):
        return num_down
    m = re.match(r"up_blocks\.(\d+)\.", name)
    if m:
        j = int(m.group(1))
        level = num_down - sum(1 for blk in unet.up_blocks[:j] if getattr(blk, "upsamplers", None))
        return level - 1 if ".upsamplers." in name else level
    return 0


def is_self_attention(module: nn.Module) -> bool:
    from diffusers.models.attention_processor import Attention

    return isinstance(module, Attention) and not module.is_cross_attention


def layer_plan(unet: nn.Module) -> list[LayerSpec]:
    """The layers patch parallelism wraps in `unet`, in module order, with the shapes the byte formulas need.

    Raises ValueError for layers it cannot split by rows (e.g. a conv whose padding is not kernel // 2).
    """
    plan: list[LayerSpec] = []
    for name, module in unet.named_modules():
        if isinstance(module, nn.Conv2d) and module.kernel_size[0] > 1:
            k, pad = module.kernel_size[0], module.padding
            if isinstance(pad, str) or pad[0] != k // 2 or k % 2 == 0 or module.dilation[0] != 1 \
                    or module.padding_mode != "zeros":
                raise ValueError(f"{name}: patch parallelism supports odd kernels with zero padding kernel//2 only.")
            role = {"conv_in": "first", "conv_out": "last"}.get(name, "inner")
            plan.append(LayerSpec(name, "conv", _level(name, unet), role, module.in_channels,
                                  module.out_channels, pad[0]))
        elif isinstance(module, nn.GroupNorm):
            plan.append(LayerSpec(name, "norm", _level(name, unet), groups=module.num_groups))
        elif is_self_attention(module):
            processor = type(module.processor).__name__
            if processor not in _SUPPORTED_PROCESSORS or module.spatial_norm is not None \
                    or getattr(module, "added_kv_proj_dim", None) is not None:
                raise ValueError(f"{name}: self-attention with processor {processor} (or spatial norm / added K,V) "
                                 "is not supported by patch parallelism; fuse LoRAs and use the default processor.")
            kv = module.to_k.out_features + module.to_v.out_features
            plan.append(LayerSpec(name, "attn", _level(name, unet), kv_channels=kv))
    roles = {s.role for s in plan if s.kind == "conv"}
    if not {"first", "last"} <= roles:
        raise ValueError("patch parallelism needs a diffusers UNet with `conv_in` and `conv_out` 3x3 convolutions.")
    return plan
