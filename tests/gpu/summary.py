"""tests/gpu/summary.py: the rows of tests/gpu/run.sh ("LABEL|JSON" lines of moelab bench and
tests/bench/torch_step.py on stdin) as a markdown table, with moelab's speed over PyTorch's per preset."""
import json
import sys

moelab = {}
for line in sys.stdin:
    label, _, text = line.rstrip("\n").partition("|")
    try:
        r = json.loads(text)
    except ValueError:
        print(f"| {label} | FAILED or skipped: {text[:200]} |")
        continue
    if "impl" in r:  # PyTorch: "torch SPEC DTYPE"
        spec, dtype = label.split()[1], label.split()[2]
        mine = moelab.get((spec, "cuda" if dtype == "bf16" else "cuda-fp32"))
        ratio = f", moelab is {mine / r['tokens_per_s']:.2f}x" if mine else ""
        att = " sdpa" if r.get("attention") == "sdpa" else ""
        print(f"| PyTorch eager{att} {spec} {dtype} | {r['tokens_per_s']:.0f} tok/s, "
              f"{r['ms_per_step']:.1f} ms/step{ratio} |")
    else:  # moelab bench: "SPEC BACKEND"
        spec, backend = label.split()
        moelab[(spec, backend)] = r["tokens_per_s"]
        top = ", ".join(f"{op} {v['ms_per_step']:.1f}" for op, v in list(r.get("ops", {}).items())[:4])
        print(f"| bench {spec} {backend} | {r['tokens_per_s']:.0f} tok/s, {r['ms_per_step']:.1f} ms/step, MFU "
              f"{100 * r['mfu']:.1f}% of {r['peak_kind']} ({r['peak_gflops']:.0f} GFLOP/s), routing "
              f"{100 * r['routing_fraction']:.1f}%, tracing {100 * r['trace_fraction']:.2f}%, "
              f"{r['step_allocations']} allocations in steps, {r.get('device_memory_gib', 0):.1f} GiB in use ({r.get('planned_memory_bytes', 0) / 2**30:.1f} planned), experts as {r.get('expert_gemm', '?')}, "
              f"attention {r.get('attention_tflops_forward', 0):.0f}/{r.get('attention_tflops_backward', 0):.0f} "
              f"TFLOP/s fwd/bwd; "
              f"slowest ops (ms): {top} |")
