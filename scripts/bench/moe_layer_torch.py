#!/usr/bin/env python3
"""PyTorch reference timings for one MoE expert layer (the experts part of a Qwen3-MoE block).

Given hidden states x [T, H] and a routing (top-K expert ids and renormalised weights per
token), compute

    y[t] = sum_k w[t, k] * down_e(silu(gate_e(x[t])) * up_e(x[t])),   e = idx[t, k]

in bf16, forward + backward (grads for x, gate_up_proj, down_proj and the routing weights),
on one device.  Weight layout as transformers 5: gate_up_proj [E, 2F, H] (gate rows first,
then up rows), down_proj [E, H, F], y = x @ W^T.

Implementations
  hf_eager              transformers-style loop over the experts that got tokens
  grouped_mm            torch._grouped_mm: sort by expert, gather, grouped gate_up, silu*mul,
                        grouped down, weight, gather-based unpermute + sum over K
  hf_module_eager       transformers' own Qwen3MoeExperts, _experts_implementation="eager"
  hf_module_grouped_mm  transformers' own Qwen3MoeExperts, _experts_implementation="grouped_mm"
  grouped_mm_compiled   torch.compile(grouped_mm) (skipped with --no-compile or on error)

The routing (router logits, softmax, top-K, renormalise) is computed once, outside the timed
region; the permutation / offsets / combine of the grouped path are inside it.

Usage
  python3 scripts/bench/moe_layer_torch.py [--out PATH] [--quick] [--device cpu --shapes small]

Output: a table on stdout and a JSON file (--out; default $OUT/torch_moe_bench.json when OUT
is set, else ./torch_moe_bench.json), rewritten after every record so that a run killed
part-way still leaves what it measured.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the script must still be importable / compilable without torch
    torch = None
    F = None

# --------------------------------------------------------------------------------------
# shapes
# --------------------------------------------------------------------------------------

FULL_SHAPES = {
    "A": dict(T=4096, H=1024, F=768, E=64, K=8),
    "B": dict(T=8192, H=2048, F=768, E=128, K=8),  # Qwen3-30B-A3B layer
}
SMALL_SHAPES = {
    "smallA": dict(T=64, H=64, F=32, E=8, K=2),
    "smallB": dict(T=128, H=128, F=64, E=16, K=4),
}
FULL_DECODE_T = [16, 64, 256]
SMALL_DECODE_T = [4, 16]

FLOPS_NOTE = (
    "useful flops: forward = 2*T*K*H*(2F) [gate_up] + 2*T*K*F*H [down] = 6*T*K*H*F; "
    "fwd+bwd = 3 * forward = 18*T*K*H*F (backward = 2x forward); "
    "TFLOP/s = flops / time (median time -> 'tflops', min time -> 'tflops_best'). "
    "forward-only weight_GB/s = (experts hit * 3*H*F*2 bytes + 2*T*H*2 bytes) / time."
)


def flops_fwd(T, H, F_, K):
    return 6.0 * T * K * H * F_


# --------------------------------------------------------------------------------------
# implementations
# --------------------------------------------------------------------------------------


def moe_hf_eager(x, gate_up, down, idx, w):
    """transformers 5 Qwen3MoeExperts eager forward (loop over experts that have tokens)."""
    E = gate_up.shape[0]
    out = torch.zeros_like(x)
    with torch.no_grad():
        expert_mask = F.one_hot(idx, num_classes=E).permute(2, 1, 0)  # [E, K, T]
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in expert_hit:
        e = e[0]
        top_k_pos, token_idx = torch.where(expert_mask[e])
        cur = x[token_idx]
        gate, up = F.linear(cur, gate_up[e]).chunk(2, dim=-1)
        h = F.silu(gate) * up
        h = F.linear(h, down[e])
        h = h * w[token_idx, top_k_pos, None]
        out.index_add_(0, token_idx, h.to(out.dtype))
    return out


def _grouped_mm(a, b, offs):
    return torch._grouped_mm(a, b, offs=offs)


def moe_grouped(x, gate_up, down, idx, w):
    """Permute -> grouped gate_up -> silu*mul -> grouped down -> weight -> unpermute/sum."""
    T, H = x.shape
    K = idx.shape[1]
    E = gate_up.shape[0]
    S = T * K
    flat_ids = idx.reshape(-1)
    sorted_ids, perm = torch.sort(flat_ids, stable=True)
    # end offset of each expert's group in the sorted order (int32, as grouped_mm wants)
    offs = torch.searchsorted(
        sorted_ids, torch.arange(E, device=x.device, dtype=sorted_ids.dtype), right=True
    ).to(torch.int32)
    xs = x[perm // K]  # [S, H], expert-contiguous
    gu = _grouped_mm(xs, gate_up.transpose(-2, -1), offs)  # [S, 2F]
    gate, up = gu.chunk(2, dim=-1)
    h = F.silu(gate) * up  # [S, F], contiguous
    ys = _grouped_mm(h, down.transpose(-2, -1), offs)  # [S, H]
    ys = ys * w.reshape(-1)[perm].unsqueeze(-1)
    inv = torch.empty_like(perm).scatter_(0, perm, torch.arange(S, device=x.device, dtype=perm.dtype))
    return ys[inv].view(T, K, H).sum(dim=1)


_COMPILED = {}


def moe_grouped_compiled(x, gate_up, down, idx, w):
    fn = _COMPILED.get("fn")
    if fn is None:
        fn = torch.compile(moe_grouped, dynamic=False)
        _COMPILED["fn"] = fn
    return fn(x, gate_up, down, idx, w)


def make_hf_module(P, impl):
    """transformers' Qwen3MoeExperts with our weights (new Parameters aliasing our storage)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    s = P["shape"]
    cfg = Qwen3MoeConfig(
        hidden_size=s["H"],
        moe_intermediate_size=s["F"],
        num_experts=s["E"],
        num_experts_per_tok=s["K"],
        hidden_act="silu",
        norm_topk_prob=True,
    )
    try:
        cfg._experts_implementation = impl
    except Exception:
        cfg._experts_implementation_internal = impl
    with torch.device("meta"):
        mod = Qwen3MoeExperts(cfg)
    mod.gate_up_proj = torch.nn.Parameter(P["gate_up"].detach(), requires_grad=True)
    mod.down_proj = torch.nn.Parameter(P["down"].detach(), requires_grad=True)
    got = getattr(mod.config, "_experts_implementation", None)
    if got != impl:
        raise RuntimeError(f"could not select experts implementation {impl!r} (config says {got!r})")

    def fn(x, gate_up, down, idx, w):
        return mod(x, idx, w)

    return fn, (mod.gate_up_proj, mod.down_proj)


