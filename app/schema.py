"""The one schema (SQLAlchemy 2). Migrations in migrations/ create exactly these tables.

A unit is (basis, layer, index): basis 0 is the model's MLP neurons, any other basis is one of
its sparse autoencoders (`saes.id`), whose units (latents) live at the SAE's layer. Every
per-unit table is keyed by basis first; its `neuron` column is the unit's index in its basis.
Per-unit arrays are stored compactly as little-endian binary (see app/arrays.py and
app/unitarrays.py), one row per unit, never one row per token.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
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

# models.device of a model spread over its machine's GPUs, CPU memory and disk by accelerate (--device-map auto)
DEVICE_MAP_AUTO = "map:auto"

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
    # the device it was loaded on, or DEVICE_MAP_AUTO (--device-map auto; its --max-memory caps in info["max_memory"])
    device: Mapped[str] = mapped_column(String(20))
    dtype: Mapped[str] = mapped_column(String(20))
    decode_norm: Mapped[str] = mapped_column(String(20))
    # The tokenizer as tokenizers-library JSON, so the server can tokenize queries without transformers.
    tokenizer_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    info: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)


class Sae(Base):
    """A sparse autoencoder on one site of one layer of a model: trained by Needle (source
    "trained") or imported from a SAELens folder (source: its path). `weights` holds the
    sae_weights.safetensors bytes and `cfg` the cfg.json of SAELens's format, so every worker
    finds it in the database; NULL weights: training not finished. `training` holds how it was
    trained and its figures, `quality` its figures on held-out text (L0, variance explained,
    CE loss recovered, dead and dense shares, density histogram)."""

    __tablename__ = "saes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    site: Mapped[str] = mapped_column(String(20))  # mlp | mlp_out | resid_pre | resid_post
    layer: Mapped[int] = mapped_column(Integer)
    architecture: Mapped[str] = mapped_column(String(20))
    d_in: Mapped[int] = mapped_column(Integer)
    d_sae: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(Text)
    cfg: Mapped[dict] = mapped_column(JSON)
    weights: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    training: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    quality: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    updated_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (UniqueConstraint("model_id", "name", name="uq_saes_model_name"),)


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
        Index("ix_vocab_token", "model_id", "token"),  # search's exact match on the text (migration 0006)
    )


class Neuron(Base):
    """One MLP neuron's LM-head decodings.

    in_*: the top input-weight tokens (Davies), best first: ids (int32), p (float32) and
    normalised score s = p / mean(top-100 p) (float32). out_pos_* / out_neg_*: the direct
    logit effect W_U . w_out, top promoted and top suppressed tokens with raw logits. entropy:
    of the whole input-side distribution p, in nats.
    """

    __tablename__ = "neurons"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    basis: Mapped[int] = mapped_column(Integer, primary_key=True, default=0, server_default="0")  # 0: MLP neurons; else saes.id
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    top_token_id: Mapped[int] = mapped_column(Integer)
    top_prob: Mapped[float] = mapped_column(Float)
    top_score: Mapped[float] = mapped_column(Float)
    mean_top100: Mapped[float] = mapped_column(Float)
    # the input-side decoding's entropy in nats (NULL: decoded before it was stored)
    entropy: Mapped[float | None] = mapped_column(Float, nullable=True)
    in_ids: Mapped[bytes] = mapped_column(LargeBinary)
    in_probs: Mapped[bytes] = mapped_column(LargeBinary)
    in_scores: Mapped[bytes] = mapped_column(LargeBinary)
    out_pos_ids: Mapped[bytes] = mapped_column(LargeBinary)
    out_pos_logits: Mapped[bytes] = mapped_column(LargeBinary)
    out_neg_ids: Mapped[bytes] = mapped_column(LargeBinary)
    out_neg_logits: Mapped[bytes] = mapped_column(LargeBinary)

    __table_args__ = (Index("ix_neurons_score", "model_id", "basis", "layer", "top_score"),)


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


class ExamplePart(Base):
    """A sharded examples run's intermediate state, merged by the examples stage and then
    deleted: kind "range" holds one layer range's estimated activation range (the estimate
    pass), kind "shard" one (layer range x corpus shard)'s accumulators. One row per layer;
    `data` is an .npz of named arrays (no pickles), `meta` the part's own figures."""

    __tablename__ = "example_parts"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    kind: Mapped[str] = mapped_column(String(10), primary_key=True)
    part: Mapped[str] = mapped_column(String(100), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    meta: Mapped[dict] = mapped_column(JSON, default=dict)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class UnitLinks(Base):
    """The units of basis `other` that weigh most on this unit, by |weight|, signed: for a latent of
    an mlp-site SAE (other 0) the neurons its decoder direction weighs most on; for a neuron (basis
    0, other an SAE's id) the latents of that SAE whose decoder directions weigh most on it.
    ids (int32) and weights (float32), [k] each, largest |weight| first."""

    __tablename__ = "unit_links"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    basis: Mapped[int] = mapped_column(Integer, primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    other: Mapped[int] = mapped_column(Integer, primary_key=True)
    ids: Mapped[bytes] = mapped_column(LargeBinary)
    weights: Mapped[bytes] = mapped_column(LargeBinary)


class TokenIndex(Base):
    """For one vocabulary token, the model's top neurons by normalised score, best first."""

    __tablename__ = "token_index"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    basis: Mapped[int] = mapped_column(Integer, primary_key=True, default=0, server_default="0")  # 0: MLP neurons; else saes.id
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    layers: Mapped[bytes] = mapped_column(LargeBinary)
    neurons: Mapped[bytes] = mapped_column(LargeBinary)
    scores: Mapped[bytes] = mapped_column(LargeBinary)
    probs: Mapped[bytes] = mapped_column(LargeBinary)


class FiringIndex(Base):
    """For one vocabulary token, the units of a basis whose top contexts peak on it (their max
    token is it): how many of their top windows, and their highest activation there; most
    windows first, then by activation (workers/store.firing_rows, written with the examples)."""

    __tablename__ = "firing_index"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    basis: Mapped[int] = mapped_column(Integer, primary_key=True)  # 0: MLP neurons; else saes.id
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    layers: Mapped[bytes] = mapped_column(LargeBinary)  # int32
    units: Mapped[bytes] = mapped_column(LargeBinary)  # int32
    counts: Mapped[bytes] = mapped_column(LargeBinary)  # int32
    acts: Mapped[bytes] = mapped_column(LargeBinary)  # float32


class Comparison(Base):
    """Two models of one shape compared neuron by neuron (Davies 2025, section 3.3), computed by a
    worker (workers/compare.py) from the weights and the stored decodings. Arrays [n_layers x d_mlp],
    flat, layer-major: `same` (uint8) 1 where the top input-weight token is the same, `overlap`
    (uint8) how many of the top tokens the two decodings share, `cosine` (float32) the cosine of
    the neuron's input weights in the two models. `info`: top (tokens compared), the two models'
    updated_at when computed, and the per-layer figures."""

    __tablename__ = "comparisons"

    model_a: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    model_b: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    info: Mapped[dict] = mapped_column(JSON, default=dict)
    same: Mapped[bytes] = mapped_column(LargeBinary)
    overlap: Mapped[bytes] = mapped_column(LargeBinary)
    cosine: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Job(Base):
    """A unit of compute: a stage over part of a model. Claimed by one worker at a time."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(50))
    key: Mapped[str] = mapped_column(String(100))
    params: Mapped[dict] = mapped_column(JSON, default=dict)
    # A job waits while any job of the same model in this stage (or these, comma-separated) is not done.
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


class ExampleRun(Base):
    """How a model's activation examples were computed: the corpus and the method's settings."""

    __tablename__ = "example_runs"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    corpus: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text)
    context: Mapped[int] = mapped_column(Integer)
    n_windows: Mapped[int] = mapped_column(Integer)
    n_tokens: Mapped[int] = mapped_column(BigInteger)
    n_documents: Mapped[int] = mapped_column(Integer)
    bos_prefix: Mapped[bool] = mapped_column(Boolean)
    # top_k, bins, per_bin, hist_bins, estimate_windows, seconds, tokens_per_second
    settings: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class ExampleWindow(Base):
    """A corpus window that some neuron's examples show: its token ids (int32) and where it came from."""

    __tablename__ = "example_windows"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    window: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[bytes] = mapped_column(LargeBinary)


class NeuronActivations(Base):
    """One neuron's activations on the corpus: statistics, top contexts and interval samples.

    top_*: the top-k windows by their max, best first: window ids (int32, into
    example_windows), max (float32), index of the max token (int16) and per-token
    activations (float16, [k x context]). int_*: per interval bin, the sampled windows,
    [bins x per_bin] (-1 for none), with acts [bins x per_bin x context]; int_edges
    (float32, bins + 1) and int_counts (int64, firing tokens per bin). hist_*: edges
    (float32) and counts (int64) of the histogram of every token's activation. neg_*: a gated
    MLP's neuron's top negative contexts, as top_* by each window's min (NULL otherwise).
    """

    __tablename__ = "neuron_activations"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    basis: Mapped[int] = mapped_column(Integer, primary_key=True, default=0, server_default="0")  # 0: MLP neurons; else saes.id
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    tokens: Mapped[int] = mapped_column(BigInteger)
    frequency: Mapped[float] = mapped_column(Float)
    frequency_above: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float | None] = mapped_column(Float, nullable=True)
    # its largest |activation| is under SILENT_SHARE of its layer's median (app/examples.py FIRING); NULL: not computed
    silent: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    mean: Mapped[float] = mapped_column(Float)
    std: Mapped[float] = mapped_column(Float)
    min_act: Mapped[float] = mapped_column(Float)
    max_act: Mapped[float] = mapped_column(Float)
    top_windows: Mapped[bytes] = mapped_column(LargeBinary)
    top_max: Mapped[bytes] = mapped_column(LargeBinary)
    top_pos: Mapped[bytes] = mapped_column(LargeBinary)
    top_acts: Mapped[bytes] = mapped_column(LargeBinary)
    int_windows: Mapped[bytes] = mapped_column(LargeBinary)
    int_max: Mapped[bytes] = mapped_column(LargeBinary)
    int_pos: Mapped[bytes] = mapped_column(LargeBinary)
    int_acts: Mapped[bytes] = mapped_column(LargeBinary)
    int_edges: Mapped[bytes] = mapped_column(LargeBinary)
    int_counts: Mapped[bytes] = mapped_column(LargeBinary)
    hist_edges: Mapped[bytes] = mapped_column(LargeBinary)
    hist_counts: Mapped[bytes] = mapped_column(LargeBinary)
    # the top negative contexts of a gated MLP's neuron (app/unitarrays.NEGATIVES); NULL where not read
    neg_windows: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    neg_min: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    neg_pos: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    neg_acts: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)

    __table_args__ = (
        Index("ix_activations_frequency", "model_id", "basis", "layer", "frequency"),
        Index("ix_activations_max", "model_id", "basis", "layer", "max_act"),
    )


