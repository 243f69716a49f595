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


PAD_PROB = 0.0  # what a shard stores as the prob of a padding entry (workers/store.py)


def expected_merge(scores: np.ndarray, probs: np.ndarray, k: int):
    """Written out by hand: per token, every neuron as (score, id, prob), best score first and the
    lower neuron id first on ties (merge_search_parts's documented rule), the first k kept, and
    id -1 padding (score -inf) after them where there are fewer than k neurons."""
    vocab, n = scores.shape
    want_s = np.full((vocab, k), -np.inf)
    want_i = np.full((vocab, k), -1, dtype=np.int64)
    want_p = np.full((vocab, k), PAD_PROB)
    for t in range(vocab):
        cands = sorted(((float(scores[t, j]), j, float(probs[t, j])) for j in range(n)), key=lambda c: (-c[0], c[1]))
        for slot, (sc, j, pr) in enumerate(cands[:k]):
            want_s[t, slot], want_i[t, slot], want_p[t, slot] = sc, j, pr
    return want_s, want_i, want_p


def shard_parts(scores: np.ndarray, probs: np.ndarray, bounds, k: int):
    """Each shard's own top k (lower id first on ties), padded with id -1 (and a score above every
    real one, which the merge must ignore) where the shard has fewer than k neurons."""
    parts = []
    for lo, hi in bounds:
        part_s, part_p = scores[:, lo:hi], probs[:, lo:hi]
        order = np.argsort(-part_s, axis=1, kind="stable")[:, :k]
        s_, i_, p_ = np.take_along_axis(part_s, order, 1), order + lo, np.take_along_axis(part_p, order, 1)
        pad = k - s_.shape[1]
        if pad > 0:
            vocab = scores.shape[0]
            s_ = np.concatenate([s_, np.full((vocab, pad), 5.0, dtype=s_.dtype)], axis=1)
            i_ = np.concatenate([i_, np.full((vocab, pad), -1)], axis=1)
            p_ = np.concatenate([p_, np.full((vocab, pad), PAD_PROB, dtype=p_.dtype)], axis=1)
        parts.append((s_, i_, p_))
    return parts


@pytest.mark.parametrize(
    "n,k,bounds",
    [
        (200, 10, [(0, 200)]),
        (200, 10, [(0, 70), (70, 130), (130, 196), (196, 200)]),  # the last shard is padded
        (7, 10, [(0, 4), (4, 7)]),  # fewer neurons than k: padding in the result too
    ],
)
def test_merging_shards_equals_a_hand_written_merge(n, k, bounds):
    g = np.random.default_rng(n + len(bounds))
    scores = (np.round(g.random((40, n)) * 8) / 8).astype(np.float32)  # [vocab, neurons], many ties
    probs = g.random((40, n)).astype(np.float32)  # unrelated to the scores
    want_s, want_i, want_p = expected_merge(scores, probs, k)
    parts = shard_parts(scores, probs, bounds, k)
    for ordered in (parts, parts[::-1]):  # the shards' order must not matter (ties included)
        check_merge(merge_search_parts(ordered, k=k), want_s, want_i, want_p, n, k)


def check_merge(got, want_s, want_i, want_p, n, k):
    got_s, got_i, got_p = got
    assert got_i.shape == (40, k)
    np.testing.assert_array_equal(got_i, want_i)
    np.testing.assert_array_equal(got_p, want_p.astype(np.float32))
    valid = want_i >= 0
    np.testing.assert_array_equal(got_s[valid], want_s[valid].astype(np.float32))
    assert (valid.sum(axis=1) == min(n, k)).all()
    if not valid.all():  # the padding sorts last, below every real score
        assert (got_s[~valid] < got_s[valid].min()).all()


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
