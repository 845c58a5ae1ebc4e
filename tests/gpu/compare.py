#!/usr/bin/env python3
"""tests/gpu/compare.py: two runs of tests/gpu/run.sh side by side (their moelab_gpu_bench.jsonl files), so a
session that measures again sees at once which ops got faster or slower since the last recorded run.

    python3 tests/gpu/compare.py docs/gpu/h100-2026-11-23.jsonl $OUT/moelab_gpu_bench.jsonl

For each moelab bench row present in both (matched by preset, tokens per step, micro-batches, backend and
expert path): ms per step and MFU before and after, then the ops whose time per step changed the most (ms
before -> after; unchanged ones left out). Rows only in one file are listed by name. PyTorch rows are compared by ms per step."""
import json
import sys


def rows(path):
    out = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line.startswith("{"):
                continue  # a run's "error: ..." line
            try:
                r = json.loads(line)
            except ValueError:
                sys.exit(f"{path}:{n}: not a JSON line")
            if "impl" in r:
                key = ("torch", r["preset"], r["tokens_per_step"], r.get("dtype"), r.get("attention", "ref"))
            else:
                key = ("moelab", r["preset"], r["tokens_per_step"], r.get("accum", 1), r["backend"],
                       r.get("expert_gemm", ""))
            out[key] = r
    return out


def name(key):
    if key[0] == "torch":
        return f"PyTorch {key[1]} {key[2]} tok/step {key[3]} attention {key[4]}"
    return f"moelab {key[1]} {key[2]} tok/step x{key[3]} {key[4]} ({key[5]})"


def main(argv):
    if len(argv) != 3:
        sys.exit("usage: compare.py BEFORE.jsonl AFTER.jsonl")
    try:
        before, after = rows(argv[1]), rows(argv[2])
    except OSError as e:
        sys.exit(f"compare.py: {e}")
    top = 8
    for key in sorted(before.keys() & after.keys(), key=str):
        b, a = before[key], after[key]
        line = f"{name(key)}: {b['ms_per_step']:.2f} -> {a['ms_per_step']:.2f} ms/step " \
               f"({b['ms_per_step'] / a['ms_per_step']:.2f}x)"
        if key[0] == "moelab":
            line += f", MFU {100 * b['mfu']:.1f}% -> {100 * a['mfu']:.1f}%"
        print(line)
        bo, ao = b.get("ops", {}), a.get("ops", {})
        ms = lambda ops, op: ops[op]["ms_per_step"] if op in ops else 0.0
        delta = {op: ms(ao, op) - ms(bo, op) for op in bo.keys() | ao.keys()}
        changed = sorted((op for op in delta if abs(delta[op]) >= 0.0005), key=lambda op: (-abs(delta[op]), op))
        for op in changed[:top]:
            print(f"    {op:28s} {ms(bo, op):8.3f} -> {ms(ao, op):8.3f} ms  ({ms(ao, op) - ms(bo, op):+.3f})")
    for key in sorted(before.keys() - after.keys(), key=str):
        print(f"only before: {name(key)}")
    for key in sorted(after.keys() - before.keys(), key=str):
        print(f"only after: {name(key)}")


if __name__ == "__main__":
    main(sys.argv)
