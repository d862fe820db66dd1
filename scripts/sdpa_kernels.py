#!/usr/bin/env python
"""SDPA's attention kernels on SDXL's attention shapes: forward + backward time and error of each, on a GPU.

    python scripts/sdpa_kernels.py            # one JSON line per (shape, kernel), then a table

The shapes are those of SDXL-base at 1024² and batch 4, laid out as diffusers' AttnProcessor2_0 passes them
((batch, tokens, heads, 64) transposed to heads-first, not contiguous): self-attention over the 64² latent's 4096
tokens (640 channels, 10 heads) and over 1024 tokens (1280, 20 heads), and cross-attention to the 77 prompt
tokens. The error is against the math kernel in fp32. It tells whether `--sdpa_backend cudnn` (or another) is
worth measuring in a whole step with scripts/benchmark.py.
"""
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {  # name: (batch, query tokens, key tokens, heads)
    "self 4096 tok x 10 heads": (4, 4096, 4096, 10),
    "self 1024 tok x 20 heads": (4, 1024, 1024, 20),
    "cross 4096 -> 77 x 10 heads": (4, 4096, 77, 10),
    "cross 1024 -> 77 x 20 heads": (4, 1024, 77, 20),
}
KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
           "efficient": SDPBackend.EFFICIENT_ATTENTION}


def inputs(b, n, m, h, dtype, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    make = lambda t: torch.randn(b, t, h, 64, generator=g, device="cuda").to(dtype).transpose(1, 2)  # noqa: E731
    return [make(n).requires_grad_(), make(m).requires_grad_(), make(m).requires_grad_()]


def run(q, k, v, grad):
    out = F.scaled_dot_product_attention(q, k, v)
    out.backward(grad)
    return out


def measure(name, kernel, shape, reps=20):
    b, n, m, h = shape
    q, k, v = inputs(b, n, m, h, torch.bfloat16)
    grad = torch.randn(b, h, n, 64, device="cuda", dtype=torch.bfloat16)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.MATH):
        ref = run(*ref_in, grad.float())
    try:
        with sdpa_kernel(kernel):
            out = run(q, k, v, grad)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                run(q, k, v, grad)
            end.record()
            torch.cuda.synchronize()
    except RuntimeError as e:
        return {"shape": name, "kernel": kernel.name, "error": str(e).splitlines()[0][:160]}
    q.grad = k.grad = v.grad = None
    with sdpa_kernel(kernel):
        run(q, k, v, grad)
    err = lambda a, r: ((a.float() - r).abs().max() / r.abs().max()).item()  # noqa: E731
    ms = start.elapsed_time(end) / reps
    flop = 4 * b * h * n * m * 64 * 3.5  # QK^T and PV forward (2 matmuls x 2 flop), backward ~2.5x the forward
    return {"shape": name, "kernel": kernel.name, "ms_fwd_bwd": round(ms, 3), "tflop_per_s": round(flop / ms / 1e9, 1),
            "rel_err_out": err(out, ref), "rel_err_dq": err(q.grad, ref_in[0].grad),
            "rel_err_dk": err(k.grad, ref_in[1].grad), "rel_err_dv": err(v.grad, ref_in[2].grad)}


def main():
    import argparse

    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not torch.cuda.is_available():
        sys.exit("sdpa_kernels.py measures GPU kernels: no CUDA device here")
    rows = [measure(name, kernel, shape) for name, shape in SHAPES.items() for kernel in KERNELS.values()]
    for r in rows:
        print(json.dumps(r))
    for r in rows:
        print(f"{r['shape']:30} {r['kernel']:20} " + (r.get("error") or
              f"{r['ms_fwd_bwd']:8.3f} ms {r['tflop_per_s']:7.1f} TFLOP/s  max rel err out {r['rel_err_out']:.1e} "
              f"dq {r['rel_err_dq']:.1e} dk {r['rel_err_dk']:.1e} dv {r['rel_err_dv']:.1e}"))


if __name__ == "__main__":
    main()
