"""backfill_utils: online backfilling with metric-compatible training.

Reproduction package for Seo et al., "Metric Compatible Training for Online
Backfilling in Large-Scale Retrieval" (WACV 2025). One concept per module:
config, io, session, data (with dataset_registry, synthetic, layouts, ...),
models, distances, losses, recipes, compat (+ compat_inputs, compat_train),
train, embed, metrics, orders, backfill, methods (the method registry),
experiments (+ order_study, query_cost), tables, illustrate, plots (+
thumbnails, animation), run, bench. See README.md.
"""
__version__ = "0.1.0"
