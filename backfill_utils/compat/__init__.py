"""Compatibility modules and their training on cached backbone embeddings.

``modules`` (psi, rho, FCT's / BiCT's h, FastFill's head; checkpoints, apply), ``recipes``
(one frozen, JSON-able dataclass per way of training), ``losses`` (CMCL and its variants,
L_rev, BCT, FastFill, BiCT), ``inputs`` (cached-embedding inputs, augmented passes,
batches), ``fit`` (the training loops: fit_reverse, fit_fct, fit_fastfill, fit_bict).
"""
