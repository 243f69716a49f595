"""vocab: an index on the decoded token text, for search's exact-match lookup

Search looks a query up by token text or raw piece (app/queries.py tokens_by_text); with
only the piece indexed, Postgres answered the OR by scanning the whole vocabulary table
(about 6 ms for one 50k-token model, more with every model added). bench/server.py.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 12:00:00
"""
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('vocab', schema=None) as batch_op:
        batch_op.create_index('ix_vocab_token', ['model_id', 'token'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('vocab', schema=None) as batch_op:
        batch_op.drop_index('ix_vocab_token')
