"""backfill_utils: online backfilling with metric-compatible training.

Reproduction package for Seo et al., "Metric Compatible Training for Online
Backfilling in Large-Scale Retrieval" (WACV 2025), laid out the way the data flows
(docs/layout.md has the map with every module):

    config, io, cache, session, parallel   profiles; atomic writes, checksums; the artifact
                                           cache and render mode; notebook set-up; workers
    data/       get_dataset (api), the registry, on-disk layouts, splits, transforms, synthetic
    models, train, embed                   backbones, their training, extraction (cached)
    compat/     modules (psi, rho, h), recipes, losses, inputs, fit
    retrieval/  distances, metrics, the exact engine (counting, phases)
    backfill/   orders, systems, curves, the method registry (+ builtin), evaluate, experiments
    studies/    seeds, claims, tuning, sensitivity, regimes, order study, query cost, own models,
                convergence, outside figures
    serve/      the faiss index over the mixed gallery (index, side, lock, checks, transform, tune,
                merge, index_file), from_method, simulate
    figures/    style, curve figures, study plots, illustrate, thumbnails, animation; tables
    tools/      command lines: run, make_tune, make_regimes, report, results_doc, blocks, bench,
                bench_serve, bench_gallery, gpu_check, scale_cost

See README.md and docs/.
"""
__version__ = "0.1.0"
