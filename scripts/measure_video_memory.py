"""Peak memory of windowed SVD + ControlNeXt generation as the sequence grows (tiny random models, any device).

    python scripts/measure_video_memory.py --size 256 --frames 14 28 56 --frames-per-batch 14 --overlap 4

On CPU the peak is measured with controlnext.bench.TensorMemoryTracker (bytes of live tensors created
during the call); on CUDA with torch.cuda.max_memory_allocated (minus what was allocated before the call).
The "one window" column runs the same length as a single window, for comparison.
"""

from __future__ import annotations

import argparse

import numpy as np
import PIL.Image
import torch

from controlnext.bench import TensorMemoryTracker
from controlnext.pipelines.svd import StableVideoDiffusionControlNeXtPipeline
from controlnext.testing import tiny_svd_components
from controlnext.testing.models import tiny_controlnext


def peak_bytes(pipe, device: str, **kwargs) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        pipe(**kwargs)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with TensorMemoryTracker() as mem:
        pipe(**kwargs)
    return mem.peak_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--frames", type=int, nargs="+", default=[14, 28, 56])
    p.add_argument("--frames-per-batch", type=int, default=14)
    p.add_argument("--overlap", type=int, default=4)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--output-type", default="latent", choices=["latent", "np"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(1)
    pipe = StableVideoDiffusionControlNeXtPipeline(**tiny_svd_components(), controlnext=tiny_controlnext("svd-v2"))
    pipe.set_progress_bar_config(disable=True)
    pipe.to(args.device)
    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray((rng.random((args.size, args.size, 3)) * 255).astype(np.uint8))
    print(f"device {args.device}, {args.size}x{args.size}, windows of {args.frames_per_batch} (overlap {args.overlap})")
    print(f"{'frames':>6} {'windowed MB':>12} {'one window MB':>14}")
    for n in args.frames:
        poses = [image] * n
        common = dict(image=image, control_video=poses, num_inference_steps=args.steps, overlap=args.overlap,
                      output_type=args.output_type, decode_chunk_size=2)  # fmt: skip
        windowed = peak_bytes(pipe, args.device, frames_per_batch=args.frames_per_batch, **common)
        single = peak_bytes(pipe, args.device, frames_per_batch=n, **common)
        print(f"{n:>6} {windowed / 2**20:>12.1f} {single / 2**20:>14.1f}")


if __name__ == "__main__":
    main()
