"""The five published ControlNeXt layouts (``VARIANTS``), and the transformer layouts ``sd3`` and ``flux``
(``DIT_VARIANTS``, no published weights), as configs of one :class:`ControlNeXtModel`.

Each entry holds the encoder layout *and* how the module is applied to a backbone (injection point, the order of
pooling and cross-normalisation, epsilon and scale rule), so a saved module is self-describing.
"""

from __future__ import annotations

from typing import Any

# Injection points by name; what each one hooks is data of the base-model family (see controlnext.families).
BEFORE_DOWN0 = "before_down_block_0"
AFTER_DOWN0 = "after_down_block_0"
BEFORE_MID = "before_mid_block"
AFTER_MID = "after_mid_block"
AFTER_BLOCK0 = "after_block_0"  # transformers: the image tokens returned by the first transformer block

# Shared 3.5M-parameter layout of `sd15-training`, `sdxl` and `svd-v2`.
_LIGHT = dict(
    embedding_channels=(64, 64, 128),
    embedding_padding=1,
    embedding_maxpool=False,
    block_in_channels=(128, 128),
    block_out_channels=(128, 256),
    groups=(4, 8),
    mid_norm=True,
    mid_residual=True,
    out_channels=320,
    learnable_scale=False,
)

VARIANTS: dict[str, dict[str, Any]] = {
    "sd15": dict(
        embedding_channels=(),
        embedding_padding=1,
        embedding_maxpool=False,
        block_in_channels=(3, 128, 256),
        block_out_channels=(128, 256, 256),
        groups=(1, 8, 8),
        mid_norm=False,
        mid_residual=False,
        out_channels=1280,
        learnable_scale=True,
        injection_point=AFTER_MID,
        pool_first=True,
        norm_eps=1e-12,
        scale_rule="linear",
        control_level=1.0,
        uncond_control=True,
        condition_range="0,1",
    ),
    "sd15-training": dict(
        _LIGHT,
        injection_point=AFTER_DOWN0,
        pool_first=True,
        norm_eps=1e-12,
        scale_rule="linear",
        control_level=1.0,
        uncond_control=True,
        condition_range="0,1",
    ),
    "sdxl": dict(
        _LIGHT,
        injection_point=BEFORE_DOWN0,
        pool_first=False,
        norm_eps=1e-12,
        scale_rule="linear",
        control_level=1.0,
        uncond_control=True,
        condition_range="0,1",
    ),
    "svd": dict(
        embedding_channels=(64, 64, 128),
        embedding_padding=0,
        embedding_maxpool=True,
        block_in_channels=(128, 128, 256),
        block_out_channels=(128, 256, 256),
        groups=(4, 8, 8),
        mid_norm=True,
        mid_residual=True,
        out_channels=1280,
        learnable_scale=True,
        # The release adds the control to the last down block's output, the mid block's input (the lines just
        # before `# 4. mid` of its forked UNet), after the skip tensors were collected.
        injection_point=BEFORE_MID,
        pool_first=False,
        norm_eps=1e-5,
        scale_rule="sigmoid",
        control_level=1.3,
        # The release zeroes the raw scale on the unconditional half; sigmoid(0) * 1.3 leaves that half 0.65.
        uncond_control=False,
        condition_range="0,1",
    ),
    "svd-v2": dict(
        _LIGHT,
        # The v2 release's inference model has no padding on the two stride-1 stem convs (its training script pads
        # them); the released weights are used without padding, so that is what reproduces the published numbers.
        embedding_padding=0,
        injection_point=AFTER_DOWN0,
        pool_first=False,
        norm_eps=1e-5,
        scale_rule="linear",
        control_level=0.2,
        uncond_control=False,
        condition_range="0,1",  # the SVD releases map the pose frames back to [0, 1] before the encoder
    ),
}


# Transformers: the light layout on the latent grid, then a 2x2 patchify conv to the transformer's width, giving
# its image tokens (SD3: PatchEmbed with patch 2; Flux: the 2x2-packed latents x_embedder sees). No published
# weights exist; out_channels is the inner width of the reference checkpoints (SD3/SD3.5 medium: 24 heads x 64;
# SD3.5 large needs 2432, Flux.1: 24 heads x 128), and a module for another width overrides it.
_DIT = dict(
    _LIGHT,
    embedding_maxpool=True,
    block_in_channels=(128,),
    block_out_channels=(256,),
    groups=(4,),
    token_patch=2,
    injection_point=AFTER_BLOCK0,  # measured best of blocks 0 / 4 / 8 in the tiny study (docs/dit.md)
    pool_first=False,  # no pooling happens on tokens: both orders agree
    norm_eps=1e-6,  # representable in bf16/fp16, in which the control's std is taken
    scale_rule="linear",
    control_level=1.0,
    uncond_control=True,
    condition_range="0,1",
)
# Kept apart from VARIANTS, which holds only the published layouts (single files are matched against those).
DIT_VARIANTS: dict[str, dict[str, Any]] = {
    "sd3": dict(_DIT, out_channels=1536, family="sd3"),
    "flux": dict(_DIT, out_channels=3072, family="flux"),
}


def variant_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Return the full config of a variant (published, or a transformer layout), with optional overrides (e.g. tiny
    channel counts)."""
    known = {**VARIANTS, **DIT_VARIANTS}
    if name not in known:
        raise ValueError(f"Unknown ControlNeXt variant {name!r}; expected one of {sorted(known)}.")
    cfg = dict(known[name], variant=name)
    cfg.update(overrides)
    return cfg
