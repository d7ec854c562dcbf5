"""The cost of a method (studies/query_cost.py): the gallery-side transform time."""
import pytest
import torch

from backfill_utils.studies import query_cost as QC


def test_gallery_transform_time_is_measured_per_million_items():
    h = torch.nn.Linear(8, 8)
    s = QC.time_gallery_transform(h, 8, items=4096, batch_size=1024, repeats=1)
    assert 0 < s < 1e4
    with pytest.raises(ValueError, match="items"):
        QC.time_gallery_transform(h, 8, items=0)
