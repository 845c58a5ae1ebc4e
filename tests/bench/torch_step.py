#!/usr/bin/python3
"""torch_step.py: PyTorch eager baseline for `moelab bench`.

Times training steps (forward + backward + gradient clipping + torch.optim.AdamW) of the moelab model on
random tokens, on the CPU (float32) or a GPU (--device cuda: float32 without TF32, or --dtype bf16 autocast:
fp32 weights and optimizer, bf16 matmuls), and prints one JSON line shaped like `moelab bench --json`.

The model is tests/reference/make_fixtures.py's `forward` (the exact re-implementation of core/model.c),
imported, not copied. Only its `moe` is swapped for an eager implementation written the way PyTorch MoE
code usually is: the reference `moe` also measures top-k margins for fixture seeding (a sort of the router
scores), accumulates with an out-of-place index_add per expert and slices the stacked expert tensor once
per expert (each slice's backward materialises a full-size gradient). The replacement keeps the reference's
router, gates and balancing losses (`balance_loss`, every balance.policy term it implements). `--check`
proves in float64, on make_fixtures' cases, that the swap changes no output, loss or gradient. A step is
train.accum micro-batches (forward + backward of loss / accum each) and one optimizer update, like moelab bench.

Timing matches moelab bench: zero_grad + forward, backward, then global-norm clipping at 1 and AdamW
(lr 1e-4, the config's betas, eps and weight decay, none on the norms); the mean over --steps after
--warmup. Parameters start like core/model.c model_init_weights (the values differ: another RNG), tokens
are uniform over the vocabulary.

  /usr/bin/python3 tests/bench/torch_step.py --config runs/<run>/config.yaml [--steps N] [--warmup N]
                                             [--threads N] [--moe grouped|loop] [--json]
                                             [--device cpu|cuda] [--dtype fp32|bf16] [--attention ref|sdpa]
  /usr/bin/python3 tests/bench/torch_step.py --check [--config FILE]

--config takes a config.yaml as moelab writes it (`key: value` lines, every key). tests/bench/run.sh
makes one with `moelab train preset=P train.steps=0 run.dir=TMP`.

MoE variants (both: per-expert SwiGLU with one matmul pair per expert, nothing fused):
  grouped  sort the (token, slot) assignments by expert once, gather all routed rows with one index_select,
           split into per-expert groups, run each expert on its group, scale by the gates and scatter back
           with one index_add_ (default);
  loop     per expert: torch.where on the one-hot assignment mask, gather that expert's rows, run it,
           index_add_ into the output (the Hugging Face Mixtral / OLMoE layout).

Attention: ref (default) is the reference model's own (scores materialised, masked, softmaxed); sdpa swaps in
torch.nn.functional.scaled_dot_product_attention (is_causal, enable_gqa: FlashAttention's kernels on a GPU),
the baseline a PyTorch user would write today. --check covers both in float64.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as Fn

sys.dont_write_bytecode = True  # leave no __pycache__ in tests/reference
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "reference"))
import make_fixtures as ref  # noqa: E402  (model code; importing it runs nothing)

REFERENCE_MOE = ref.moe


# ---------------------------------------------------------------- config

def read_config(path):
    """moelab config.yaml -> (make_fixtures.Cfg, raw dict of strings)."""
    kv = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, _, v = line.partition(":")
            v = v.strip()
            if len(v) >= 2 and v[0] == '"' and v[-1] == '"':
                v = v[1:-1]
            kv[key.strip()] = v
    if not kv.get("model.layer_top_k"):
        kv.pop("model.layer_top_k", None)  # "" means: top_k in every MoE layer
    try:
        return ref.Cfg(kv), kv
    except (AssertionError, KeyError, ValueError) as e:
        print(f"torch_step.py: {path}: the PyTorch reference model (tests/reference/make_fixtures.py) does not"
              f" cover this config ({type(e).__name__}: {e}); its balance.policy terms are"
              f" {', '.join(getattr(ref, 'LOSS_POLICIES', ('aux_loss',)))} (alone or joined with '+')", file=sys.stderr)
        sys.exit(2)


def active_params(c):
    """model_active_params() of core/model.c: FLOP-relevant parameters per token."""
    n = 0.0
    for l in range(c.L):
        n += c.C * c.hd * (2.0 * c.H + 2.0 * c.KV)
        if c.k[l] == 0:
            n += 3.0 * c.C * c.Fd
        else:
            n += c.C * c.E + 3.0 * c.C * c.F * c.k[l] + 3.0 * c.C * c.Fs
    return n + float(c.V) * c.C


# ---------------------------------------------------------------- eager MoE (replaces make_fixtures.moe)

def _route(c, l, h2, P):
    """Router, top-k and gates exactly as make_fixtures.moe; returns logits, scores s, indices (M,k), gates (M,k)."""
    k = c.k[l]
    logits = h2 @ P[f"layers.{l}.router"].t()
    s = torch.sigmoid(logits) if c.sigmoid else torch.softmax(logits, dim=-1)
    key = (logits if c.after else s).detach()
    idx = key.topk(k, dim=-1).indices
    if c.after:
        g = torch.softmax(logits.gather(1, idx), dim=-1)
    else:
        g = s.gather(1, idx)
        if c.norm_topk:
            g = g / g.sum(-1, keepdim=True)
    return logits, s, idx, g * c.route_scale


def _balance(c, l, logits, s, idx, state, counts):
    """The balancing loss exactly as make_fixtures.moe: its running counts, then its balance_loss()."""
    state["running"][l] = state["running"][l] + counts.to(s.dtype)
    return ref.balance_loss(c, l, logits, s, idx, state)


def moe_grouped(c, l, h2, P, routing, state):
    k, p = c.k[l], f"layers.{l}."
    logits, s, idx, g = _route(c, l, h2, P)
    flat = idx.flatten()                      # assignment a = token * k + slot
    order = flat.argsort()
    tok = order // k                          # token of each assignment, grouped by expert
    counts = torch.bincount(flat, minlength=c.E)
    sizes = counts.tolist()
    xs = h2.index_select(0, tok).split(sizes)
    w13, w2 = P[p + "experts.w13"].unbind(0), P[p + "experts.w2"].unbind(0)
    outs = [ref.swiglu(xs[e], w13[e], w2[e], c.F) for e in range(c.E) if sizes[e]]
    out = torch.cat(outs) * g.flatten().index_select(0, order)[:, None]
    y = torch.zeros_like(h2).index_add_(0, tok, out)
    if c.S:
        y = y + ref.swiglu(h2, P[p + "shared.w13"], P[p + "shared.w2"], c.Fs)
    return y, _balance(c, l, logits, s, idx, state, counts)


def moe_loop(c, l, h2, P, routing, state):
    p = f"layers.{l}."
    logits, s, idx, g = _route(c, l, h2, P)
    mask = Fn.one_hot(idx, c.E).permute(2, 1, 0)  # (E, k, M)
    w13, w2 = P[p + "experts.w13"].unbind(0), P[p + "experts.w2"].unbind(0)
    y = torch.zeros_like(h2)
    for e in range(c.E):
        slot, rows = torch.where(mask[e])
        if rows.numel() == 0:
            continue
        out = ref.swiglu(h2.index_select(0, rows), w13[e], w2[e], c.F) * g[rows, slot, None]
        y.index_add_(0, rows, out)
    if c.S:
        y = y + ref.swiglu(h2, P[p + "shared.w13"], P[p + "shared.w2"], c.Fs)
    return y, _balance(c, l, logits, s, idx, state, torch.bincount(idx.flatten(), minlength=c.E))


MOE = {"grouped": moe_grouped, "loop": moe_loop}


def attention_sdpa(q, k, v, mask):
    """make_fixtures.attention through PyTorch's fused kernel (mask is the causal one it implies)."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B,heads,T,hd)
    group = q.shape[1] // k.shape[1]
    if group > 1:  # enable_gqa needs torch >= 2.5
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return Fn.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


