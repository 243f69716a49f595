"""Synthetic models for tests: made-up weights decoded exactly as Needle stores them, written
with the real query writers, so pages can be tested without torch or a real model.

    syn = fill_synthetic(engine, "tiny", n_layers=3, d_mlp=24, vocab=VOCAB, plant={(1, 3): " dog"})

Token ids are positions in `vocab`; a token starting with a space gets the piece "Ġ..."
(GPT-2 style). `plant` makes a token the top input-weight token of a neuron.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from app import queries
from app.arrays import FLOAT32, INT32, pack
from app.db import session_scope
from app.tokens import search_key

HOSTILE = "<script>alert(1)</script>"
# Token strings that try to break out of where a page puts them: an element, an attribute (either
# quote), a <textarea>, a template, an entity; bidi and zero-width characters; a very long token.
HOSTILE_TOKENS = [
    HOSTILE,
    '"><img src=x onerror=alert(2)>',
    "' onmouseover='alert(3)",
    "</textarea><script>alert(4)</script>",
    "{{ 7*7 }}{% raw %}",
    "&lt;b&gt;&amp;",
    "<!--",
    "]]><svg onload=alert(5)>",
    "\u202egnp.exe\u200b\u200d\ufeff",
    "<b>" + "A" * 3000 + "</b>",
]
IN_TOKENS, OUT_TOKENS, INDEX_NEURONS, NORMALISER_TOP = 20, 10, 50, 100


@dataclass
class Synthetic:
    name: str
    model_id: int
    vocab: list[str]
    top_token_ids: np.ndarray  # [layer, neuron]
    top_scores: np.ndarray  # [layer, neuron]
    probs: np.ndarray | None = None  # [layer, neuron, vocab]: each neuron's whole decoding

    def token_id(self, token: str) -> int:
        return self.vocab.index(token)


def vocab_rows(vocab: list[str]) -> list[dict]:
    rows = []
    for token_id, token in enumerate(vocab):
        piece = "Ġ" + token[1:] if token.startswith(" ") and len(token) > 1 else token
        rows.append({"token_id": token_id, "token": token, "piece": piece, "key": search_key(token)})
    return rows


def word_level_tokenizer_json(vocab: list[str]) -> str:
    """A tokenizers-library tokenizer that splits on whitespace and knows vocab's plain words."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = {t: i for i, t in enumerate(vocab) if t and not any(c.isspace() for c in t)}
    tokenizer = Tokenizer(WordLevel(vocab=words, unk_token="<unk>" if "<unk>" in words else None))
    tokenizer.pre_tokenizer = Whitespace()
    return tokenizer.to_str()


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def fill_synthetic(
    engine,
    name: str,
    n_layers: int,
    d_mlp: int,
    vocab: list[str],
    *,
    plant: dict[tuple[int, int], str] | None = None,
    tokenizer: bool = False,
    decode_norm: str = "none",
    seed: int = 0,
) -> Synthetic:
    """Register a model and store its vocabulary, neuron decodings and search index."""
    n_vocab = len(vocab)
    assert n_vocab >= IN_TOKENS, "the vocabulary needs at least 20 tokens"
    rng = np.random.default_rng(seed)
    in_logits = rng.normal(size=(n_layers, d_mlp, n_vocab))
    for (layer, neuron), token in (plant or {}).items():
        in_logits[layer, neuron, vocab.index(token)] += 12.0
    probs = _softmax(in_logits)
    mean_top = -np.sort(-probs, axis=-1)[..., :NORMALISER_TOP].mean(axis=-1)
    scores = probs / mean_top[..., None]
    out_logits = rng.normal(scale=2.0, size=(n_layers, d_mlp, n_vocab))

    neuron_rows: dict[int, list[dict]] = {}
    for layer in range(n_layers):
        for neuron in range(d_mlp):
            p, s, out = probs[layer, neuron], scores[layer, neuron], out_logits[layer, neuron]
            best = np.argsort(-p, kind="stable")[:IN_TOKENS]
            pos = np.argsort(-out, kind="stable")[:OUT_TOKENS]
            neg = np.argsort(out, kind="stable")[:OUT_TOKENS]
            neuron_rows.setdefault(layer, []).append(
                {
                    "layer": layer,
                    "neuron": neuron,
                    "top_token_id": int(best[0]),
                    "top_prob": float(p[best[0]]),
                    "top_score": float(s[best[0]]),
                    "mean_top100": float(mean_top[layer, neuron]),
                    "entropy": float(-(p * np.log(p)).sum()),
                    "in_ids": pack(best, INT32),
                    "in_probs": pack(p[best], FLOAT32),
                    "in_scores": pack(s[best], FLOAT32),
                    "out_pos_ids": pack(pos, INT32),
                    "out_pos_logits": pack(out[pos], FLOAT32),
                    "out_neg_ids": pack(neg, INT32),
                    "out_neg_logits": pack(out[neg], FLOAT32),
                }
            )

    flat_scores = scores.reshape(n_layers * d_mlp, n_vocab)
    flat_probs = probs.reshape(n_layers * d_mlp, n_vocab)
    index_rows = []
    for token_id in range(n_vocab):
        order = np.argsort(-flat_scores[:, token_id], kind="stable")[:INDEX_NEURONS]
        index_rows.append(
            {
                "token_id": token_id,
                "layers": pack(order // d_mlp, INT32),
                "neurons": pack(order % d_mlp, INT32),
                "scores": pack(flat_scores[order, token_id], FLOAT32),
                "probs": pack(flat_probs[order, token_id], FLOAT32),
            }
        )

    with session_scope(engine) as session:
        model = queries.save_model(
            session,
            name,
            source=f"synthetic:{name}",
            family="gpt2",
            architecture="GPT2LMHeadModel",
            n_layers=n_layers,
            d_model=16,
            d_mlp=d_mlp,
            vocab_size=n_vocab,
            device="cpu",
            dtype="float32",
            decode_norm=decode_norm,
            tokenizer_json=word_level_tokenizer_json(vocab) if tokenizer else None,
            info={"synthetic": True, "seed": seed},
        )
        queries.replace_vocab(session, model.id, vocab_rows(vocab))
        for layer, rows in neuron_rows.items():
            queries.replace_neurons(session, model.id, [layer], rows)
        queries.replace_token_index(session, model.id, index_rows)
        model_id = model.id

    top = probs.argmax(axis=-1)
    return Synthetic(name, model_id, list(vocab), top, np.take_along_axis(scores, top[..., None], -1)[..., 0], probs)


def add_jobs(engine, name: str, *, finished: bool) -> None:
    """Queue a decode and a search_index job for the model; finish both, or leave decode running."""
    with session_scope(engine) as session:
        model = queries.get_model(session, name)
        queries.enqueue_job(session, model.id, "decode", "layers:all", {})
        queries.enqueue_job(session, model.id, "search_index", "all", {}, requires_stage="decode")
    with session_scope(engine) as session:
        job = queries.claim_job(session, "test-worker", model_id=model.id)
        queries.heartbeat(session, job.id, "test-worker", progress=0.5)
    if finished:
        finish_jobs(engine, name)


def finish_jobs(engine, name: str) -> None:
    """Run every job of the model to done, as a worker would (without computing anything)."""
    with session_scope(engine) as session:
        model = queries.get_model(session, name)
        for job in queries.jobs_for_model(session, model.id):
            if job.state == "running":
                queries.finish_job(session, job.id, job.worker)
    while True:
        with session_scope(engine) as session:
            job = queries.claim_job(session, "test-worker", model_id=model.id)
            if job is None:
                return
            queries.finish_job(session, job.id, "test-worker")
