"""text_scans: a user's own text run for every unit of a model at once ("what fires on this
text"): its tokens and, per token and over the text, the units that fire most relative to
their max on the examples corpus.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 21:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('text_scans',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('token_ids', sa.LargeBinary(), nullable=True),
    sa.Column('result', sa.JSON(), nullable=True),
    sa.Column('n_tokens', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('text_scans')
