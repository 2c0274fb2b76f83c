"""The lecture's worked examples in core.averages: the trick's four versions, get_batch's pairs."""

import torch

from core.averages import (
    context_target_pairs,
    toy_input,
    version1_loops,
    version2_weights,
    version3_weights,
    version4_head,
)


def test_versions_1_to_3_are_the_same_average():
    x = toy_input(B=4, T=8, C=2)
    xbow = version1_loops(x)
    torch.testing.assert_close(xbow[:, 3], x[:, :4].mean(1))
    torch.testing.assert_close(version2_weights(8) @ x, xbow)
    torch.testing.assert_close(version3_weights(8) @ x, xbow)
    torch.testing.assert_close(version3_weights(8), version2_weights(8))


def test_version4_weights_are_causal_rows_chosen_by_the_data():
    x = toy_input(B=2, T=5, C=8, seed=3)
    wei, out = version4_head(x, head_size=4)
    torch.testing.assert_close(wei.sum(-1), torch.ones(2, 5))
    assert (wei.triu(1) == 0).all()
    assert not torch.allclose(wei[0], wei[1])
    assert out.shape == (2, 5, 4)
    # With every query and key equal to zero, self-attention is version 3's plain average.
    wei_zero, _ = version4_head(torch.zeros(1, 5, 8))
    torch.testing.assert_close(wei_zero[0], version3_weights(5))


def test_context_target_pairs_as_the_lecture_prints_them():
    assert context_target_pairs([18, 47, 56], [47, 56, 57]) == [([18], 47), ([18, 47], 56), ([18, 47, 56], 57)]
