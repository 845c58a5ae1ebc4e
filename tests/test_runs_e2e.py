#!/usr/bin/env python3
"""test_runs_e2e.py: traces and the run database end to end, through the moelab binary.

- What the trainer recorded equals what h5py reads: shapes, attributes, loads that sum to tokens x k, and a
  layer's MaxVio recomputed from the raw /load equals `moelab trace summary`.
- kill -9 during a run: `runs list` shows it killed, the trace opens and holds the flushed steps, and
  --resume continues it with every step exactly once.
- runs list / show / compare / query in every format, --where on a float key; trace export.
- A foreign or corrupt trace or database: a clear error and exit 2.
Usage: test_runs_e2e.py MOELAB TOKENS_DIR
"""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

moelab, tokens = sys.argv[1], sys.argv[2]
from checks import check, finish


def run(*args, expect=0):
    p = subprocess.run([moelab, *args], capture_output=True, text=True)
    check(p.returncode == expect, f"moelab {' '.join(args)} -> {p.returncode} (want {expect}): {p.stderr.strip()[:300]}")
    return p


tmp = tempfile.mkdtemp(prefix="moelab_e2e_")
db = os.path.join(tmp, "runs.db")
small = ["preset=tiny", "train.batch=4", "model.seq_len=32", "train.eval_batches=2", f"data.dir={tokens}",
         f"run.db={db}", "run.experiment=e2e"]

# two finished runs
a_dir, b_dir = os.path.join(tmp, "a"), os.path.join(tmp, "b")
run("train", *small, "train.steps=24", "train.eval_every=8", f"run.dir={a_dir}", "trace.flush_every=5")
run("train", *small, "train.steps=24", "train.eval_every=8", f"run.dir={b_dir}", "balance.policy=loss_free",
    "balance.aux_coef=0.05", "model.layer_top_k=[1]*2")

with h5py.File(os.path.join(a_dir, "trace.h5"), "r") as f:
    L, E = f.attrs["layers"], f.attrs["experts"]
    check(f.attrs["schema_version"] == 1, "schema_version attribute")
    rid = f.attrs["run_id"]
    check((rid.decode() if isinstance(rid, bytes) else rid) == "a", f"run_id attribute {rid!r}")
    cfg = f.attrs["config"]
    cfg = cfg.decode() if isinstance(cfg, bytes) else cfg
    check("model.experts: 8" in cfg, "config attribute holds the resolved config")
    steps = f["step"][:]
    check(list(steps) == list(range(1, 25)), f"steps 1..24 once each, got {list(steps)}")
    load = f["load"][:]
    check(load.shape == (24, L, E) and load.dtype == np.int32, f"load shape {load.shape} {load.dtype}")
    topk = f["topk"][:]
    tokens_per_step = 4 * 32
    check(all((load[s, l].sum() == tokens_per_step * topk[s, l]) for s in range(24) for l in range(L)),
          "every step's loads sum to tokens x k")
    check(f["eval/step"][:].tolist() == [8, 16, 24], "eval rows at steps 8, 16, 24")
    check(f["gate_mean"].shape == (24, L, E) and abs(f["gate_mean"][0].sum(axis=1) - 1).max() < 1e-4,
          "gate means of a layer sum to 1")
    loads1 = load[:, 1, :].astype(np.float64)
    mean = loads1.mean(axis=1)
    maxvio_h5py = ((loads1.max(axis=1) - mean) / mean).mean()
s = run("trace", "summary", a_dir, "--layer", "1", "--format", "json")
rows = json.loads(s.stdout) if s.returncode == 0 else []
check(len(rows) == 1 and abs(rows[0]["maxvio_mean"] - maxvio_h5py) < 1e-4,
      f"trace summary layer 1 MaxVio {rows[0]['maxvio_mean'] if rows else None} vs h5py {maxvio_h5py:.4f}")
s = run("trace", "summary", "a", "--db", db, "--steps", "5:10", "--format", "csv")
check(s.stdout.count("\n") == 1 + L, "summary by run id over a window: a header and one row per layer")
s = run("trace", "export", a_dir, "--layer", "0", "--steps", "3:4")
check(s.stdout.splitlines()[0] == "step,layer,expert,load,selected,gate_mean,bias" and
      len(s.stdout.splitlines()) == 1 + 2 * E, "export: header + 2 steps x E experts")
s = run("trace", "export", a_dir, "--metrics", "--format", "json")
check(len(json.loads(s.stdout)) == 24 * L, "export --metrics: one row per (step, layer)")

