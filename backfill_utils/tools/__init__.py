"""Command-line entry points (``python -m backfill_utils.tools.<name>``) and the writers of
the generated blocks of README.md and docs/.

``run`` (the papermill runner, make reproduce), ``make_tune`` and ``make_regimes`` (make
tune, make regimes), ``blocks`` (the one writer of generated blocks), ``report`` (the
verdict), ``results_doc`` (README's Table 1, docs/results.md), ``bench`` and
``bench_serve`` (+ ``bench_serve_summary``, ``bench_gallery``, ``bench_timing``), ``gpu_check``, ``scale_cost``.
"""
