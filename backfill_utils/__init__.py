"""backfill_utils: online backfilling with metric-compatible training.

Reproduction package for Seo et al., "Metric Compatible Training for Online
Backfilling in Large-Scale Retrieval" (WACV 2025). One concept per module:
config, data, models, losses, compat, train, embed, metrics, backfill, methods,
plots, run. See README.md.
"""
__version__ = "0.1.0"
