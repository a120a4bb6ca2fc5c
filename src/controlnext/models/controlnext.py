"""`ControlNeXtModel`: the lightweight control encoder, one class for every published layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D
from diffusers.utils import BaseOutput
from torch import nn

from ..cross_norm import cross_normalize, resize_like
from ..families import get_family as _get_family
from ..families import injection_point as _known_point
from .variants import variant_config

__all__ = ["ControlNeXtModel", "ControlNeXtOutput", "StaticFeatures"]


@dataclass
class ControlNeXtOutput(BaseOutput):
    """Control features (N, C, h, w), or tokens (N, h*w, D), and the module's effective scale (a 0-dim tensor,
    before the user's scale)."""

    sample: torch.Tensor
    scale: torch.Tensor


@dataclass
class StaticFeatures:
    """The timestep-independent prefix of the encoder for one condition batch (computed once per generation).

    ``hidden`` is the first residual block's ``conv1`` output before the timestep is added, ``shortcut`` that block's
    shortcut branch, ``frames`` the number of video frames per sample (1 for images).
    """

    hidden: torch.Tensor
    shortcut: torch.Tensor
    frames: int


class ControlNeXtModel(ModelMixin, ConfigMixin):
    r"""ControlNeXt control encoder: condition image(s) + timestep -> one feature map for Cross Normalization.

    All five published layouts are configs of this class (see :mod:`controlnext.models.variants`); use
    :meth:`from_variant` to build one and :meth:`from_single_file` to load a published checkpoint. Parameter names
    and shapes equal the published state dicts, so those files load with strict key checks.

    Besides the encoder layout, the config records how the module is applied to a UNet: ``injection_point``,
    ``pool_first``/``norm_eps`` (Cross Normalization order and epsilon), ``scale_rule``/``control_level`` (how the
    effective scale is formed), ``normalization`` (``cross_norm``, or the paper's ``zero_conv`` ablation),
    ``uncond_control`` (``False``: as the SVD releases do, the raw scale is zeroed on the unconditional half of
    classifier-free guidance before the scale rule applies, so a linear rule gives that half no control and the v1
    sigmoid rule gives it ``sigmoid(0) * control_level``) and ``condition_range`` (the pixel range the encoder
    expects). ``use_timestep=False`` is the timestep-free option (not a published layout): an encoder without timestep
    input, whose whole output is computed once per generation, so that each step only pays Cross Normalization.

    Inputs: ``condition`` of shape (B, 3, H, W) or, for video, (B, F, 3, H, W), in ``condition_range``; output
    features are at 1/8 of the condition's size (the latent size) for the light layouts.

    Transformer modules (``token_patch`` set, variants ``sd3`` and ``flux``) end in a ``token_patch`` x
    ``token_patch`` patchify conv (stride = kernel) instead of the 1x1 output conv, and return image tokens
    (B, N, ``out_channels``) in the backbone's row-major token order: the latent grid cut into 2x2 patches, as
    SD3's ``PatchEmbed`` and Flux's 2x2 latent packing both do. ``family`` names the base-model family a module is
    for (set by those variants; a module is refused on a backbone of another family). ``None`` means any family
    whose hidden state fits (the light UNet layout is shared by the SD1.5, SDXL and SVD-v2 releases).
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        variant: str = "sdxl",
        in_channels: int = 3,
        time_proj_channels: int = 128,
        time_embed_dim: int = 256,
        embedding_channels: tuple[int, ...] = (64, 64, 128),
        embedding_groups: int = 2,
        embedding_padding: int = 1,
        embedding_maxpool: bool = False,
        block_in_channels: tuple[int, ...] = (128, 128),
        block_out_channels: tuple[int, ...] = (128, 256),
        groups: tuple[int, ...] = (4, 8),
        mid_groups: int = 8,
        mid_norm: bool = True,
        mid_residual: bool = True,
        out_channels: int = 320,
        learnable_scale: bool = False,
        controlnext_scale: float = 1.0,
        injection_point: str = "before_down_block_0",
        pool_first: bool = False,
        norm_eps: float = 1e-12,
        scale_rule: str = "linear",
        control_level: float = 1.0,
        uncond_control: bool = True,
        condition_range: str = "0,1",
        normalization: str = "cross_norm",
        token_patch: int | None = None,
        family: str | None = None,
        use_timestep: bool = True,
    ):
        super().__init__()
        if family is not None:
            _get_family(family)  # an unknown family is an error that lists the known ones
        if token_patch is not None and token_patch < 1:
            raise ValueError(f"token_patch must be a positive patch size or None, got {token_patch}.")
        try:
            _known_point(injection_point)
        except ValueError as err:
            raise ValueError(f"injection_point: {err}") from None
        if scale_rule not in ("linear", "sigmoid"):
            raise ValueError(f"scale_rule must be 'linear' or 'sigmoid', got {scale_rule!r}.")
        if normalization not in ("cross_norm", "zero_conv"):
            raise ValueError(f"normalization must be 'cross_norm' or 'zero_conv', got {normalization!r}.")
        if condition_range not in ("0,1", "-1,1"):
            raise ValueError(f"condition_range must be '0,1' or '-1,1', got {condition_range!r}.")
        if not (len(block_in_channels) == len(block_out_channels) == len(groups)):
            raise ValueError("block_in_channels, block_out_channels and groups must have the same length.")

        # Registered only with a timestep input, so that a timestep-free module has no `time_*` keys.
        if use_timestep:
            self.time_proj = Timesteps(time_proj_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.time_embedding = TimestepEmbedding(time_proj_channels, time_embed_dim)
        temb_channels = time_embed_dim if use_timestep else None

        stem: list[nn.Module] = []
        prev = in_channels
        for i, ch in enumerate(embedding_channels):
            # The first stem conv halves the resolution; the others keep it (or shrink by 2 px without padding).
            stride, pad = (2, 1) if i == 0 else (1, embedding_padding)
            stem += [nn.Conv2d(prev, ch, 3, stride=stride, padding=pad), nn.GroupNorm(embedding_groups, ch), nn.ReLU()]
            prev = ch
        if embedding_maxpool:
            stem.append(nn.MaxPool2d(2, 2))
        # Only registered when present so that the `sd15` layout has no `embedding.*` keys.
        if stem:
            self.embedding = nn.Sequential(*stem)
        else:
            self.embedding = None

        self.down_res = nn.ModuleList()
        self.down_sample = nn.ModuleList()
        for cin, cout, g in zip(block_in_channels, block_out_channels, groups):
            self.down_res.append(
                ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb_channels, groups=g)
            )
            self.down_sample.append(Downsample2D(cout, use_conv=True, out_channels=cout, padding=1, name="op"))

        c = block_out_channels[-1]
        mid: list[nn.Module] = [nn.Conv2d(c, c, 3, padding=1), nn.ReLU()]
        if mid_norm:
            mid.append(nn.GroupNorm(mid_groups, c))
        mid.append(nn.Conv2d(c, c, 3, padding=1))
        if mid_norm:
            mid.append(nn.GroupNorm(mid_groups, c))
        # The output conv: 1x1 for feature maps; for tokens a patchify conv (kernel = stride = token_patch), the way
        # SD3's PatchEmbed and Flux's 2x2 packing + x_embedder turn the latent grid into tokens.
        patch = token_patch or 1
        self.mid_convs = nn.ModuleList([nn.Sequential(*mid), nn.Conv2d(c, out_channels, patch, stride=patch)])

        if learnable_scale:
            self.scale = nn.Parameter(torch.tensor(1.0))
        else:
            self.register_buffer("scale", torch.tensor(float(controlnext_scale)), persistent=False)
        if normalization == "zero_conv":
            # Ablation of the paper: ControlNet-style zero-initialised 1x1 conv instead of Cross Normalization.
            zero = nn.Linear(out_channels, out_channels) if token_patch else nn.Conv2d(out_channels, out_channels, 1)
            self.zero_conv = zero
            nn.init.zeros_(self.zero_conv.weight)
            nn.init.zeros_(self.zero_conv.bias)
        self.gradient_checkpointing = False

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_variant(cls, variant: str, **overrides) -> ControlNeXtModel:
        """Build a randomly initialised module with a published variant's config (``overrides`` change fields)."""
        return cls(**variant_config(variant, **overrides))

    @classmethod
    def from_single_file(
        cls, path, variant: str | None = None, family: str | None = None, **kwargs
    ) -> ControlNeXtModel:
        """Load one published-layout ``.safetensors``/``.bin`` file (see :mod:`controlnext.loading`)."""
        from ..loading import load_controlnext_file

        return load_controlnext_file(path, variant=variant, family=family, **kwargs)

    # ------------------------------------------------------------------ numerics
    def effective_scale(self) -> torch.Tensor:
        """The module's own scale factor (0-dim tensor), before the user's conditioning scale."""
        s = torch.sigmoid(self.scale) if self.config.scale_rule == "sigmoid" else self.scale
        return s * self.config.control_level

    def zeroed_scale(self) -> float:
        """The scale rule at a raw scale of 0: what the unconditional half gets when ``uncond_control`` is off."""
        return 0.5 * self.config.control_level if self.config.scale_rule == "sigmoid" else 0.0

    def align(self, features: torch.Tensor, hidden: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """The control to add at the injection point, before scaling, with ``hidden``'s size, dtype and rows.

        Cross Normalization of ``features`` to ``hidden`` (see :func:`controlnext.cross_norm.cross_normalize`), or for
        the ``zero_conv`` ablation the zero-initialised 1x1 conv then pooling. ``index`` maps hidden rows to feature
        rows (one encoded condition serving several backbone samples).
        """
        cfg = self.config
        if cfg.normalization == "zero_conv":
            c = resize_like(self.zero_conv(features), hidden).to(hidden.dtype)
            return c if index is None else c.index_select(0, index)
        return cross_normalize(features, hidden, eps=cfg.norm_eps, pool_first=cfg.pool_first, index=index)

    def _flatten_video(self, condition: torch.Tensor) -> tuple[torch.Tensor, int]:
        if condition.dim() == 5:
            b, f = condition.shape[:2]
            return condition.reshape(b * f, *condition.shape[2:]), f
        if condition.dim() != 4:
            raise ValueError(
                f"Condition must be (B, C, H, W) or, for video, (B, F, C, H, W); got shape {tuple(condition.shape)}."
            )
        return condition, 1

    def encode_static(self, condition: torch.Tensor) -> StaticFeatures:
        """Run the timestep-independent prefix: the stem, and the first residual block up to its timestep add."""
        x, frames = self._flatten_video(condition)
        if x.shape[1] != self.config.in_channels:
            raise ValueError(f"Condition has {x.shape[1]} channels; this module expects {self.config.in_channels}.")
        x = x.to(device=self.device, dtype=self.dtype)
        if self.embedding is not None:
            x = self.embedding(x)
        block = self.down_res[0]
        h = block.conv1(block.nonlinearity(block.norm1(x)))
        shortcut = block.conv_shortcut(x) if block.conv_shortcut is not None else x
        return StaticFeatures(hidden=h, shortcut=shortcut, frames=frames)

    def time_embed(self, timestep: torch.Tensor | float | int, rows: int, frames: int = 1) -> torch.Tensor | None:
        """Timestep embedding for ``rows`` conditions; one row is returned (and broadcast) for a shared timestep.

        ``None`` for a timestep-free module (``use_timestep=False``): it ignores the timestep.
        """
        if not self.config.use_timestep:
            return None
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=self.device)
        t = t.reshape(-1).to(self.device)
        if t.numel() not in (1, rows):
            raise ValueError(f"Got {t.numel()} timesteps for {rows} conditions.")
        emb = self.time_embedding(self.time_proj(t).to(dtype=self.dtype))
        if frames > 1 and emb.shape[0] > 1:
            emb = emb.repeat_interleave(frames, dim=0)  # one embedding per video frame, as published
        return emb

    def forward_static(self, static: StaticFeatures, timestep: torch.Tensor | float | int) -> ControlNeXtOutput:
        """Finish the encoder from cached :class:`StaticFeatures` for one timestep."""
        rows = static.hidden.shape[0] // static.frames
        emb = self.time_embed(timestep, rows, static.frames)
        # Without autograd the block intermediates belong to nobody else, so they are updated in place: fewer
        # full-size temporaries per step (bit-identical results). The cached prefix itself is never modified.
        inplace = not torch.is_grad_enabled()
        x = _resnet_tail(self.down_res[0], static.hidden, static.shortcut, emb, inplace, fresh=False)
        x = self.down_sample[0](x)
        for res, down in zip(self.down_res[1:], self.down_sample[1:]):
            if inplace:
                h = res.conv1(_act(res, res.norm1(x), inplace=True))
                shortcut = res.conv_shortcut(x) if res.conv_shortcut is not None else x
                x = _resnet_tail(res, h, shortcut, emb, inplace=True, fresh=True)
            elif self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(res, x, emb)
            else:
                x = res(x, emb)
            x = down(x)
        y = self.mid_convs[0](x)
        if self.config.mid_residual:
            x = y.add_(x) if inplace else y + x
        else:
            x = y
        x = self.mid_convs[1](x)
        if self.config.token_patch:
            x = x.flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, h*w, D), row-major like the backbone's tokens
        return ControlNeXtOutput(sample=x, scale=self.effective_scale())

    def forward(
        self, condition: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True
    ) -> ControlNeXtOutput | tuple:
        """Encode ``condition`` at ``timestep`` (scalar, or one per condition batch row)."""
        out = self.forward_static(self.encode_static(condition), timestep)
        return out if return_dict else (out.sample, out.scale)

    def normalize_condition(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map a condition in [0, 1] to the range this module was trained on."""
        return pixels * 2.0 - 1.0 if self.config.condition_range == "-1,1" else pixels


def _act(block: ResnetBlock2D, x: torch.Tensor, inplace: bool) -> torch.Tensor:
    if inplace and isinstance(block.nonlinearity, nn.SiLU):
        return F.silu(x, inplace=True)
    return block.nonlinearity(x)


def _resnet_tail(
    block: ResnetBlock2D,
    hidden: torch.Tensor,
    shortcut: torch.Tensor,
    emb: torch.Tensor | None,
    inplace: bool,
    fresh: bool,
) -> torch.Tensor:
    """``ResnetBlock2D.forward`` after ``conv1`` (default ``time_embedding_norm``), in the same order of operations.

    ``hidden`` is ``conv1``'s output and ``shortcut`` the shortcut branch. With ``inplace`` (no autograd),
    temporaries are reused; ``hidden`` is only written to when ``fresh`` (not a cached tensor).
    """
    if emb is None:  # timestep-free module: no timestep projection (norm2 below makes a new tensor)
        h = hidden
    else:
        temb = block.time_emb_proj(block.nonlinearity(emb))[:, :, None, None]
        h = hidden.add_(temb) if inplace and fresh else hidden + temb
    h = _act(block, block.norm2(h), inplace)  # two statements: the pre-norm tensor is freed before conv2 runs
    h = block.conv2(block.dropout(h))
    if not inplace:
        return (shortcut + h) / block.output_scale_factor
    h = h.add_(shortcut)  # float addition commutes: bit-identical to shortcut + h
    return h if block.output_scale_factor == 1.0 else h.div_(block.output_scale_factor)
