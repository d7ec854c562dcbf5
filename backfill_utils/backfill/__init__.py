"""Online backfilling: orders, systems, curves, the method registry and the evaluation loop.

``orders`` (which items are backfilled at ratio r; a method's order), ``systems``
(BackfillSystem: four embedding sets and the backfilled-at-r rule), ``curves`` (curves,
AUC, negative flips, the summary), ``registry`` (the method registry) and ``builtin`` (the
paper's methods and BiCT, registered on first use), ``evaluate`` (one loop behind the
EmbeddingSource protocol), ``experiments`` (running registered methods with cached training).
"""
