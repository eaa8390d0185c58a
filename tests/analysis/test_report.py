"""What the report records beside each context's window."""

from __future__ import annotations

import torch

from lorsa_hf.analysis.report import earlier_contributions


def test_earlier_contributions_name_the_tokens_before_the_window_that_count():
    contributions = torch.tensor([0.0, -2.0, 0.01, 0.5, 0.3, 1.0, 0.2])
    tokens = [10, 11, 12, 13, 14, 15, 16]
    assert earlier_contributions(contributions, 4, tokens) == [[1, 11, -2.0], [3, 13, 0.5]]
    assert earlier_contributions(contributions, 4, tokens, most=1) == [[1, 11, -2.0]]
    assert earlier_contributions(contributions, 0, tokens) == []
    assert earlier_contributions(torch.zeros(5), 3, tokens[:5]) == []
