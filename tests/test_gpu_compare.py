"""test_gpu_compare.py: tests/gpu/compare.py, which sets two GPU runs' bench JSON lines side by side: rows
matched by preset, tokens, micro-batches, backend and expert path; the ops that changed most first, unchanged
ones left out; rows in one file only named; a malformed line stops it naming the file and line."""
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from checks import check, finish

compare = os.path.join(os.path.dirname(__file__), "gpu", "compare.py")


def bench(preset, tokens, ms, ops, backend="cuda", accum=1):
    return {"preset": preset, "tokens_per_step": tokens, "accum": accum, "backend": backend, "ms_per_step": ms,
            "mfu": 0.05, "expert_gemm": "grouped bf16", "ops": {k: {"ms_per_step": v} for k, v in ops.items()}}


def run(before, after):
    with tempfile.TemporaryDirectory() as d:
        paths = []
        for name, lines in (("before.jsonl", before), ("after.jsonl", after)):
            paths.append(os.path.join(d, name))
            with open(paths[-1], "w") as f:
                f.write("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
        p = subprocess.run([sys.executable, compare] + paths, capture_output=True, text=True)
        return p.returncode, p.stdout, p.stderr


torch = {"impl": "pytorch-eager", "preset": "tiny", "tokens_per_step": 1024, "dtype": "bf16", "ms_per_step": 70.0}
rc, out, err = run([bench("sigma", 16384, 100.0, {"attention_backward": 30.0, "rmsnorm_backward": 5.0, "sumsq": 2.0}),
                    bench("sigma", 16384, 90.0, {"sumsq": 2.0}, accum=4), torch],
                   [bench("sigma", 16384, 80.0, {"attention_backward": 12.0, "rmsnorm_backward": 4.0, "sumsq": 2.0}),
                    "error: timed out", dict(torch, ms_per_step=35.0)])
lines = out.splitlines()
check(rc == 0, f"two runs compare (exit {rc}, {err})")
row = [i for i, l in enumerate(lines) if l.startswith("moelab sigma 16384 tok/step x1 cuda")]
check(len(row) == 1 and "100.00 -> 80.00 ms/step (1.25x)" in lines[row[0]], f"the matched row's step time: {out}")
ops = lines[row[0] + 1:row[0] + 3] if row else []
check(len(ops) == 2 and "attention_backward" in ops[0] and "-18.000" in ops[0] and "rmsnorm_backward" in ops[1],
      f"the ops that changed most come first: {ops}")
check("sumsq" not in out, "an unchanged op is left out")
check(any(l.startswith("only before: moelab sigma 16384 tok/step x4") for l in lines),
      "a row in the first file only is named (the other micro-batch count is another row)")
check(any(l.startswith("PyTorch tiny 1024") and "(2.00x)" in l for l in lines), f"PyTorch rows compare: {out}")
rc, out, err = run([bench("tiny", 1024, 2.0, {})], ["{not json"])
check(rc != 0 and "after.jsonl:1" in err, f"a malformed line names the file and line: {rc} {err}")
finish("gpu_compare")
