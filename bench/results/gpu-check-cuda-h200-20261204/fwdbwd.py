import os, sys, time, torch
sys.path.insert(0, os.getcwd())
from bench import backends as bk
dev = torch.device("cuda")
t_start = time.monotonic()
def inputs(B, T, K, C):
    g = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(B, T, C, device=dev, generator=g).requires_grad_()
    tr = torch.randn(C, C, device=dev, generator=g).requires_grad_()
    du = torch.randn(K, C, device=dev, generator=g).requires_grad_()
    return s, tr, du, torch.full((B,), T, dtype=torch.long, device=dev)
def fb(b, args):
    with bk.environment(b.env):
        z = b.fn(*args)
        z.sum().backward()
    torch.cuda.synchronize()
    return z
def timed(name, B, T, K, C, reps, limit):
    if time.monotonic() - t_start > limit:
        print(f"{name} B{B} T{T}: skipped (time)", flush=True); return
    b = bk.make(name, dev)
    args = inputs(B, T, K, C)
    ts = []
    for r in range(reps + (1 if reps > 1 else 0)):
        for a in args[:3]: a.grad = None
        torch.cuda.synchronize(); t = time.perf_counter()
        z = fb(b, args)
        ts.append(time.perf_counter() - t)
    keep = ts[1:] if reps > 1 else ts
    peak = torch.cuda.max_memory_allocated() / 2**20
    print(f"fwd+bwd {name:22s} B{B} T{T} K{K} C{C}: " + ", ".join(f"{x*1e3:.1f} ms" for x in ts)
          + f" -> best {min(keep)*1e3:.1f} ms; log Z[0] {z[0].item():.6f}; grad finite "
          f"{bool(torch.isfinite(args[0].grad).all())}; peak {peak:.0f} MiB", flush=True)
    torch.cuda.reset_peak_memory_stats()
timed("cuda-parallel", 8, 100_000, 200, 24, 2, 200)
timed("cuda-exp", 8, 100_000, 200, 24, 1, 200)
timed("cuda", 8, 100_000, 200, 24, 1, 200)
timed("cuda-parallel", 1, 1_000_000, 200, 24, 1, 200)
timed("flash-semicrf-triton", 8, 100_000, 200, 24, 1, 120)
