"""Hub settings: one frozen object passed to `create_app`, so each test gets its own hub.

The embedded default needs nothing but a folder: `<root>/hub.db` (SQLite) and `<root>/blobs`
(artifacts). `db_url` (e.g. `postgresql+psycopg://…`) and `store_url` (any fsspec URL, e.g.
`s3://bucket/prefix`) select production back ends without code changes.
"""

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

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

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.root / 'hub.db'}"

    @property
    def artifact_url(self) -> str:
        return self.store_url or str(self.root / "blobs")
