#!/usr/bin/env python3
"""Two hotpatch binaries side by side on twin targets: apply time and trips.

    scripts/ab_apply.py OLD_HOTPATCH NEW_HOTPATCH TARGET PATCH.so [--mode idle|busy] [--runs N] [--workers W]

TARGET is crates/hotpatch-cli/tests/live/target.c built with
`gcc -O2 -pthread -fpatchable-function-entry=8,6`, PATCH.so its
tests/live/patch_a.c. Old and new alternate (first = a fresh target each
time; warm = one target per binary, after an apply and a revert). Prints
the medians of `apply --json`'s elapsed_us and its remote_calls.
"""
import argparse
import json
import statistics
import subprocess


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("target")
    ap.add_argument("patch")
    ap.add_argument("--mode", default="idle")
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--workers", default="4")
    a = ap.parse_args()
    tools = {"old": a.old, "new": a.new}

    def start():
        p = subprocess.Popen([a.target, a.workers, "-", a.mode], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        p.stdout.readline()  # "ready ..."
        return p

    def apply(tool, pid):
        r = subprocess.run([tool, "apply", str(pid), a.patch, "--json"], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"{tool} apply failed: {r.stderr}")
        d = json.loads(r.stdout)
        return d["elapsed_us"], d.get("remote_calls")

    def revert(tool, pid):
        subprocess.run([tool, "revert", str(pid), "--all"], capture_output=True, check=True)

    times = {(n, k): [] for n in tools for k in ("first", "warm")}
    trips = {}
    for i in range(a.runs):
        for name in (("old", "new") if i % 2 == 0 else ("new", "old")):
            p = start()
            try:
                e, c = apply(tools[name], p.pid)
            finally:
                p.kill()
                p.wait()
            times[(name, "first")].append(e)
            trips[(name, "first")] = c
    targets = {n: start() for n in tools}
    try:
        for n, t in tools.items():
            apply(t, targets[n].pid)
            revert(t, targets[n].pid)
        for i in range(a.runs):
            for name in (("old", "new") if i % 2 == 0 else ("new", "old")):
                e, c = apply(tools[name], targets[name].pid)
                revert(tools[name], targets[name].pid)
                times[(name, "warm")].append(e)
                trips[(name, "warm")] = c
    finally:
        for p in targets.values():
            p.kill()
            p.wait()
    for k in ("first", "warm"):
        o = statistics.median(times[("old", k)])
        n = statistics.median(times[("new", k)])
        print(f"{a.mode} {k}: old {o / 1000:.2f} ms ({trips[('old', k)]} trips), "
              f"new {n / 1000:.2f} ms ({trips[('new', k)]} trips), old/new {o / n:.2f}x")


if __name__ == "__main__":
    main()
