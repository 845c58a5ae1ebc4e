#!/usr/bin/env python3
"""test_sweep_e2e.py: `moelab sweep` and `moelab train FILE.yaml` end to end, through the binary.

- --dry-run expands grid x variants x seeds (counts and values), in every format.
- Two jobs in parallel on tiny runs: every run finishes, two ran at the same time, params hold the swept values.
- Re-invocation skips finished runs; an edited file adds only its new runs.
- kill -9 of the runner alone (workers checkpoint and stop), and kill -9 of the runner with its workers: the next
  invocation finishes every run exactly once, no duplicate rows, every trace holds steps 1..N once each.
- Ctrl-C: runs marked killed, exit 1, the next invocation resumes them.
- A failing run records its error and does not stop the others; it reruns only with --retry-failed.
- A malformed file: exit 2 with file:line; train FILE.yaml runs a one-run file and refuses a many-run file.
Usage: test_sweep_e2e.py MOELAB TOKENS_DIR
"""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

moelab, tokens = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
from checks import check, finish


tmp = tempfile.mkdtemp(prefix="moelab_sweep_")
os.chdir(tmp)


def run(*args, expect=0):
    p = subprocess.run([moelab, *args], capture_output=True, text=True)
    check(p.returncode == expect,
          f"moelab {' '.join(args)} -> {p.returncode} (want {expect}): {p.stderr.strip()[-400:]}")
    return p


def write(name, text):
    with open(name, "w") as f:
        f.write(text)
    return name


def db_rows(db, sql, *args):
    c = sqlite3.connect(db)
    try:
        return c.execute(sql, args).fetchall()
    finally:
        c.close()


def traces_continuous(db, steps):
    """Every run's trace holds steps 1..steps exactly once."""
    ok = True
    for rid, d in db_rows(db, "SELECT id, run_dir FROM runs"):
        with h5py.File(os.path.join(d, "trace.h5"), "r") as f:
            s = f["step"][:]
        if not np.array_equal(s, np.arange(1, steps + 1)):
            print(f"  trace of {rid}: {len(s)} rows, steps {s[:3]}...{s[-3:]}")
            ok = False
    return ok


base = f"""
base:
  preset: tiny
  data.dir: {tokens}
  train:
    batch: 4
    eval_batches: 2
    eval_every: 0
    log_every: 5
  model.seq_len: 32
"""

# ---- expansion (--dry-run) ----
grid = write("grid.yaml", "name: grid\n" + base + """
sweep:
  balance.aux_coef: [1e-3, 1e-2, 1e-1]
  model.top_k: [1, 2]
variants:
  aux: {}
  lf:
    cross: false
    balance.policy: loss_free
seeds: [5, 6]
""")
p = run("sweep", grid, "--dry-run", "--format", "json", "--db", "dry.db")
rows = json.loads(p.stdout) if p.returncode == 0 else []
check(len(rows) == (3 * 2 + 1) * 2, f"grid x variants x seeds: {len(rows)} runs (want 14)")
names = [r["run"] for r in rows]
check(len(set(names)) == len(names), "run names are unique")
check("aux,aux_coef=1e-2,top_k=2,seed=6" in names and "lf,seed=5" in names, f"run names: {names[:3]}...")
check(all(r["status"] == "new" and r["action"] == "run" for r in rows), "a fresh database: every run is new")
check(not os.path.exists("dry.db"), "--dry-run creates no database")
p = run("sweep", grid, "--dry-run", "--format", "csv", "--db", "dry.db")
check(p.stdout.count("\n") == 15, "csv: header + 14 rows")

# ---- two jobs in parallel; params hold the swept values ----
steps = 40
sw = write("sw.yaml", "name: sw\n" + base.replace("log_every: 5", f"log_every: 5\n    steps: {steps}\n    ckpt_every: 10") + """
sweep:
  balance.aux_coef: [1e-3, 1e-2]
variants:
  aux: {}
  lf:
    cross: false
    balance.policy: loss_free
seeds: 2
""")
db = os.path.join(tmp, "sw.db")
t0 = time.time()
p = run("sweep", sw, "--jobs", "2", "--db", db)
check("6 of 6 runs finished" in p.stdout, "sweep reports 6 of 6 finished")
check("worst_maxvio" in p.stdout and "val_loss" in p.stdout, "summary table with val_loss and worst_maxvio")
st = db_rows(db, "SELECT status, count(*) FROM runs GROUP BY status")
check(st == [("finished", 6)], f"all finished: {st}")
iv = db_rows(db, "SELECT julianday(started), julianday(finished) FROM runs")
overlap = any(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(iv) for b in iv[i + 1:])
check(overlap, "two runs ran at the same time with --jobs 2")
v = db_rows(db, "SELECT r.name, p.value FROM runs r JOIN params p ON p.run = r.id WHERE p.key = 'balance.aux_coef' "
                "ORDER BY r.name")
