"""Attention implementations a UNet can run with, by name (``--attention-backend``).

diffusers 0.42 offers three switches for UNets: the default ``AttnProcessor2_0`` (torch's
``scaled_dot_product_attention``, which picks flash / memory-efficient / math kernels itself),
``enable_xformers_memory_efficient_attention`` and ``enable_npu_flash_attention`` (what diffusers' training scripts
expose as ``--enable_xformers_memory_efficient_attention`` and ``--enable_npu_flash_attention``). Its newer
``set_attention_backend`` dispatcher only reaches processors written for it, which the UNet's are not, so it is
not offered here. ``eager`` is the plain matmul-softmax processor (``AttnProcessor``), e.g. to rule out a kernel.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ATTENTION_BACKENDS", "set_attention_backend"]

ATTENTION_BACKENDS = ("sdpa", "xformers", "npu-flash", "eager")


def set_attention_backend(model: Any, backend: str) -> None:
    """Make ``model`` (a diffusers model) use the attention implementation ``backend``; one-line errors."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}.")
    if backend == "sdpa":  # what diffusers loads a model with
        from diffusers.models.attention_processor import AttnProcessor2_0

        model.set_attn_processor(AttnProcessor2_0())
    elif backend == "eager":
        from diffusers.models.attention_processor import AttnProcessor

        model.set_attn_processor(AttnProcessor())
    elif backend == "xformers":
        try:
            model.enable_xformers_memory_efficient_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as err:
            raise ValueError(f"--attention-backend xformers needs xformers on a GPU (pip install xformers): {err}") \
                from None
    else:
        try:
            model.enable_npu_flash_attention()
        except (ImportError, ModuleNotFoundError, ValueError) as err:
            raise ValueError(f"--attention-backend npu-flash needs torch_npu on an Ascend NPU: {err}") from None
