"""text_runs.n_tokens: how many tokens the user's whole text has, so that a run of a text longer
than the model reads (its first MAX_TEXT_TOKENS or max positions) can say what was left out.
NULL for runs stored before.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22 02:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('text_runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('n_tokens', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('text_runs', schema=None) as batch_op:
        batch_op.drop_column('n_tokens')