def build_impl(name, P):
    """-> (fn(x, gate_up, down, idx, w) -> y, (gate_up leaf, down leaf) that receive grads)."""
    if name == "hf_eager":
        return moe_hf_eager, (P["gate_up"], P["down"])
    if name == "grouped_mm":
        if not hasattr(torch, "_grouped_mm"):
            raise RuntimeError("torch._grouped_mm not available in this torch")
        return moe_grouped, (P["gate_up"], P["down"])
    if name == "grouped_mm_compiled":
        return moe_grouped_compiled, (P["gate_up"], P["down"])
    if name == "hf_module_eager":
        return make_hf_module(P, "eager")
    if name == "hf_module_grouped_mm":
        return make_hf_module(P, "grouped_mm")
    raise ValueError(name)


# --------------------------------------------------------------------------------------
# problem setup
# --------------------------------------------------------------------------------------


def make_weights(shape, device, dtype, seed):
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    E, H, F_ = shape["E"], shape["H"], shape["F"]
    gate_up = (torch.randn(E, 2 * F_, H, generator=g, device=device, dtype=torch.float32) * H**-0.5).to(dtype)
    down = (torch.randn(E, H, F_, generator=g, device=device, dtype=torch.float32) * F_**-0.5).to(dtype)
    router = torch.randn(E, H, generator=g, device=device, dtype=torch.float32) * H**-0.5
    gate_up.requires_grad_(True)
    down.requires_grad_(True)
    return dict(gate_up=gate_up, down=down, router=router)


