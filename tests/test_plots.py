#!/usr/bin/env python3
"""test_plots.py: every `moelab plot` kind from fixture runs: a valid, non-empty PNG/SVG/PDF, and a data file
whose numbers equal an independent computation from the raw trace (h5py + numpy) or the run database (sqlite3).
Errors (unknown run, layer, format; missing gnuplot) exit 2 and leave nothing behind.
Usage: test_plots.py MOELAB TOKENS_DIR
"""
import os
import sqlite3
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

import h5py
import numpy as np

moelab, tokens = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
from checks import check, finish


tmp = tempfile.mkdtemp(prefix="moelab_plots_")
os.chdir(tmp)
db = os.path.join(tmp, "p.db")


def run(*args, expect=0, env=None):
    p = subprocess.run([moelab, *args], capture_output=True, text=True, env=env)
    check(p.returncode == expect, f"moelab {' '.join(args)} -> {p.returncode} (want {expect}): {p.stderr.strip()[-300:]}")
    return p


def valid_image(path):
    if not os.path.exists(path) or os.path.getsize(path) < 1000:
        return False
    data = open(path, "rb").read()
    if path.endswith(".png"):
        w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and w > 100 and h > 100
    if path.endswith(".svg"):
        return ET.fromstring(data).tag.endswith("svg")
    if path.endswith(".pdf"):
        return data[:5] == b"%PDF-" and b"%%EOF" in data[-1024:]
    return False


def blocks(path):
    """Numeric rows of a data file, split into blocks at double blank lines."""
    out, cur, blank = [], [], 0
    for line in open(path):
        s = line.strip()
        if s.startswith("#"):
            continue
        if not s:
            blank += 1
            if blank == 2 and cur:
                out.append(np.array(cur))
                cur = []
            continue
        blank = 0
        cur.append([float(v) for v in s.split()])
    if cur:
        out.append(np.array(cur))
    return out


def close(a, b, tol=2e-5):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return a.shape == b.shape and np.allclose(a, b, rtol=tol, atol=tol, equal_nan=True)


# ---- fixture runs: 2 policies x 2 seeds, tiny, 60 steps ----
with open("fx.yaml", "w") as f:
    f.write(f"""name: fx
base:
  preset: tiny
  data.dir: {tokens}
  model: {{layers: 3, experts: 8, top_k: 1}}
  train: {{batch: 4, steps: 60, eval_every: 20, eval_batches: 2, log_every: 5}}
  model.seq_len: 32
variants:
  aux: {{balance.policy: aux_loss}}
  lf: {{balance.policy: loss_free}}
seeds: 2
""")
run("sweep", "fx.yaml", "--jobs", "2", "--db", db)
c = sqlite3.connect(db)
runs = dict(c.execute("SELECT name, id FROM runs").fetchall())
dirs = dict(c.execute("SELECT name, run_dir FROM runs").fetchall())
rid = runs["aux,seed=1"]
trace = os.path.join(dirs["aux,seed=1"], "trace.h5")
with h5py.File(trace, "r") as t:
    step, load, gate = t["step"][:], t["load"][:].astype(float), t["gate_mean"][:].astype(float)
    estep, eload = t["eval/step"][:], t["eval/load"][:].astype(float)
N, L, E = load.shape
check(N == 60 and L == 3 and E == 8, f"fixture trace shape {load.shape}")


def dev(loads):
    m = loads.sum() / E
    return (loads.min() - m) / m, (loads.max() - m) / m


# heatmap of one layer over training (60 steps < 800 bins: one column per step)
run("plot", "heatmap", "--run", rid, "--db", db, "--layer", "1", "-o", "h1.png")
check(valid_image("h1.png"), "heatmap png")
d = blocks("h1.dat")[0]
want = np.array([[step[i], e, load[i, 1, e] / (load[i, 1].sum() / E)] for i in range(N) for e in range(E)])
check(close(d, want), "heatmap --layer: z = load / uniform share per step and expert")
run("plot", "heatmap", "--run", rid, "--db", db, "--layer", "0", "--log", "-o", "h0.svg")
check(valid_image("h0.svg"), "log heatmap svg")
d = blocks("h0.dat")[0]
z = load[:, 0] / (load[:, 0].sum(axis=1, keepdims=True) / E)
with np.errstate(divide="ignore"):
    lz = np.maximum(np.log2(z), -6)
check(close(d[:, 2], lz.reshape(-1)), "heatmap --log: log2 with the floor at 1/64")
# layers x experts over a window (folder given as RUN)
run("plot", "heatmap", "--run", dirs["aux,seed=1"], "--window", "41:60", "-o", "hw.pdf")
check(valid_image("hw.pdf"), "window heatmap pdf")
d = blocks("hw.dat")[0]
s = load[40:60].sum(axis=0)
want = np.array([[e, l, s[l, e] / (s[l].sum() / E)] for e in range(E) for l in range(L)])
check(close(d, want), "heatmap --window: layers x experts of the summed loads")

