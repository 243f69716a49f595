"""Settings: one typed object, read from NEEDLE_* environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from platformdirs import user_data_dir
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent


def default_database_url() -> str:
    return f"sqlite:///{Path(user_data_dir('needle')) / 'needle.sqlite'}"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NEEDLE_", extra="ignore")

    database_url: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    # Neurons per page on a layer page.
    page_size: int = 100
    # Workers send a heartbeat this often; a running job with no heartbeat for
    # stale_seconds goes back to the queue.
    heartbeat_seconds: float = 5.0
    stale_seconds: float = 60.0
    max_attempts: int = 3
    # A failed job waits this long before its second attempt, twice as long before its third, ...
    retry_backoff_seconds: float = 5.0
    # Neurons decoded per batch: [batch x vocabulary] floats are held at a time.
    decode_batch_size: int = 512
    # Corpus tokens per forward batch of the examples stage (windows per batch = this / context).
    examples_batch_tokens: int = 8192
    demo_name: str = "stdlib-demo"
    # The demo's corpus: the Python standard library, capped at this many tokens.
    demo_corpus: str = "stdlib-sample"
    demo_tokens: int = 262_144
    # Tokens per built-in feature dataset the demo probes (text and python features).
    demo_probe_tokens: int = 16_384
    # A user's own text on a neuron page: at most this many characters.
    text_max_chars: int = 2000
    # Live requests from pages (your text, clamp curves, clamped generation) queue worker jobs;
    # NEEDLE_LIVE_REQUESTS=false switches them off (a public, read-only deployment).
    live_requests: bool = True
    # ... and are rate-limited per client (by IP address): a token bucket of live_rate_burst requests,
    # refilled at live_rate_per_minute; beyond it a 429 with Retry-After. 0 a minute: no limit.
    live_rate_per_minute: float = Field(default=10.0, ge=0)
    live_rate_burst: int = Field(default=5, ge=1)
    # ... and capped for the whole site: with this many live jobs queued or running (counted in the
    # database, so across server processes and servers), a new one is a 503 with Retry-After
    # (about this many: two servers that check at the same moment can each add one). 0: no cap.
    live_queue_max: int = Field(default=100, ge=0)
    # Behind one reverse proxy that sets X-Forwarded-For: the client is the address it added (the
    # header's last entry). Leave it off otherwise, or anyone could pick the address they are counted as.
    trust_proxy: bool = False
    # A clamp prompt from a page: at most this many characters (the CLI has no such limit).
    clamp_prompt_max_chars: int = 2000
    # Rows (clamp values x neurons) per forward batch of a clamp sweep.
    clamp_batch_rows: int = 512
    # The site's public address (e.g. https://needle.example.org) for absolute permalinks (the copy
    # button, Open Graph tags); empty: the address the request came to.
    public_url: str = ""
    # Pages and JSON of at least 1 KiB go out gzip-compressed to clients that accept it (browsers
    # do): a neuron page is about 290 KB, 65 KB compressed at level 1, which costs about 1 ms of
    # CPU on a fast core (levels above 1 cost much more for little). 0: never (behind a proxy that
    # compresses).
    gzip_level: int = Field(default=1, ge=0, le=9)
    # Connections to `needle serve` (uvicorn, its h11 protocol; needle/serving.py). An idle
    # keep-alive connection is closed after keep_alive_seconds (uvicorn's timeout_keep_alive,
    # its default kept: a page's polling panels ask every second, on one connection). A request
    # head (request line and headers) must arrive whole within header_timeout_seconds of the
    # connection opening or of its first byte, else the connection is closed: uvicorn sets no
    # such limit, so a client that opens connections and sends nothing, or a byte at a time,
    # would hold them open for ever. A request head over max_header_bytes is a 400 (uvicorn's
    # h11_max_incomplete_event_size; h11's 16 KiB, stated here: Needle sets no cookies and its
    # longest URLs, searches for long tokens, stay far below it; h11 checks the head it holds
    # before the head ends). A request on a connection beyond max_connections open ones (per
    # server process) is a 503 (uvicorn's limit_concurrency; kept below the common open-file
    # limit of 1024; 0: no limit).
    keep_alive_seconds: int = Field(default=5, ge=1)
    header_timeout_seconds: int = Field(default=10, ge=1)
    max_header_bytes: int = Field(default=16 * 1024, ge=1024)
    max_connections: int = Field(default=512, ge=0)

    def resolved_database_url(self) -> str:
        url = self.database_url or default_database_url()
        if url.startswith("postgresql://") or url.startswith("postgres://"):
            url = "postgresql+psycopg://" + url.split("://", 1)[1]
        return url


@lru_cache
def get_settings() -> Settings:
    return Settings()