def make_inputs(Wt, shape, T, device, dtype, seed):
    """x, routing (softmax -> top-K -> renormalise; untimed) and the upstream grad g."""
    g = torch.Generator(device=device)
    g.manual_seed(seed + 1000 + T)
    H, K = shape["H"], shape["K"]
    x = torch.randn(T, H, generator=g, device=device, dtype=torch.float32).to(dtype)
    with torch.no_grad():
        logits = x.float() @ Wt["router"].t()  # [T, E]
        probs = torch.softmax(logits, dim=-1)
        top_w, top_i = torch.topk(probs, K, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)  # norm_topk_prob
    w = top_w.to(dtype)
    gout = torch.randn(T, H, generator=g, device=device, dtype=torch.float32).to(dtype)
    x.requires_grad_(True)
    w.requires_grad_(True)
    P = dict(Wt)
    s = dict(shape)
    s["T"] = T
    P.update(x=x, w=w, idx=top_i, g=gout, shape=s)
    return P


# --------------------------------------------------------------------------------------
# timing
# --------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(step, warmup, iters, device):
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    if device.type == "cuda":
        evs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for s, e in evs:
            s.record()
            step()
            e.record()
        sync(device)
        times = [s.elapsed_time(e) for s, e in evs]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def fwd_bwd_step(fn, P, wleaves):
    x, w, idx, g = P["x"], P["w"], P["idx"], P["g"]
    gu, dn = wleaves
    leaves = (x, w, gu, dn)

    def step():
        for t in leaves:
            t.grad = None
        y = fn(x, gu, dn, idx, w)
        y.backward(g)

    return step


def fwd_step(fn, P, wleaves):
    x, w, idx = P["x"], P["w"], P["idx"]
    gu, dn = wleaves

    def step():
        with torch.inference_mode():
            fn(x, gu, dn, idx, w)

    return step


# --------------------------------------------------------------------------------------
# correctness
# --------------------------------------------------------------------------------------


def run_once_with_grads(fn, P, wleaves):
    x, w, idx, g = P["x"], P["w"], P["idx"], P["g"]
    gu, dn = wleaves
    for t in (x, w, gu, dn):
        t.grad = None
    y = fn(x, gu, dn, idx, w)
    y.backward(g)
    out = dict(y=y.detach().clone(), dx=x.grad.clone(), dgate_up=gu.grad.clone(),
               ddown=dn.grad.clone(), dw=w.grad.clone())
    for t in (x, w, gu, dn):
        t.grad = None
    return out


def rel_diff(a, ref):
    a = a.float()
    ref = ref.float()
    denom = ref.abs().max().item()
    num = (a - ref).abs().max().item()
    return num / denom if denom > 0 else num


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------


class Results:
    def __init__(self, path, meta):
        self.path = path
        self.doc = dict(meta=meta, records=[], correctness=[], errors=[])

    def save(self):
        if not self.path:
            return
        d = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(d, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f, indent=1)
        os.replace(tmp, self.path)

    def add_record(self, rec):
        self.doc["records"].append(rec)
        self.save()
        gbps = rec.get("weight_gbps")
        print(
            f"{rec['impl']:<22} {rec['shape']:<7} {rec['mode']:<8} {rec['T']:>6} "
            f"{rec['ms_median']:>10.3f} {rec['ms_min']:>10.3f} {rec['tflops']:>9.1f} "
            f"{(f'{gbps:.0f}' if gbps is not None else '-'):>9}",
            flush=True,
        )

    def add_error(self, what, exc):
        msg = f"{type(exc).__name__}: {exc}"
        self.doc["errors"].append(dict(what=what, error=msg[:2000]))
        self.save()
        print(f"ERROR [{what}]: {msg[:1000]}", flush=True)
        tb = traceback.format_exc()
        print("  " + "\n  ".join(tb.strip().splitlines()[-6:]), flush=True)


def header_line():
    return (f"{'impl':<22} {'shape':<7} {'mode':<8} {'T':>6} {'ms_med':>10} {'ms_min':>10} "
            f"{'TFLOP/s':>9} {'wGB/s':>9}")


