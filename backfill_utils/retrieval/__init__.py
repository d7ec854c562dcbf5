"""Exact retrieval: the one definition of distances, the metrics and the chunked engine.

``distances`` (the one rule), ``metrics`` (pure functions of distances and labels, doctested),
``engine`` (the chunked exact engine, CPU and CUDA), ``counting`` and ``counting_numba``
(its exact counting), ``phases`` (per-phase timers for the benchmark).
"""
