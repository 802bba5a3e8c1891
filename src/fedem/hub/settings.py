"""Hub settings: one frozen object passed to `create_app`, so each test gets its own hub.

The embedded default needs nothing but a folder: `<root>/hub.db` (SQLite) and `<root>/blobs`
(artifacts). `db_url` (e.g. `postgresql+psycopg://…`) and `store_url` (any fsspec URL, e.g.
`s3://bucket/prefix`) select production back ends without code changes.

`max_json_bytes`, `rate_limit_*` and `cors_origins` are the access limits of docs/security.md.

The `eval_*`, `accept_*` and `max_delta_norm_ratio` fields configure the server-side evaluation of
submitted adapters (docs/evaluation.md); `eval_data` is a server-only folder no route ever serves.
"""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

# File types a repo may hold: weights only as safetensors, never pickle (`.bin`, `.pt`, `.pkl`).
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".md", ".tsv", ".yaml", ".jsonl", ".png")


class HubSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    root: Path
    db_url: str | None = None
    store_url: str | None = None
    lease_ttl_s: int = Field(default=3 * 3600, gt=0, description="a lease's lifetime (3 h)")
    sweep_every_s: float = Field(default=300, gt=0, description="how often expired leases are freed")
    max_file_bytes: int = Field(default=4 << 30, gt=0, description="largest single artifact accepted")
    allowed_suffixes: tuple[str, ...] = ALLOWED_SUFFIXES

    # access limits (docs/security.md)
    max_json_bytes: int = Field(
        default=1 << 20, gt=0, description="largest request body other than a blob upload (413 above)"
    )
    rate_limit_per_s: float | None = Field(
        default=20.0, gt=0, description="requests per second per token, per server process (None: off)"
    )
    rate_limit_burst: int = Field(default=200, gt=0, description="requests a token may save up")
    cors_origins: tuple[str, ...] = Field(
        default=(), description="origins browsers may call the API from; none (CORS off) by default"
    )

    # server-side evaluation of submitted adapter versions (docs/evaluation.md)
    eval_data: Path | None = Field(
        default=None, description="server-only held-out data: mono/<lang>.txt and pairs/en-<lang>.tsv"
    )
    eval_worker: bool = Field(default=False, description="run the evaluation worker inside the server")
    eval_poll_s: float = Field(default=5.0, gt=0, description="how often an idle worker looks for jobs")
    accept_delta: float = Field(
        default=0.0, description="minimum improvement of the task metric (chrF points, or mean bpb)"
    )
    accept_epsilon: float = Field(
        default=0.02, ge=0, description="largest relative bpb worsening allowed in any language"
    )
    eval_max_lines: int = Field(default=64, gt=0, description="held-out lines scored per language")
    eval_max_pairs: int = Field(default=32, gt=0, description="held-out pairs translated per language")
    eval_max_new_tokens: int = Field(default=128, gt=0, description="longest translation generated")
    max_delta_norm_ratio: float = Field(
        default=10.0, gt=0, description="largest ‖ΔW‖ allowed, as a multiple of the accepted history's median"
    )

    @model_validator(mode="after")
    def _worker_needs_data(self) -> "HubSettings":
        if self.eval_worker and self.eval_data is None:
            raise ValueError("the evaluation worker needs eval_data (held-out data on the server)")
        return self

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.root / 'hub.db'}"

    @property
    def artifact_url(self) -> str:
        return self.store_url or str(self.root / "blobs")
