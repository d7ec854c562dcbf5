"""Figures: style and files, one module per family of figures.

``style`` (rcParams, deterministic figure and table files, method styles, axis helpers),
``curve_figures`` (backfilling curves, AUC bars, ablation, flips, distances, training
curves), ``study_plots`` (tuning, sensitivity, regime map), ``illustrate`` (ranked lists,
images, pair distances), ``thumbnails`` (image figures, Fig. 1), ``animation`` (the GIF).
"""
