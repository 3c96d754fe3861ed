"""Rough GEMV timings of llmsh/kernels vs torch's int4/float32 kernels (interleaved, medians).

    python benchmarks/kernels_gemv.py [--threads 1] [--reps 5]
Ratios within one run are what count (other load on the machine shifts absolute figures)."""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from llmsh import quant
from llmsh.kernels import build, reference as R

SHAPES = [(4864, 896), (896, 4864), (1536, 576), (576, 1536), (49152, 576)]


def timeit(fn, iters):
    fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    ops = build.kernels()
    print(f"backend {build.backend()}, threads {a.threads}")
    for n, k in SHAPES:
        w = torch.randn(n, k)
        types = ["Q4_0", "Q8_0"] + (["Q4_K", "Q6_K"] if k % 256 == 0 else ["Q5_0"])
        blk = {}
        for name in types:
            tid = R.TYPES[name][0]
            import gguf
            try:
                b = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType(tid))
            except NotImplementedError:   # gguf cannot make K-quants / Q5_0: random bytes time the same
                b = torch.randint(0, 256, (n, R.row_bytes(tid, k)), dtype=torch.uint8).numpy()
            blk[name] = (torch.from_numpy(b.reshape(n, -1).copy()), tid)
        q, sz = quant.quantize_int4(w)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        szb = sz.bfloat16()
        x = torch.randn(1, k)
        xb = x.bfloat16()
        fns = {f"llmsh {t}": (lambda t=t: ops.mm(x, blk[t][0], blk[t][1], n, k)) for t in types}
        fns["int4pack bf16"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed, 32, szb)
        fns["int4pack f32"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
        fns["f32 linear"] = lambda: F.linear(x, w)
        nbytes = {f"llmsh {t}": blk[t][0].numel() for t in types}
        nbytes.update({"int4pack bf16": packed.numel() + szb.numel() * 2,
                       "int4pack f32": packed.numel() + sz.numel() * 4, "f32 linear": w.numel() * 4})
        times = {name: [] for name in fns}
        iters = max(3, int(2e7 // (n * k)))
        for _ in range(a.reps):           # interleaved repetitions
            for name, fn in fns.items():
                times[name].append(timeit(fn, iters))
        base = statistics.median(times["f32 linear"])
        print(f"N={n} K={k}")
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"  {name:14s} {med * 1e6:9.1f} us  {nbytes[name] / med / 1e9:6.1f} GB/s  x{base / med:5.2f} vs f32")


if __name__ == "__main__":
    main()
