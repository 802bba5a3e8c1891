"""`fedem simulate`: a whole federation on one machine — an embedded hub, one process per donor,
non-IID shards, the same `fedem.policy` objects the hub drives — and a report against the base,
each donor alone and centralised training on the union of the donors' data (docs/simulate.md)."""
