"""Prompt rewriting on host tensors (earlytom_ext.integration.prompt), against hand-written
expected values: where each video's placeholders are found, how the runs are shortened, and how
the batch is re-padded."""

import pytest
import torch

from earlytom_ext.integration.prompt import HostPrompt, placeholder_runs, rewrite_placeholders

V = 9  # the video placeholder id in these tests
P = 0  # pad


def t(rows):
    return torch.tensor(rows, dtype=torch.int64)


# ------------------------------------------------------------------------------ placeholder_runs
def test_runs_one_video_per_sample():
    ids = t([[1, V, V, V, 2], [V, V, 3, 4, 5]])
    assert placeholder_runs(ids, V, [3, 2]) == {0: [(1, 4, 0)], 1: [(0, 2, 1)]}


def test_runs_two_videos_in_one_sample_adjacent_and_apart():
    # Adjacent videos form one run of placeholders; the counts split it in order.
    ids = t([[1, V, V, V, V, V, 2]])
    assert placeholder_runs(ids, V, [2, 3]) == {0: [(1, 3, 0), (3, 6, 1)]}
    ids = t([[V, V, 7, V, V, V, 2]])
    assert placeholder_runs(ids, V, [2, 3]) == {0: [(0, 2, 0), (3, 6, 1)]}


def test_runs_sample_without_video():
    ids = t([[1, 2, 3, 4], [5, V, V, 6], [1, 1, 1, 1]])
    assert placeholder_runs(ids, V, [2]) == {1: [(1, 3, 0)]}


@pytest.mark.parametrize(
    "rows,before",
    [
        ([[1, V, V, 2]], [3]),  # too few placeholders
        ([[1, V, V, V]], [2]),  # too many
        ([[V, V, V, V]], [1, 2]),  # 4 vs 3
    ],
)
def test_runs_wrong_total(rows, before):
    with pytest.raises(ValueError, match=r"input_ids hold \d+ video placeholder tokens"):
        placeholder_runs(t(rows), V, before)


@pytest.mark.parametrize(
    "rows,before",
    [
        ([[1, V, 2, V, V]], [3]),  # one video's placeholders interrupted
        ([[V, V, 3, V], [V, V, 1, 1]], [2, 3]),  # the second video continues in the next sample
        ([[1, 1, V, V], [V, 1, 1, 1]], [3]),  # a run across the end of a sample
        ([[V, 1, V, V, 1, V]], [2, 2]),  # 1 + 2 + 1: counts do not follow the runs
    ],
)
def test_runs_not_one_contiguous_run_per_video(rows, before):
    with pytest.raises(ValueError, match="must be one contiguous run in one sample"):
        placeholder_runs(t(rows), V, before)


# ------------------------------------------------------------------------------ rewrite
def rewrite(ids, mask, labels, before, after, side=None):
    hp = HostPrompt(t(ids), None if mask is None else t(mask), None if labels is None else t(labels))
    return rewrite_placeholders(hp, V, before, after, padding_side=side, pad_token_id=P)


def test_rewrite_single_sample_no_mask():
    out = rewrite([[1, V, V, V, V, 2]], None, None, [4], [2])
    assert out.input_ids.tolist() == [[1, V, V, 2]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1]]
    assert out.labels is None and out.spans == [[(1, 2)]] and out.padding_side == "left"


def test_rewrite_left_padded_batch():
    ids = [[P, P, 1, V, V, V, 2], [3, V, V, V, 4, 5, 6]]
    mask = [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    out = rewrite(ids, mask, None, [3, 3], [1, 2])
    # sample 0: 1 V 2 (3 tokens); sample 1: 3 V V 4 5 6 (6 tokens): left-padded to 6.
    assert out.input_ids.tolist() == [[P, P, P, 1, V, 2], [3, V, V, 4, 5, 6]]
    assert out.attention_mask.tolist() == [[0, 0, 0, 1, 1, 1], [1] * 6]
    assert out.spans == [[(4, 1)], [(1, 2)]] and out.padding_side == "left"


def test_rewrite_right_padded_batch_keeps_the_side_and_labels():
    ids = [[1, V, V, V, 2, P], [3, V, V, V, 4, 5]]
    mask = [[1, 1, 1, 1, 1, 0], [1] * 6]
    labels = [[-100, -100, -100, -100, 2, -100], [-100, -100, -100, -100, 4, 5]]
    out = rewrite(ids, mask, labels, [3, 3], [2, 1])
    assert out.padding_side == "right"
    assert out.input_ids.tolist() == [[1, V, V, 2], [3, V, 4, 5]]
    assert out.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1]]
    assert out.labels.tolist() == [[-100, -100, -100, 2], [-100, -100, 4, 5]]
    assert out.spans == [[(1, 2)], [(1, 1)]]
    # Asked for the other side: the shorter row is padded on the left.
    out = rewrite(ids, mask, labels, [3, 3], [1, 2], side="left")
    assert out.input_ids.tolist() == [[P, P, 1, V, 2], [3, V, V, 4, 5]]
    assert out.attention_mask.tolist() == [[0, 0, 1, 1, 1], [1] * 5]
    assert out.labels.tolist() == [[-100, -100, -100, -100, 2], [-100, -100, -100, 4, 5]]
    assert out.spans == [[(3, 1)], [(1, 2)]] and out.padding_side == "left"


def test_rewrite_pad_id_taken_from_the_inputs():
    # The inputs pad with 7, not the model's pad id: the rewritten rows keep 7.
    ids = [[7, 7, V, V, 1], [2, V, V, 3, 4]]
    mask = [[0, 0, 1, 1, 1], [1] * 5]
    out = rewrite(ids, mask, None, [2, 2], [1, 1])
    assert out.input_ids.tolist() == [[7, 7, V, 1], [2, V, 3, 4]]
    assert out.attention_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]


def test_rewrite_two_videos_and_a_sample_without():
    ids = [[1, V, V, 2, V, V, V], [4, 5, 6, 7, 8, 8, 1]]
    out = rewrite(ids, [[1] * 7, [1] * 7], None, [2, 3], [1, 2])
    assert out.input_ids.tolist() == [[P, P, 1, V, 2, V, V], [4, 5, 6, 7, 8, 8, 1]]
    assert out.spans == [[(3, 1), (5, 2)], []]


def test_rewrite_mixed_padding_is_repadded_on_the_left():
    ids = [[P, 1, V, V, P], [1, V, V, 2, 3]]
    mask = [[0, 1, 1, 1, 0], [1] * 5]
    out = rewrite(ids, mask, None, [2, 2], [1, 1])
    assert out.padding_side == "left"
    assert out.input_ids.tolist() == [[P, P, 1, V], [1, V, 2, 3]]
    assert out.attention_mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert out.spans == [[(3, 1)], [(1, 1)]]