ATTENTION = {"ref": ref.attention}
if hasattr(Fn, "scaled_dot_product_attention"):  # torch >= 2.0
    ATTENTION["sdpa"] = attention_sdpa


# ---------------------------------------------------------------- parameters, step

def new_state(c):
    """make_fixtures.accumulate's per-step balancing state (global counts restart each step); j: micro-batch."""
    return {"running": [0.0] * c.L, "j": 1, "weight": {}, "fmode": "running"}


def init_params(c, init_std, gen):
    """core/model.c model_init_weights: norms 1, N(0, std), projections into the residual (wo, *w2) std/sqrt(2L)."""
    out_std = init_std / math.sqrt(2.0 * c.L)
    P = {}
    for name, shape in ref.param_table(c):
        if ref.is_norm(name):
            w = torch.ones(shape)
        else:
            std = out_std if (".wo" in name or "w2" in name) else init_std
            w = torch.randn(shape, generator=gen) * std
        P[name] = w.requires_grad_(True)
    return P


def bench(args):
    c, kv = read_config(args.config)
    torch.set_num_threads(args.threads)
    ref.moe = MOE[args.moe]
    ref.attention = ATTENTION[args.attention]
    seed = int(kv.get("seed", 1337))
    gen = torch.Generator().manual_seed(seed)
    dev = torch.device(args.device)
    P = {n: w.detach().to(dev).requires_grad_(True) for n, w in init_params(c, ref.f32(kv["model.init_std"]), gen).items()}
    M = c.B * c.T
    stream = torch.randint(0, c.V, (M + 1,), generator=gen).to(dev)
    tokens, targets = stream[:-1].view(c.B, c.T), stream[1:].view(c.B, c.T)
    # GPU kernels run asynchronously: time finished work; fp32 means no TF32 (like moelab's cuda-fp32), bf16 is
    # autocast (like moelab's cuda: bf16 GEMM inputs, fp32 weights and optimizer)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    decay = [w for n, w in P.items() if not ref.is_norm(n)]
    no_decay = [w for n, w in P.items() if ref.is_norm(n)]
    params = decay + no_decay
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": c.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-4, betas=(c.beta1, c.beta2), eps=c.adam_eps, foreach=args.foreach)
    t_fwd = t_bwd = t_opt = 0.0
    loss = float("nan")
    for s in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        state, fwd, loss_sum = new_state(c), time.perf_counter() - t0, 0.0  # zero_grad counts as forward
        for j in range(c.A):  # as make_fixtures.accumulate and core/train.c
            state["j"] = j + 1
            ta = time.perf_counter()
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
                _, ce, aux, _, _ = ref.forward(c, P, tokens, targets, state)
                total = (ce + aux) / c.A
            sync()
            fwd += time.perf_counter() - ta
            total.backward()
            loss_sum += float(total)
        sync()
        t1, t2 = t0 + fwd, time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # moelab bench clips the global norm at 1 every step
        opt.step()
        sync()
        t3 = time.perf_counter()
        if s >= args.warmup:
            t_fwd, t_bwd, t_opt = t_fwd + t1 - t0, t_bwd + t2 - t1, t_opt + t3 - t2
        loss = loss_sum
    total_s = t_fwd + t_bwd + t_opt
    tok_s = M * c.A * args.steps / total_s
    flops_tok = 6 * active_params(c) + 6.0 * c.L * c.T * c.C
    res = {"impl": "pytorch-eager", "torch": torch.__version__, "device": str(dev), "dtype": args.dtype,
           "threads": torch.get_num_threads(),
           "moe": args.moe, "attention": args.attention, "preset": kv.get("preset", "?"),
           "tokens_per_step": M * c.A, "accum": c.A, "steps": args.steps,
           "tokens_per_s": round(tok_s, 1), "ms_per_step": round(1e3 * total_s / args.steps, 2),
           "forward_ms": round(1e3 * t_fwd / args.steps, 2), "backward_ms": round(1e3 * t_bwd / args.steps, 2),
           "optimizer_ms": round(1e3 * t_opt / args.steps, 2), "gflops": round(flops_tok * tok_s / 1e9, 2),
           "params": sum(w.numel() for w in P.values()), "last_loss": round(loss, 4)}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"pytorch {res['torch']} eager ({args.moe} MoE), preset {res['preset']}, {res['params']} parameters,"
              f" {M * c.A} tokens/step ({c.A} x {M}), {args.steps} steps (after {args.warmup} warmup), {res['threads']} threads")
        print(f"  step        {res['ms_per_step']:9.2f} ms  (forward {res['forward_ms']:.2f}, backward"
              f" {res['backward_ms']:.2f}, optimizer {res['optimizer_ms']:.2f})")
        print(f"  throughput  {tok_s:9.0f} tokens/s  ({res['gflops']:.2f} GFLOP/s at {flops_tok:.3g} FLOP/token)")