class TextRun(Base):
    """A user's own text, run through the model by a worker (job stage "text"): the token ids
    and one layer's activations on them for one neuron."""

    __tablename__ = "text_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    basis: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # 0: MLP neurons; else saes.id
    layer: Mapped[int] = mapped_column(Integer)
    neuron: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    activations: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime)
    # the whole text's token count: above len(token_ids) when the text was longer than the model reads
    n_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)


class TextScan(Base):
    """A user's own text run through the model for every unit at once (job stage "scan"): what
    fires on it. result (JSON, written by workers/scan.py, read by app/scans.py): "units", the
    units that appear, as [basis, layer, index]; "tokens", per token its top units as [unit,
    activation, relative]; "top", the text's top units as [unit, activation, relative, token]."""

    __tablename__ = "text_scans"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    text: Mapped[str] = mapped_column(Text)
    token_ids: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    n_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)  # the whole text's, as for text_runs
    created_at: Mapped[datetime] = mapped_column(DateTime)


class ProbeRun(Base):
    """How a model's features were probed: the feature specs, the data and the method's settings."""

    __tablename__ = "probe_runs"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    specs: Mapped[list] = mapped_column(JSON)
    description: Mapped[str] = mapped_column(Text)
    settings: Mapped[dict] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Feature(Base):
    """A labelled feature probed in a model (Gurnee et al. 2023). status "probed", or "skipped"
    with the reason (e.g. fewer than 20 positives in train)."""

    __tablename__ = "features"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    kind: Mapped[str] = mapped_column(String(20))
    aggregation: Mapped[str] = mapped_column(String(20))
    source: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text)
    counts: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(20))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    best_layer: Mapped[int | None] = mapped_column(Integer, nullable=True)
    best_neuron: Mapped[int | None] = mapped_column(Integer, nullable=True)
    best_f1: Mapped[float | None] = mapped_column(Float, nullable=True)