# --------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_out = os.path.join(os.environ["OUT"], "torch_moe_bench.json") if os.environ.get("OUT") else "torch_moe_bench.json"
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--device", default=None, help="cuda (default if available) or cpu")
    ap.add_argument("--shapes", default="full", help="full | small | comma list of names (A,B,smallA,smallB)")
    ap.add_argument("--impls", default="hf_eager,grouped_mm,hf_module_eager,hf_module_grouped_mm",
                    help="comma list for fwd+bwd; grouped_mm_compiled is added unless --no-compile")
    ap.add_argument("--decode-impls", default="hf_eager,grouped_mm", help="comma list for forward-only decode sizes")
    ap.add_argument("--decode-T", default=None, help="comma list of T for forward-only (default 16,64,256)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny iteration counts (smoke test)")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-deadline-s", type=float, default=150.0,
                    help="skip grouped_mm_compiled if this many seconds have passed since start")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main():
    t_start = time.time()
    args = parse_args()
    if torch is None:
        print("torch is not installed", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    iters = args.iters if args.iters is not None else (2 if args.quick else 20)

    if args.shapes == "full":
        shapes = dict(FULL_SHAPES)
    elif args.shapes == "small":
        shapes = dict(SMALL_SHAPES)
    else:
        allsh = {**FULL_SHAPES, **SMALL_SHAPES}
        shapes = {n: allsh[n] for n in args.shapes.split(",")}
    if args.decode_T:
        decode_T = [int(t) for t in args.decode_T.split(",")]
    else:
        decode_T = SMALL_DECODE_T if all(n.startswith("small") for n in shapes) else FULL_DECODE_T

    meta = dict(
        torch=torch.__version__,
        cuda=torch.version.cuda,
        python=platform.python_version(),
        device=str(device),
        dtype="bfloat16",
        warmup=warmup,
        iters=iters,
        flops_formula=FLOPS_NOTE,
        shapes=shapes,
        decode_T=decode_T,
        routing="router weight randn[E,H]/sqrt(H) (seeded), softmax fp32, top-K, renormalised, cast to bf16; untimed",
        timing="per-iteration CUDA events, median and min over iters after warmup" if device.type == "cuda" else "perf_counter",
    )
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        meta["capability"] = list(torch.cuda.get_device_capability(device))
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except Exception as e:  # noqa: BLE001
        meta["transformers"] = f"unavailable ({type(e).__name__})"
    try:
        meta["grouped_mm_schema"] = [str(s) for s in torch._C._jit_get_schemas_for_operator("aten::_grouped_mm")]
    except Exception as e:  # noqa: BLE001
        meta["grouped_mm_schema"] = f"unavailable ({type(e).__name__}: {e})"

    R = Results(args.out, meta)
    R.save()
    print(f"torch {meta['torch']}  CUDA {meta['cuda']}  transformers {meta['transformers']}  python {meta['python']}")
    print(f"device {device}" + (f"  GPU {meta['gpu']} (sm{meta['capability'][0]}{meta['capability'][1]})" if "gpu" in meta else ""))
    print(f"_grouped_mm schema: {meta['grouped_mm_schema']}")
    print(f"warmup {warmup}, iters {iters}; out {args.out}")
    print(FLOPS_NOTE, flush=True)

    impls = [s for s in args.impls.split(",") if s]
    decode_impls = [s for s in args.decode_impls.split(",") if s]

    def bench(impl, sname, shape, P, mode):
        T = P["shape"]["T"]
        try:
            fn, wleaves = build_impl(impl, P)
            step = fwd_bwd_step(fn, P, wleaves) if mode == "fwd_bwd" else fwd_step(fn, P, wleaves)
            med, mn = time_step(step, warmup, iters, device)
        except Exception as e:  # noqa: BLE001
            R.add_error(f"{impl} {sname} {mode} T={T}", e)
            for t in (P["x"], P["w"], P["gate_up"], P["down"]):
                t.grad = None
            return None
        fl = flops_fwd(T, shape["H"], shape["F"], shape["K"]) * (3.0 if mode == "fwd_bwd" else 1.0)
        rec = dict(impl=impl, shape=sname, mode=mode, T=T, H=shape["H"], F=shape["F"], E=shape["E"],
                   K=shape["K"], ms_median=med, ms_min=mn, tflops=fl / (med * 1e-3) / 1e12,
                   tflops_best=fl / (mn * 1e-3) / 1e12, flops=fl, warmup=warmup, iters=iters)
        if mode == "fwd":
            hit = int(torch.unique(P["idx"]).numel())
            nbytes = hit * 3 * shape["H"] * shape["F"] * 2 + 2 * T * shape["H"] * 2
            rec["experts_hit"] = hit
            rec["weight_gbps"] = nbytes / (med * 1e-3) / 1e9
        R.add_record(rec)
        return rec

    first_shape = next(iter(shapes))
    print()
    print(header_line(), flush=True)
    for sname, shape in shapes.items():
        try:
            Wt = make_weights(shape, device, dtype, args.seed)
            P = make_inputs(Wt, shape, shape["T"], device, dtype, args.seed)
        except Exception as e:  # noqa: BLE001
            R.add_error(f"setup {sname}", e)
            continue

        # correctness (first shape, i.e. A): every impl against hf_eager
        if sname == first_shape:
            try:
                ref = run_once_with_grads(moe_hf_eager, P, (P["gate_up"], P["down"]))
                cands = [i for i in impls if i != "hf_eager"]
                for impl in cands:
                    try:
                        fn, wl = build_impl(impl, P)
                        got = run_once_with_grads(fn, P, wl)
                        diffs = {k: rel_diff(got[k], ref[k]) for k in ref}
                        ok = all(v < 2e-2 for v in diffs.values())
                        R.doc["correctness"].append(dict(impl=impl, ref="hf_eager", shape=sname, rel_max_abs_diff=diffs,
                                                         tol=2e-2, ok=ok))
                        R.save()
                        print(f"# correctness {impl} vs hf_eager on {sname}: "
                              + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
                              + ("  OK" if ok else "  FAIL"), flush=True)
                        del got
                    except Exception as e:  # noqa: BLE001
                        R.add_error(f"correctness {impl} {sname}", e)
                del ref
            except Exception as e:  # noqa: BLE001
                R.add_error(f"correctness reference {sname}", e)

        for impl in impls:
            bench(impl, sname, shape, P, "fwd_bwd")

        for T in decode_T:
            try:
                Pd = make_inputs(Wt, shape, T, device, dtype, args.seed)
            except Exception as e:  # noqa: BLE001
                R.add_error(f"setup {sname} T={T}", e)
                continue
            for impl in decode_impls:
                bench(impl, sname, shape, Pd, "fwd")
            del Pd
        del P, Wt
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # torch.compile variant last (compile time is unbounded-ish; JSON is already saved)
    if not args.no_compile:
        for sname, shape in shapes.items():
            if time.time() - t_start > args.compile_deadline_s:
                print(f"# grouped_mm_compiled {sname}: skipped (past --compile-deadline-s)", flush=True)
                R.doc["errors"].append(dict(what=f"grouped_mm_compiled {sname}", error="skipped: deadline"))
                R.save()
                continue
            try:
                Wt = make_weights(shape, device, dtype, args.seed)
                P = make_inputs(Wt, shape, shape["T"], device, dtype, args.seed)
                tc = time.time()
                if sname == first_shape:
                    ref = run_once_with_grads(moe_hf_eager, P, (P["gate_up"], P["down"]))
                    got = run_once_with_grads(moe_grouped_compiled, P, (P["gate_up"], P["down"]))
                    diffs = {k: rel_diff(got[k], ref[k]) for k in ref}
                    ok = all(v < 2e-2 for v in diffs.values())
                    R.doc["correctness"].append(dict(impl="grouped_mm_compiled", ref="hf_eager", shape=sname,
                                                     rel_max_abs_diff=diffs, tol=2e-2, ok=ok))
                    R.save()
                    print(f"# correctness grouped_mm_compiled vs hf_eager on {sname}: "
                          + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()) + ("  OK" if ok else "  FAIL"),
                          flush=True)
                    del ref, got
                else:
                    run_once_with_grads(moe_grouped_compiled, P, (P["gate_up"], P["down"]))
                print(f"# grouped_mm_compiled {sname}: first call (compile) {time.time() - tc:.1f} s", flush=True)
                bench("grouped_mm_compiled", sname, shape, P, "fwd_bwd")
                del P, Wt
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                R.add_error(f"grouped_mm_compiled {sname}", e)

    # summary table
    print()
    print("summary (ms median / TFLOP/s):")
    print(header_line())
    for rec in R.doc["records"]:
        gbps = rec.get("weight_gbps")
        print(f"{rec['impl']:<22} {rec['shape']:<7} {rec['mode']:<8} {rec['T']:>6} "
              f"{rec['ms_median']:>10.3f} {rec['ms_min']:>10.3f} {rec['tflops']:>9.1f} "
              f"{(f'{gbps:.0f}' if gbps is not None else '-'):>9}")
    if R.doc["errors"]:
        print(f"{len(R.doc['errors'])} error(s):")
        for e in R.doc["errors"]:
            print(f"  {e['what']}: {e['error'][:300]}")
    print(f"wrote {args.out}  ({time.time() - t_start:.1f} s total)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
