"""The one schema (SQLAlchemy 2). Migrations in migrations/ create exactly these tables.

Per-neuron arrays are stored compactly as little-endian binary (see app/arrays.py), one
row per neuron, never one row per token.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Model(Base):
    """A registered language model: where it came from and how it was indexed."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    source: Mapped[str] = mapped_column(Text)
    family: Mapped[str] = mapped_column(String(50))
    architecture: Mapped[str] = mapped_column(String(100))
    n_layers: Mapped[int] = mapped_column(Integer)
    d_model: Mapped[int] = mapped_column(Integer)
    d_mlp: Mapped[int] = mapped_column(Integer)
    vocab_size: Mapped[int] = mapped_column(Integer)
    device: Mapped[str] = mapped_column(String(20))
    dtype: Mapped[str] = mapped_column(String(20))
    decode_norm: Mapped[str] = mapped_column(String(20))
    # The tokenizer as tokenizers-library JSON, so the server can tokenize queries without transformers.
    tokenizer_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    info: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class Vocab(Base):
    """A model's vocabulary: `token` is the decoded text, `piece` the tokenizer's own string,
    `key` the search key (one leading space/Ġ/▁ dropped, case-folded)."""

    __tablename__ = "vocab"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token: Mapped[str] = mapped_column(Text)
    piece: Mapped[str] = mapped_column(Text)
    key: Mapped[str] = mapped_column(Text)

    __table_args__ = (
        Index("ix_vocab_key", "model_id", "key"),
        Index("ix_vocab_piece", "model_id", "piece"),
    )


class Neuron(Base):
    """One MLP neuron's LM-head decodings.

    in_*: the top input-weight tokens (Davies), best first: ids (int32), p (float32) and
    normalised score s = p / mean(top-100 p) (float32). out_pos_* / out_neg_*: the direct
    logit effect W_U . w_out, top promoted and top suppressed tokens with raw logits.
    """

    __tablename__ = "neurons"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    top_token_id: Mapped[int] = mapped_column(Integer)
    top_prob: Mapped[float] = mapped_column(Float)
    top_score: Mapped[float] = mapped_column(Float)
    mean_top100: Mapped[float] = mapped_column(Float)
    in_ids: Mapped[bytes] = mapped_column(LargeBinary)
    in_probs: Mapped[bytes] = mapped_column(LargeBinary)
    in_scores: Mapped[bytes] = mapped_column(LargeBinary)
    out_pos_ids: Mapped[bytes] = mapped_column(LargeBinary)
    out_pos_logits: Mapped[bytes] = mapped_column(LargeBinary)
    out_neg_ids: Mapped[bytes] = mapped_column(LargeBinary)
    out_neg_logits: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (Index("ix_neurons_score", "model_id", "layer", "top_score"),)


class SearchPart(Base):
    """A decode shard's running top-k over neurons for every vocabulary token, [vocab x k]
    arrays; merged into token_index by the search_index stage."""

    __tablename__ = "search_parts"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    part: Mapped[str] = mapped_column(String(50), primary_key=True)
    k: Mapped[int] = mapped_column(Integer)
    layers: Mapped[bytes] = mapped_column(LargeBinary)
    neurons: Mapped[bytes] = mapped_column(LargeBinary)
    scores: Mapped[bytes] = mapped_column(LargeBinary)
    probs: Mapped[bytes] = mapped_column(LargeBinary)


class TokenIndex(Base):
    """For one vocabulary token, the model's top neurons by normalised score, best first."""

    __tablename__ = "token_index"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    layers: Mapped[bytes] = mapped_column(LargeBinary)
    neurons: Mapped[bytes] = mapped_column(LargeBinary)
    scores: Mapped[bytes] = mapped_column(LargeBinary)
    probs: Mapped[bytes] = mapped_column(LargeBinary)


class Job(Base):
    """A unit of compute: a stage over part of a model. Claimed by one worker at a time."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(50))
    key: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    # A job waits while any job of the same model in this stage is not done.
    requires_stage: Mapped[str | None] = mapped_column(String(50), nullable=True)
    state: Mapped[str] = mapped_column(String(20), default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    run_after: Mapped[datetime] = mapped_column(DateTime)
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)

    __table_args__ = (
        UniqueConstraint("model_id", "stage", "key", name="uq_jobs_model_stage_key"),
        Index("ix_jobs_claim", "state", "run_after"),
    )