class FeatureLayer(Base):
    """One feature's probes in one layer: the best single neuron, the top neurons by mean
    difference with their single-neuron probes, and the F1-vs-k curves (JSON lists)."""

    __tablename__ = "feature_layers"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    basis: Mapped[int] = mapped_column(Integer, primary_key=True, default=0, server_default="0")  # 0: MLP neurons; else saes.id
    feature: Mapped[str] = mapped_column(String(100), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    best_neuron: Mapped[int] = mapped_column(Integer)
    best_f1: Mapped[float] = mapped_column(Float)
    best_precision: Mapped[float] = mapped_column(Float)
    best_recall: Mapped[float] = mapped_column(Float)
    top_neurons: Mapped[list] = mapped_column(JSON)
    curve: Mapped[list] = mapped_column(JSON)
    pruned_curve: Mapped[list] = mapped_column(JSON)


class NeuronFeature(Base):
    """A neuron among a feature's top neurons (by mean difference) in its layer, with its
    single-neuron probe: what the neuron page lists."""

    __tablename__ = "neuron_features"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), primary_key=True)
    basis: Mapped[int] = mapped_column(Integer, primary_key=True, default=0, server_default="0")  # 0: MLP neurons; else saes.id
    layer: Mapped[int] = mapped_column(Integer, primary_key=True)
    neuron: Mapped[int] = mapped_column(Integer, primary_key=True)
    feature: Mapped[str] = mapped_column(String(100), primary_key=True)
    rank: Mapped[int] = mapped_column(Integer)
    mean_dif: Mapped[float] = mapped_column(Float)
    f1: Mapped[float] = mapped_column(Float)
    precision: Mapped[float] = mapped_column(Float)
    recall: Mapped[float] = mapped_column(Float)