check(("aux,aux_coef=1e-3,seed=1", "0.001") in v and ("aux,aux_coef=1e-2,seed=2", "0.01") in v,
      f"params hold the swept values: {v}")
pol = dict(db_rows(db, "SELECT r.name, p.value FROM runs r JOIN params p ON p.run = r.id WHERE p.key = 'balance.policy'"))
check(pol.get("lf,seed=1") == "loss_free" and pol.get("aux,aux_coef=1e-3,seed=2") == "aux_loss", f"variants: {pol}")
seeds = dict(db_rows(db, "SELECT r.name, p.value FROM runs r JOIN params p ON p.run = r.id WHERE p.key = 'seed'"))
check(seeds.get("lf,seed=2") == "2", f"seeds reach the config: {seeds}")
check(traces_continuous(db, steps), "traces hold every step once")
for rid, d in db_rows(db, "SELECT id, run_dir FROM runs"):
    for f in ("config.yaml", "log.txt", "trace.h5", "checkpoint.bin"):
        check(os.path.exists(os.path.join(d, f)), f"{rid}: {f}")

# ---- re-invocation skips finished runs; an edited file adds only the new runs ----
p = run("sweep", sw, "--jobs", "2", "--db", db)
check("6 finished before" in p.stdout and "started" not in p.stdout, "a second invocation starts nothing")
write("sw.yaml", open("sw.yaml").read().replace("[1e-3, 1e-2]", "[1e-3, 1e-2, 1e-1]"))
p = run("sweep", sw, "--jobs", "2", "--db", db)
check(p.stdout.count("started ") == 2 and "aux_coef=1e-1" in p.stdout, "the edited file runs only its 2 new runs")
check(db_rows(db, "SELECT count(*) FROM runs")[0][0] == 8, "8 rows after the edit")


# ---- kill -9 of the runner alone, then of the runner with its workers ----
def wait_for_progress(dbp, after=0, timeout=60):
    """Waits until two logged losses at step >= after are in the database (the sweep is under way)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        time.sleep(0.3)
        try:
            if db_rows(dbp, "SELECT count(*) FROM metrics WHERE key = 'loss' AND step >= ?", after)[0][0] >= 2:
                return
        except sqlite3.Error:
            pass


def kill_midway(yaml, dbp, whole_group, after):
    proc = subprocess.Popen([moelab, "sweep", yaml, "--jobs", "2", "--db", dbp], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_progress(dbp, after)
    if whole_group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.kill()
    proc.wait()
    time.sleep(2.0)  # workers notice the runner is gone, checkpoint and exit


for whole in (False, True):
    tag = "group" if whole else "runner"
    ky = write(f"k{tag}.yaml", f"name: k{tag}\n" + base.replace("log_every: 5", "log_every: 5\n    steps: 120\n    ckpt_every: 20") + """
sweep:
  balance.aux_coef: [1e-3, 1e-2, 1e-1]
seeds: 1
""")
    kdb = os.path.join(tmp, f"k{tag}.db")
    kill_midway(ky, kdb, whole, 25)
    st = dict(db_rows(kdb, "SELECT status, count(*) FROM runs GROUP BY status"))
    check(st.get("finished", 0) < 3, f"kill -9 {tag}: interrupted mid-sweep ({st})")
    if not whole:
        check(st.get("killed", 0) >= 1 and st.get("running", 0) == 0,
              f"kill -9 of the runner: its workers marked their runs killed ({st})")
    p = run("sweep", ky, "--jobs", "2", "--db", kdb)
    check("resumed" in p.stdout, f"kill -9 {tag}: the next invocation resumes from a checkpoint")
    st = db_rows(kdb, "SELECT status, count(*) FROM runs GROUP BY status")
    check(st == [("finished", 3)], f"kill -9 {tag}: every run finished once ({st})")
    dup = db_rows(kdb, "SELECT count(*) FROM (SELECT run, step, key FROM metrics GROUP BY 1, 2, 3 HAVING count(*) > 1)")
    check(dup[0][0] == 0, "no duplicate metric rows")
    n_loss = db_rows(kdb, "SELECT run, count(*) FROM metrics WHERE key = 'loss' GROUP BY run")
    check(all(n == 120 // 5 for _, n in n_loss), f"kill -9 {tag}: each logged step once: {n_loss}")
    check(traces_continuous(kdb, 120), f"kill -9 {tag}: traces continuous")

# ---- Ctrl-C ----
cy = write("c.yaml", "name: c\n" + base.replace("log_every: 5", "log_every: 5\n    steps: 200") + """
sweep:
  balance.aux_coef: [1e-3, 1e-2]
