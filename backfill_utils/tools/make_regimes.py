"""``make regimes``: the regime map (:mod:`backfill_utils.studies.regimes`: old models that know
more or less, who wins where), then, for the default profile, the verdict blocks of README.md
and docs/fairness.md (:mod:`backfill_utils.tools.report`).

``python -m backfill_utils.tools.make_regimes --profile default`` (``--quiet``).
"""
from __future__ import annotations

import argparse
import os
import time

import pandas as pd

from .. import config as C
from .. import io
from .. import parallel
from ..studies import regimes as RG
from ..studies import seeds as SD
from . import report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="The regime map: old models that know more or less (make regimes).")
    parser.add_argument("--profile", default=None, help=f"one of {C.available_profiles()}")
    parser.add_argument("--overrides", default=None, help="profile keys to change (YAML), as in the notebooks")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    cfg = C.load_profile(args.profile, overrides=args.overrides)
    print(f"regimes: profile {cfg['profile']}, {len(RG.regime_config(cfg)['variants'])} variants, "
          f"{len(SD.compat_seeds(cfg))} seeds, {parallel.workers()} worker(s) -> {RG.out_dir(cfg)}", flush=True)
    t0 = time.perf_counter()
    raw = RG.run(cfg, progress=not args.quiet)
    d = RG.write_outputs(cfg, raw)
    seconds = time.perf_counter() - t0
    io.atomic_write(d / "runtime.csv", lambda p: pd.DataFrame([{
        "stage": "TOTAL", "seconds": round(seconds, 1), "workers": parallel.workers(),
        "threads": os.environ.get(C.THREADS_ENV, "torch default")}]).to_csv(p, index=False))
    print(pd.read_csv(d / "winners.csv").round(2).to_string(index=False))
    print(pd.read_csv(d / "crossover.csv").round(3).to_string(index=False))
    print(f"regimes done in {seconds:.0f} s")
    if cfg["run_name"] == "default" and not os.environ.get(C.RESULTS_ENV):
        report.update_readme()
        print("README.md and docs/fairness.md: 'What holds, and where' updated from results/")


if __name__ == "__main__":
    main()