# ---------------------------------------------------------------- --check: the swap changes nothing

def check():
    torch.set_num_threads(1)
    worst = 0.0
    for name, seed, over, _ in ref.CASES:
        c = ref.Cfg(dict(ref.BASE, **over))
        gen = torch.Generator().manual_seed(seed)
        init = ref.init_params(c, gen)
        tokens = torch.randint(0, c.V, (c.B, c.T), generator=gen)
        targets = torch.randint(0, c.V, (c.B, c.T), generator=gen)
        results = {}
        variants = [("reference", REFERENCE_MOE, ATTENTION["ref"])] + [(f"{m} moe", fn, ATTENTION["ref"])
                                                                         for m, fn in MOE.items()]
        if "sdpa" in ATTENTION:
            variants.append(("sdpa attention", REFERENCE_MOE, ATTENTION["sdpa"]))
        for label, moe_fn, att_fn in variants:
            ref.moe, ref.attention = moe_fn, att_fn
            P = {n: w.clone().requires_grad_(True) for n, w in init.items()}
            logits, ce, aux, _, _ = ref.forward(c, P, tokens, targets, new_state(c))
            (ce + aux).backward()
            results[label] = [logits, ce, aux] + [P[n].grad for n in init]
        ref.moe, ref.attention = REFERENCE_MOE, ATTENTION["ref"]
        for label, _, _ in variants[1:]:
            err = max(float((a - b).abs().max()) for a, b in zip(results[label], results["reference"]))
            worst = max(worst, err)
            print(f"{name}: {label} vs reference, max abs difference (logits, losses, grads) {err:.2e}")
    ok = worst < 1e-12
    print("check " + ("passed" if ok else "FAILED") + f" (float64, worst {worst:.2e}, limit 1e-12)")
    return 0 if ok else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="config.yaml written by moelab (runs/<run>/config.yaml)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                    help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--moe", choices=sorted(MOE), default="grouped")
    ap.add_argument("--attention", choices=sorted(ATTENTION), default="ref",
                    help="ref: the reference model's attention; sdpa: F.scaled_dot_product_attention (fused)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the GPU comparison for moelab bench --backend cuda)")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="fp32 (no TF32; like --backend cuda-fp32) or bf16 autocast on cuda (fp32 weights and "
                         "optimizer, bf16 matmuls; like --backend cuda)")
    ap.add_argument("--foreach", dest="foreach", action="store_const", const=True, default=None,
                    help="multi-tensor (foreach) AdamW (default: torch's own choice, per-tensor on the CPU)")
    ap.add_argument("--no-foreach", dest="foreach", action="store_const", const=False, help="per-tensor AdamW")
    ap.add_argument("--json", action="store_true", help="one JSON line like moelab bench --json")
    ap.add_argument("--check", action="store_true",
                    help="float64: eager MoE variants and sdpa attention == make_fixtures on its cases (and --config is "
                         "readable)")
    args = ap.parse_args()
    if args.check:
        if args.config:
            read_config(args.config)  # exits 2 on a config the reference model does not cover
        return check()
    if not args.config:
        ap.error("--config FILE is required (or --check)")
    if args.dtype == "bf16" and args.device == "cpu":
        ap.error("--dtype bf16 is the GPU comparison: use it with --device cuda")
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("--steps and --threads must be >= 1 and --warmup >= 0")
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