""")
cdb = os.path.join(tmp, "c.db")
proc = subprocess.Popen([moelab, "sweep", cy, "--jobs", "2", "--db", cdb], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
wait_for_progress(cdb)
proc.send_signal(signal.SIGINT)
out, errs = proc.communicate(timeout=60)
check(proc.returncode == 1, f"Ctrl-C: exit 1 (got {proc.returncode})")
check("interrupted" in errs, f"Ctrl-C: says interrupted: {errs.strip()[-200:]}")
st = dict(db_rows(cdb, "SELECT status, count(*) FROM runs GROUP BY status"))
check(st.get("killed", 0) == 2, f"Ctrl-C: both runs killed ({st})")
for (d,) in db_rows(cdb, "SELECT run_dir FROM runs"):
    check(os.path.exists(os.path.join(d, "checkpoint.bin")), "Ctrl-C: checkpoint kept")
p = run("sweep", cy, "--jobs", "2", "--db", cdb)
check(p.stdout.count("resumed ") == 2, "after Ctrl-C both runs resume")
check(traces_continuous(cdb, 200), "after Ctrl-C traces continuous")

# ---- a failing run does not stop the others ----
fy = write("f.yaml", "name: f\n" + base.replace("log_every: 5", "log_every: 5\n    steps: 20") + """
variants:
  ok: {}
  diverges:
    train.lr: 1e30
    train.grad_clip: 0
""")
fdb = os.path.join(tmp, "f.db")
p = run("sweep", fy, "--db", fdb, expect=1)
st = dict(db_rows(fdb, "SELECT name, status FROM runs"))
check(st == {"ok": "finished", "diverges": "failed"}, f"one failed, the other finished: {st}")
err = db_rows(fdb, "SELECT error FROM runs WHERE name = 'diverges'")[0][0] or ""
check("not finite" in err, f"the failure's error is recorded: {err!r}")
check("FAILED diverges" in p.stdout, "the failure is reported")
p = run("sweep", fy, "--db", fdb, expect=1)
check("started" not in p.stdout, "failed runs are not retried without --retry-failed")
p = run("sweep", fy, "--db", fdb, "--retry-failed", expect=1)
check("started diverges" in p.stdout and "started ok" not in p.stdout, "--retry-failed reruns only the failed run")

# ---- bad input ----
bad = write("bad.yaml", "name: bad\nbase:\n  preset: tiny\n  train.stepz: 5\n")
p = run("sweep", bad, expect=2)
check("bad.yaml:4: train.stepz: unknown key" in p.stderr, f"bad file: file:line: key: {p.stderr.strip()}")
p = run("sweep", sw, "--jobs", "0", expect=2)
nodata = write("nodata.yaml", "name: nodata\nbase:\n  data.dir: /nonexistent\n")
p = run("sweep", nodata, "--db", os.path.join(tmp, "nodata.db"), expect=2)
check("moelab data prepare" in p.stderr, f"missing data names the fix: {p.stderr.strip()}")
check(not os.path.exists(os.path.join(tmp, "nodata.db")), "missing data: no database written")

# ---- train FILE.yaml ----
one = write("one.yaml", "name: one\n" + base.replace("log_every: 5", "log_every: 5\n    steps: 10"))
p = run("train", one, "train.steps=12", "run.db=" + os.path.join(tmp, "one.db"))
rows = db_rows(os.path.join(tmp, "one.db"), "SELECT id, status, experiment FROM runs")
check(len(rows) == 1 and rows[0][1] == "finished" and rows[0][2] == "one", f"train FILE.yaml: one finished run {rows}")
check(db_rows(os.path.join(tmp, "one.db"), "SELECT value FROM params WHERE key = 'train.steps'") == [("12",)],
      "train FILE.yaml key=value overrides the file")
p = run("train", sw, expect=2)
check("describes 8 runs" in p.stderr and "moelab sweep" in p.stderr, f"train refuses a sweep: {p.stderr.strip()}")

finish("sweep_e2e")
