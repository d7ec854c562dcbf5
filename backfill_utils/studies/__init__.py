"""Studies built on the backfilling curves: seeds, claims, tuning, sensitivity, regimes,
the backfill order, query cost, your own models, convergence and outside figures.

``seeds``, ``claims`` (each claim defined once, by id), ``tuning``, ``sensitivity``,
``regimes``, ``order_study``, ``query_cost``, ``own_models`` (an adapter to your own
embeddings), ``convergence``, ``outside`` (published figures with their source).
"""
