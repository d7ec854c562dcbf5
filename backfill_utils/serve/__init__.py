"""Serving the mixed gallery with faiss during an online backfill.

``index`` (OnlineBackfillIndex), ``side`` (one side: a faiss index and its ids), ``lock``
(readers-writer lock), ``checks`` (input checks, sorted-id helpers), ``transform`` (psi,
rho, h as index transforms), ``merge`` (the two sides' lists merged), ``tune`` (nprobe per side for a target
recall), ``index_file`` (the
file format: save, load), ``from_method`` (a registered method as a served index),
``simulate`` (a backfill worker and a query stream on a simulated clock).
"""