class ClampCurve(Base):
    """p(target | prompt) with one neuron clamped to a sweep of values (Davies 2025): from the
    CLI ("cli"), precomputed by `needle index` ("index"), or asked for on the neuron page
    ("page", filled in by a worker: probs is NULL until then)."""

    __tablename__ = "clamp_curves"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    basis: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # 0: MLP neurons; else saes.id
    layer: Mapped[int] = mapped_column(Integer)
    neuron: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    target: Mapped[str] = mapped_column(Text)  # what was asked for: the token's text
    token_id: Mapped[int | None] = mapped_column(Integer, nullable=True)  # resolved by the worker
    token: Mapped[str | None] = mapped_column(Text, nullable=True)  # the token used (its text)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)  # e.g. "several tokens: the first used"
    positions: Mapped[str] = mapped_column(String(10))  # "all" | "last"
    clamp_values: Mapped[list] = mapped_column(JSON)
    # none_as_null: None is SQL NULL, not JSON null, so "probs IS NOT NULL" finds the finished curves
    probs: Mapped[list | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    baseline: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)  # {activation, prob}
    top_tokens: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)  # {low: [...], high: [...]}
    source: Mapped[str] = mapped_column(String(10))
    created_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (Index("ix_clamp_curves_neuron", "model_id", "basis", "layer", "neuron"),)


class Generation(Base):
    """A prompt continued with one neuron clamped at a value, beside the unclamped continuation."""

    __tablename__ = "generations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    basis: Mapped[int] = mapped_column(Integer, default=0, server_default="0")  # 0: MLP neurons; else saes.id
    layer: Mapped[int] = mapped_column(Integer)
    neuron: Mapped[int] = mapped_column(Integer)
    prompt: Mapped[str] = mapped_column(Text)
    value: Mapped[float] = mapped_column(Float)
    tokens: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int | None] = mapped_column(Integer, nullable=True)  # None: greedy
    clamped: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)  # {text, token_ids}
    unclamped: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    source: Mapped[str] = mapped_column(String(10))
    created_at: Mapped[datetime] = mapped_column(DateTime)

    __table_args__ = (Index("ix_generations_neuron", "model_id", "basis", "layer", "neuron"),)
