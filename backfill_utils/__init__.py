"""backfill_utils: online backfilling with metric-compatible training.

Reproduction package for Seo et al., "Metric Compatible Training for Online
Backfilling in Large-Scale Retrieval" (WACV 2025). One concept per module:
config, io, session, data (with dataset_registry, synthetic, layouts, ...),
models, distances, losses, recipes, compat (+ compat_inputs, compat_train),
train (+ parallel), embed, metrics (the exact engine: engine, counting,
counting_numba, phases), orders, backfill, methods (the method registry),
experiments (+ evaluate: the one evaluation loop; order_study, query_cost), seeds, claims, tuning, sensitivity,
regimes, report, tables, illustrate, plots (+ study_plots, thumbnails,
animation), serve (+ serve_parts, serve_side: faiss over the mixed gallery),
run, bench, bench_serve, gpu_check, blocks (the generated blocks of README.md and docs/).
See README.md and docs/.
"""
__version__ = "0.1.0"
