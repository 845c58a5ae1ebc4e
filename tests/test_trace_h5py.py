#!/usr/bin/python3
"""test_trace_h5py.py: a trace written by moelab's C writer, read with h5py (Debian's python3-h5py): shapes,
dtypes, maxshape, chunking and filters, root attributes, a few values, and layer 1's per-step MaxVio
((max - mean) / mean over experts) recomputed from raw /load equal to what analysis/metrics.c computed.

    test_trace_h5py.py TEST_TRACE_BINARY   runs `TEST_TRACE_BINARY --keep DIR/trace.h5` in a temporary folder
    test_trace_h5py.py TRACE.h5            checks a kept trace against TRACE.h5.expected.json

Exit 0 when every check passes, 1 otherwise, 2 on bad usage or a missing h5py.
"""
import json
import os
import subprocess
import sys
import tempfile

try:
    import h5py
    import numpy as np
except ImportError as e:
    print(f"test_trace_h5py.py: {e} (install python3-h5py)", file=sys.stderr)
    sys.exit(2)

from checks import check, finish


def load_of(s, l, e):
    """tests/test_trace.c's load_of(step, layer, expert)."""
    return (s * 7 + l * 13 + e * 3 + (s * e) % 11) % 97 + 1


def check_trace(path):
    with open(path + ".expected.json") as f:
        want = json.load(f)
    L, E, N, K = want["layers"], want["experts"], want["nsteps"], want["nevals"]
    with h5py.File(path, "r") as f:
        attrs = f.attrs
        check(int(attrs["schema_version"]) == 1 == want["schema_version"],
              f"schema_version {attrs.get('schema_version')!r}")
        check(attrs["run_id"] == want["run_id"], f"run_id {attrs.get('run_id')!r}, want {want['run_id']!r}")
        check(isinstance(attrs["config"], str) and attrs["config"] == want["config"],
              f"config attribute {attrs.get('config')!r}")
        check(int(attrs["layers"]) == L and int(attrs["experts"]) == E,
              f"layers/experts {attrs.get('layers')}/{attrs.get('experts')}, want {L}/{E}")

        i64, i32, f32 = np.dtype("<i8"), np.dtype("<i4"), np.dtype("<f4")
        schema = {
            "step": (i64, (N,)), "tokens": (i64, (N,)), "loss": (f32, (N,)), "lr": (f32, (N,)),
            "grad_norm": (f32, (N,)), "policy_loss": (f32, (N, L)), "load": (i32, (N, L, E)),
            "selected": (i32, (N, L, E)), "gate_mean": (f32, (N, L, E)), "bias": (f32, (N, L, E)),
            "topk": (i32, (N, L)), "dropped": (i32, (N, L)),
            "eval/step": (i64, (K,)), "eval/loss": (f32, (K,)), "eval/load": (i32, (K, L, E)),
            "eval/gate_mean": (f32, (K, L, E)),
        }
        for name, (dtype, shape) in schema.items():
            if name not in f:
                check(False, f"/{name} missing")
                continue
            d = f[name]
            check(d.dtype == dtype, f"/{name} dtype {d.dtype}, want {dtype}")
            check(d.shape == shape, f"/{name} shape {d.shape}, want {shape}")
            check(d.maxshape == (None,) + shape[1:], f"/{name} maxshape {d.maxshape}")
            check(d.compression == "gzip" and d.compression_opts == 1 and d.shuffle,
                  f"/{name} filters {d.compression} {d.compression_opts} shuffle={d.shuffle}")
        check(f["load"].chunks == (64, 1, E), f"/load chunks {f['load'].chunks}, want (64, 1, {E})")
        check(f["policy_loss"].chunks == (64, L), f"/policy_loss chunks {f['policy_loss'].chunks}")
        check(f["step"].chunks == (64,), f"/step chunks {f['step'].chunks}")
        names = {k for k in f.keys() if k != "eval"} | {"eval/" + k for k in f["eval"].keys()}
        extra = sorted(names - set(schema))
        check(not extra, f"datasets outside the schema: {extra}")

        steps = f["step"][:]
        check(np.array_equal(steps, np.arange(N)), "/step is not 0..N-1")
        load = f["load"][:]
        s, l, e = np.meshgrid(np.arange(N), np.arange(L), np.arange(E), indexing="ij")
        check(np.array_equal(load, load_of(s, l, e)), "/load differs from tests/test_trace.c's formula")
        check(np.array_equal(f["eval/step"][:], np.arange(0, N, want["eval_every"])), f"/eval/step {f['eval/step'][:]}")

        layer = want["maxvio_layer"]
        x = f["load"][:, layer, :].astype(np.float64)
        mean = x.sum(axis=1) / E
        maxvio = (x.max(axis=1) - mean) / mean
        expected = np.array(want["maxvio"])
        check(expected.shape == maxvio.shape, f"{expected.shape[0]} expected MaxVio values, {maxvio.shape[0]} steps")
        if expected.shape == maxvio.shape:
            err = np.max(np.abs(maxvio - expected) / np.maximum(np.abs(expected), 1e-300))
            check(err <= 1e-12, f"layer {layer} MaxVio differs from the C metrics by {err:.3g} (relative)")
            print(f"layer {layer} MaxVio over {N} steps: mean {maxvio.mean():.6f}, max relative difference to C "
                  f"{err:.3g}")


def main():
    if len(sys.argv) != 2:
        print("usage: test_trace_h5py.py TEST_TRACE_BINARY | TRACE.h5", file=sys.stderr)
        sys.exit(2)
    arg = sys.argv[1]
    if arg.endswith(".h5"):
        check_trace(arg)
    else:
        with tempfile.TemporaryDirectory(prefix="moelab_test_trace_h5py_") as tmp:
            path = os.path.join(tmp, "trace.h5")
            run = subprocess.run([arg, "--keep", path], capture_output=True, text=True)
            check(run.returncode == 0, f"{arg} --keep {path} exited {run.returncode}:\n{run.stdout[-2000:]}")
            if os.path.exists(path + ".expected.json"):
                check_trace(path)
    finish("trace_h5py")


if __name__ == "__main__":
    main()