# deviation per layer: default window = the last 10% of the trace (steps 55..60)
run("plot", "deviation", "--run", rid, "--db", db, "-o", "dev.png")
check(valid_image("dev.png"), "deviation png")
d = blocks("dev.dat")[0]
s = load[54:60].sum(axis=0)
want = [[l, *dev(s[l]), dev(s[l])[1]] for l in range(L)]
check(close(d, want), f"deviation: min/max deviation of the last 10% per layer\n{d}\n{np.array(want)}")
p = run("trace", "summary", trace, "--steps", "55:", "--format", "csv")
rows = [r.split(",") for r in p.stdout.strip().splitlines()[1:]]
check(close([[float(r[5]), float(r[6])] for r in rows], d[:, 1:3], tol=1e-3), "deviation agrees with trace summary")
run("plot", "deviation", "--run", rid, "--db", db, "--step", "30", "-o", "dev30.png")
d = blocks("dev30.dat")[0]
check(close(d[:, 1:3], [dev(load[29, l]) for l in range(L)]), "deviation --step 30")
run("plot", "deviation", "--run", rid, "--db", db, "--over-training", "--layers", "0,2", "-o", "devt.png")
check(valid_image("devt.png"), "deviation over training png")
b = blocks("devt.dat")
check(len(b) == 2 and close(b[1][:, 1:], [dev(load[i, 2]) for i in range(N)]), "deviation over training, layer 2")

# f and p per expert, sorted
run("plot", "fp", "--run", rid, "--db", db, "--layers", "0,2", "--window", "21:60", "-o", "fp.png")
check(valid_image("fp.png"), "fp png")
b = blocks("fp.dat")
f2 = np.sort(load[20:60, 2].sum(axis=0) / load[20:60, 2].sum())[::-1]
p2 = np.sort(gate[20:60, 2].mean(axis=0))[::-1]
check(len(b) == 2 and close(b[1], np.stack([np.arange(1, E + 1), f2, p2], axis=1)), "fp: sorted f and p of layer 2")
check(abs(b[0][:, 1].sum() - 1) < 1e-4, "fp: token fractions sum to 1")

# loss curves of the experiment: one block per run, values from the metrics table
run("plot", "loss", "--experiment", "fx", "--db", db, "-o", "loss.png")
check(valid_image("loss.png"), "loss png")
b = blocks("loss.dat")
check(len(b) == 4, f"loss: 4 curves ({len(b)})")
legends = [l[2:].strip() for l in open("loss.dat") if l.startswith("# ") and "step value" not in l]
check(any("policy=loss_free" in g and "seed=2" in g for g in legends), f"legends name the differing keys: {legends}")
m = c.execute("SELECT step, value FROM metrics WHERE run = ? AND key = 'loss' ORDER BY step", (rid,)).fetchall()
first = b[legends.index("policy=aux_loss seed=1")] if "policy=aux_loss seed=1" in legends else b[0]
check(close(first[:, :2][~np.isnan(first[:, 1])], m), "loss: the run's logged losses")
v = c.execute("SELECT step, value FROM metrics WHERE run = ? AND key = 'val_loss' ORDER BY step", (rid,)).fetchall()
check(close(first[~np.isnan(first[:, 2])][:, [0, 2]], v), "loss: validation points at their steps")

# maxvio grouped by policy: the mean over the seeds
run("plot", "maxvio", "--experiment", "fx", "--db", db, "--group-by", "balance.policy", "-o", "mv.png")
check(valid_image("mv.png"), "maxvio png")
b = blocks("mv.dat")
check(len(b) == 2, "maxvio --group-by: one curve per policy")
ids = [runs["aux,seed=1"], runs["aux,seed=2"]]
m = np.array([[r[0] for r in c.execute("SELECT value FROM metrics WHERE run = ? AND key = 'maxvio' ORDER BY step",
                                       (i,))] for i in ids])
check(close(b[0][:, 1], m.mean(axis=0)), "maxvio --group-by: mean over the seeds")
# one layer from the traces
run("plot", "maxvio", "--runs", f"{runs['lf,seed=1']},{rid}", "--db", db, "--layer", "0", "-o", "mv0.png")
b = blocks("mv0.dat")
vio = np.array([(load[i, 0].max() - load[i, 0].mean()) / load[i, 0].mean() for i in range(N)])
check(len(b) == 2 and close(b[1][:, 1], vio), "maxvio --layer 0: per-step MaxVio from the trace")
evio = [(eload[k, 0].max() - eload[k, 0].mean()) / eload[k, 0].mean() for k in range(len(estep))]
check(close(b[1][~np.isnan(b[1][:, 2])][:, 2], evio), "maxvio --layer 0: validation MaxVio")

# ---- errors: exit 2, nothing written ----
p = run("plot", "heatmap", "--run", "nosuchrun", "--db", db, "--layer", "0", "-o", "e1.png", expect=2)
check("nosuchrun" in p.stderr, "unknown run named")
p = run("plot", "heatmap", "--run", rid, "--db", db, "--layer", "7", "-o", "e2.png", expect=2)
check("layer 7" in p.stderr, f"unknown layer named: {p.stderr.strip()}")
p = run("plot", "deviation", "--run", rid, "--db", db, "-o", "e3.jpg", expect=2)
p = run("plot", "loss", "--runs", "nosuch", "--db", db, "-o", "e4.png", expect=2)
env = dict(os.environ, MOELAB_GNUPLOT="/nonexistent/gnuplot")
p = run("plot", "deviation", "--run", rid, "--db", db, "-o", "e5.png", expect=2, env=env)
check("gnuplot not found" in p.stderr, f"missing gnuplot: {p.stderr.strip()}")
left = [f for f in os.listdir(".") if f.startswith("e") and f[1].isdigit()]
check(not left, f"nothing written on errors: {left}")

finish("plots")