# the database
s = run("runs", "list", "--db", db, "--format", "json")
listed = json.loads(s.stdout)
check(sorted(r["id"] for r in listed) == ["a", "b"] and all(r["status"] == "finished" for r in listed),
      f"runs list: {listed}")
s = run("runs", "list", "--db", db, "--where", "balance.aux_coef=0.05", "--format", "csv")
check(s.stdout.splitlines()[1:] and all(l.startswith("b,") for l in s.stdout.splitlines()[1:]),
      f"--where balance.aux_coef=0.05 finds b only: {s.stdout}")
s = run("runs", "list", "--db", db, "--where", "balance.policy=aux_loss", "--status", "finished", "--format", "csv")
check(len(s.stdout.splitlines()) == 2 and s.stdout.splitlines()[1].startswith("a,"), "--where on a string key")
s = run("runs", "compare", "a", "b", "--db", db, "--format", "json")
cmp = json.loads(s.stdout)
keys = {r["key"] for r in cmp["params"]}
check({"balance.policy", "balance.aux_coef", "model.layer_top_k", "run.dir"} <= keys and "model.experts" not in keys,
      f"compare lists the differing keys only: {keys}")
s = run("runs", "show", "a", "--db", db, "--format", "json")
shown = json.loads(s.stdout)
check(shown["run"][0]["status"] == "finished" and len(shown["layers"]) == L and
      any(p["key"] == "balance.aux_coef" for p in shown["params"]), "runs show json")
s = run("runs", "query", "SELECT COUNT(*) AS n FROM params WHERE key = 'model.experts' AND value = '8'",
        "--db", db, "--format", "json")
check(json.loads(s.stdout) == [{"n": 2}], f"query: {s.stdout}")
run("runs", "query", "DELETE FROM runs", "--db", db, expect=2)
run("runs", "show", "nosuch", "--db", db, expect=2)

# kill -9 mid-run, then resume
k_dir = os.path.join(tmp, "k")
proc = subprocess.Popen([moelab, "train", *small, "train.steps=400", "train.eval_every=0", f"run.dir={k_dir}",
                         "trace.flush_every=5", "train.ckpt_every=10"], stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)
trace_path = os.path.join(k_dir, "trace.h5")
deadline = time.time() + 120
while time.time() < deadline:
    time.sleep(0.5)
    try:
        with h5py.File(trace_path, "r") as f:  # readable while the run writes
            if len(f["step"]) >= 25:
                break
    except (OSError, KeyError):
        pass
os.kill(proc.pid, signal.SIGKILL)
proc.wait()
s = run("runs", "list", "--db", db, "--status", "killed", "--format", "csv")
check(any(l.startswith("k,") for l in s.stdout.splitlines()), f"the killed run shows as killed: {s.stdout}")
with h5py.File(trace_path, "r") as f:
    st = f["step"][:]
    check(len(st) >= 25 and list(st) == list(range(1, len(st) + 1)), f"flushed steps intact after kill -9: {len(st)}")
run("train", "--resume", k_dir, "train.steps=60")
with h5py.File(trace_path, "r") as f:
    st = f["step"][:]
    check(list(st) == list(range(1, 61)), f"resumed trace holds steps 1..60 exactly once: {list(st)[:5]}... n={len(st)}")
s = run("runs", "list", "--db", db, "--format", "json")
check({r["id"]: r["status"] for r in json.loads(s.stdout)}.get("k") == "finished", "resumed run finished")

# foreign and corrupt files
junk = os.path.join(tmp, "junk.h5")
with open(junk, "w") as f:
    f.write("not hdf5\n")
s = run("trace", "summary", junk, expect=2)
check("junk.h5" in s.stderr, f"non-HDF5 trace named in the error: {s.stderr}")
foreign = os.path.join(tmp, "foreign.h5")
with h5py.File(foreign, "w") as f:
    f["x"] = np.arange(3)
s = run("trace", "summary", foreign, expect=2)
check("foreign.h5" in s.stderr, f"foreign HDF5 named: {s.stderr}")
s = run("runs", "list", "--db", junk, expect=2)
check("junk.h5" in s.stderr, f"non-SQLite db named: {s.stderr}")
other = os.path.join(tmp, "other.db")
subprocess.run(["/usr/bin/python3", "-c", f"import sqlite3; c=sqlite3.connect('{other}'); c.execute('create table t(x)'); c.commit()"])
s = run("runs", "list", "--db", other, expect=2)
check("other.db" in s.stderr, f"foreign SQLite db named: {s.stderr}")

subprocess.run(["rm", "-rf", tmp])
finish("runs_e2e")
