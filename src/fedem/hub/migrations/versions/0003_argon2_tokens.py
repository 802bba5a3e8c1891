"""argon2 tokens: users get an indexed public `token_id`; `token_hash` becomes an argon2id hash

Revision ID: 0003
Revises: 0002

Tokens issued before this migration (`fedem_<secret>`, whose sha256 the database kept) stay valid and
need not be re-issued: each row's sha256 becomes the "secret" of its token, so the row gets
token_id = sha256[:16] and token_hash = argon2(sha256), which is what `fedem.hub.auth.split_token`
derives from an old token. After this, no fast hash of any token remains in the database.

On SQLite the column changes stop at adding `token_id` and its unique index: recreating `users` (the
only way SQLite alters a column) is impossible while other tables reference it with foreign keys
enforced, and SQLite neither enforces VARCHAR lengths nor needs them. `token_id` stays nullable there;
every row has one after the backfill and `create_user` always sets it.
"""

import sqlalchemy as sa
from alembic import op

from fedem.hub.auth import HASHER

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    connection = op.get_bind()
    sqlite = connection.dialect.name == "sqlite"
    op.add_column("users", sa.Column("token_id", sa.String(length=32), nullable=True))
    if not sqlite:  # widened before the backfill: an argon2 hash is ~97 characters
        op.alter_column(
            "users", "token_hash", existing_type=sa.String(length=64), type_=sa.String(length=128)
        )
    users = sa.table("users", sa.column("id"), sa.column("token_id"), sa.column("token_hash"))
    for user_id, sha256_hex in connection.execute(sa.select(users.c.id, users.c.token_hash)).all():
        connection.execute(
            users.update()
            .where(users.c.id == user_id)
            .values(token_id=sha256_hex[:16], token_hash=HASHER.hash(sha256_hex))
        )
    op.create_index("ix_users_token_id", "users", ["token_id"], unique=True)
    if not sqlite:
        op.alter_column("users", "token_id", existing_type=sa.String(length=32), nullable=False)


def downgrade() -> None:
    raise RuntimeError("argon2 hashes cannot be turned back into sha256: restore a backup instead")
