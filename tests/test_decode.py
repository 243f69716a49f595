"""The decode stage's own pieces, against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workers.decode import RunningTopK, merge_search_parts, rowwise_topk


@pytest.mark.parametrize("dense_rows", [0, 128])
@pytest.mark.parametrize("batch", [7, 64, 300])
def test_running_top_k_equals_top_k_over_all_rows(batch, dense_rows):
    g = torch.Generator().manual_seed(batch)
    rows, cols, k = 900, 257, 50
    scores = torch.softmax(torch.randn(rows, cols, generator=g) * 3, dim=-1)
    running = RunningTopK(k, cols, torch.device("cpu"))
    running.DENSE_ROWS = dense_rows  # then thresholds (from the k-th row on at the least)
    for start in range(0, rows, batch):
        block = scores[start : start + batch]
        running.update(block, torch.arange(start, start + block.shape[0]))
    got_scores, got_ids = running.result()
    want = scores.topk(k, dim=0)
    torch.testing.assert_close(got_scores, want.values.T)
    assert torch.equal(got_ids.long(), want.indices.T)


def test_running_top_k_with_fewer_rows_than_k_pads_with_minus_one():
    running = RunningTopK(5, 3, torch.device("cpu"))
    running.update(torch.tensor([[0.1, 0.5, 0.2], [0.3, 0.1, 0.9]]), torch.tensor([10, 11]))
    scores, ids = running.result()
    assert ids[0].tolist() == [11, 10, -1, -1, -1]
    assert scores[2, 0].item() == pytest.approx(0.9)


def test_merging_shards_equals_one_shard():
    g = np.random.default_rng(0)
    scores = g.random((40, 200)).astype(np.float32)  # [vocab, neurons]
    ids = np.arange(200)
    whole = merge_search_parts([(scores, np.broadcast_to(ids, scores.shape), scores * 2)], k=10)
    shards = []
    for lo, hi in ((0, 70), (70, 130), (130, 200)):
        part = scores[:, lo:hi]
        order = np.argsort(-part, axis=1)[:, :10]
        shards.append((np.take_along_axis(part, order, 1), order + lo, np.take_along_axis(part, order, 1) * 2))
    merged = merge_search_parts(shards, k=10)
    for a, b in zip(whole, merged):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("n,k", [(50257, 100), (50257, 10), (1000, 10), (300, 100), (64 * 50, 20)])
def test_rowwise_topk_equals_torch_topk(n, k, largest):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(6, n, generator=g)
    x[0, :200] = 9.0  # many good entries packed into a few chunks
    want = x.topk(k, dim=-1, largest=largest)
    values, ids = rowwise_topk(x, k, largest=largest)
    torch.testing.assert_close(values, want.values)
    torch.testing.assert_close(x.gather(1, ids), want.values)
