#!/usr/bin/env python3
"""test_reproduce.py: `moelab reproduce paper --scale tiny` completes, writes every figure and an index.html that
is well-formed, links only files that exist (valid, non-empty PNGs), states findings with numbers for every
variant, and whose imbalance table equals the traces. A second invocation reruns nothing.
Usage: test_reproduce.py MOELAB TOKENS_DIR
"""
import csv
import html.parser
import os
import sqlite3
import subprocess
import sys
import tempfile

import h5py
import numpy as np

moelab, tokens = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
from checks import check, finish


tmp = tempfile.mkdtemp(prefix="moelab_repro_")
out, db, runs = os.path.join(tmp, "report"), os.path.join(tmp, "r.db"), os.path.join(tmp, "runs")
args = ["reproduce", "paper", "--scale", "tiny", "--jobs", "2", "--out", out, "--db", db, "--runs-dir", runs,
        f"data.dir={tokens}"]
p = subprocess.run([moelab, *args], capture_output=True, text=True)
check(p.returncode == 0, f"reproduce exit {p.returncode}: {p.stderr.strip()[-500:]}")
check("report:" in p.stdout, "prints where the report is")

c = sqlite3.connect(db)
st = c.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall()
check(st == [("finished", 10)], f"5 variants x 2 seeds finished: {st}")


class Page(html.parser.HTMLParser):
    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.links, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for k in ("src", "href"):
            if k in a:
                self.links.append(a[k])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


index = os.path.join(out, "index.html")
check(os.path.exists(index), "index.html written")
page = Page()
text = open(index).read() if os.path.exists(index) else ""
page.feed(text)
check(text.startswith("<!DOCTYPE html>"), "doctype")
check(not page.errors and not page.stack, f"well-formed: {page.errors[:3]} unclosed {page.stack}")
imgs = [l for l in page.links if l.endswith(".png")]
check(len(set(imgs)) >= 5 * 4 + 3, f"every figure linked ({len(set(imgs))})")
for link in set(page.links):
    path = os.path.join(out, link)
    ok = os.path.exists(path) and os.path.getsize(path) > 1000
    if ok and link.endswith(".png"):
        ok = open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    check(ok, f"linked file {link} exists and is valid")
words = " ".join(page.text)
for v in ("aux_lbl", "schedule", "loss_free", "global_lbl", "top1_lbl"):
    check(v in words, f"variant {v} in the report")
check("The paper reports" in words and "This run found" in words, "paper vs found, side by side")
check("layer 0 is more imbalanced" in words or "layer 0 is not more imbalanced" in words,
      "states whether layer 0 is more imbalanced, from the numbers")

# the table equals the traces: aux_lbl's layer-0 max deviation over the last 10%, mean over seeds
rows = list(csv.DictReader(open(os.path.join(out, "imbalance.csv"))))
got = [float(r["max_dev"]) for r in rows if r["variant"] == "aux_lbl" and r["layer"] == "0"]
devs = []
for (d,) in c.execute("SELECT run_dir FROM runs WHERE name LIKE 'aux_lbl,%'"):
    with h5py.File(os.path.join(d, "trace.h5"), "r") as t:
        load = t["load"][:].astype(float)
    n = load.shape[0]
    s = load[n - (n + 9) // 10:, 0].sum(axis=0)
    devs.append((s.max() - s.mean()) / s.mean())
check(len(got) == 1 and abs(got[0] - np.mean(devs)) < 1e-3, f"imbalance.csv max_dev {got} vs traces {np.mean(devs)}")

# run again: every run is skipped, the report is rewritten
p = subprocess.run([moelab, *args], capture_output=True, text=True)
check(p.returncode == 0 and "10 finished before" in p.stdout and "started" not in p.stdout,
      "a second invocation reruns nothing")

# the other scales' files are valid too (they run for an hour on a CPU, or need a GPU)
paper = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "paper")
for scale, n in (("small", 10), ("gpu", 5)):
    p = subprocess.run([moelab, "sweep", os.path.join(paper, scale + ".yaml"), "--dry-run", "--db",
                        os.path.join(tmp, "none.db")], capture_output=True, text=True)
    check(p.returncode == 0 and f"{n} runs" in p.stdout, f"experiments/paper/{scale}.yaml expands to {n} runs: "
          f"{p.stderr.strip()[-200:]}")
p = subprocess.run([moelab, "reproduce", "paper", "--scale", "huge"], capture_output=True, text=True)
check(p.returncode == 2 and "huge" in p.stderr, "unknown scale: exit 2")

finish("reproduce")
