"""Datasets: the registry of names and constants, the readers of on-disk layouts, splits,
transforms and the offline synthetic generator.

``api`` (get_dataset, dataset_info: the one entry point), ``registry`` (names, split names,
one frozen ``DatasetEntry`` per dataset, data roots), ``datasets`` (the Dataset classes),
``layout_folders`` / ``layout_cifar`` / ``layout_torchvision`` (on-disk layouts, no
unrestricted unpickling), ``splits`` (class splits, the validation split), ``transforms``,
``synthetic`` and ``synthetic_objects`` (the generator).
"""
