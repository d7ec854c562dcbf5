"""``make tune``: equal-budget tuning on the validation split, the test over seeds and the
sensitivity study (:mod:`backfill_utils.studies.tuning`, :mod:`backfill_utils.studies.sensitivity`),
then, for the default profile, the verdict blocks of README.md and docs/fairness.md
(:mod:`backfill_utils.tools.report`).

``python -m backfill_utils.tools.make_tune --profile default`` (``--no-sensitivity``, ``--quiet``).
"""
from __future__ import annotations

import argparse
import os
import time

import pandas as pd

from .. import config as C
from .. import io
from .. import parallel
from ..studies import sensitivity as SE
from ..studies import tuning as TU
from . import report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Equal-budget tuning on the validation split, the test "
                                                 "evaluation over seeds and the sensitivity study (make tune).")
    parser.add_argument("--profile", default=None, help=f"one of {C.available_profiles()}")
    parser.add_argument("--overrides", default=None, help="profile keys to change (YAML), as in the notebooks")
    parser.add_argument("--no-sensitivity", action="store_true", help="skip the sensitivity study")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    cfg = C.load_profile(args.profile, overrides=args.overrides)
    progress, stages = not args.quiet, []
    print(f"tuning: profile {cfg['profile']}, {TU.tune_config(cfg)['trials']} trials per method, "
          f"{parallel.workers()} worker(s) -> {TU.out_dir(cfg)}", flush=True)
    t0 = time.perf_counter()
    TU.prepare(cfg, progress=progress)
    stages.append(("backbones and embeddings", time.perf_counter() - t0))
    t0 = time.perf_counter()
    trials = TU.search(cfg, progress=progress)
    chosen = TU.select(trials)
    stages.append(("search", time.perf_counter() - t0))
    t0 = time.perf_counter()
    test = TU.evaluate_test(cfg, chosen, progress=progress)
    d = TU.write_outputs(cfg, trials, chosen, test)
    stages.append(("test over seeds", time.perf_counter() - t0))
    if not args.no_sensitivity:
        t0 = time.perf_counter()
        SE.write_outputs(cfg, SE.study(cfg, chosen["Ours"]["recipe"], progress=progress))
        stages.append(("sensitivity", time.perf_counter() - t0))
    runtime = pd.DataFrame(stages, columns=["stage", "seconds"]).round(1)
    runtime = pd.concat([runtime, pd.DataFrame([{"stage": "TOTAL", "seconds": runtime["seconds"].sum()}])])
    runtime["workers"], runtime["threads"] = parallel.workers(), os.environ.get(C.THREADS_ENV, "torch default")
    io.atomic_write(d / "runtime.csv", lambda p: runtime.to_csv(p, index=False))
    print(runtime.to_string(index=False))
    print(pd.read_csv(d / "tuned_vs_default.csv").round(2).to_string(index=False))
    if cfg["run_name"] == "default" and not os.environ.get(C.RESULTS_ENV):
        report.update_readme()
        print("README.md and docs/fairness.md: 'What holds, and where' updated from results/")


if __name__ == "__main__":
    main()
