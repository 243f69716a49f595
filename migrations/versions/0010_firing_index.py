"""firing_index: per vocabulary token, the units whose top contexts peak on it (search by what
fires, beside what the weights say), written with the examples. Empty until a model's examples
are written again.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 21:10:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('firing_index',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('basis', sa.Integer(), nullable=False),
    sa.Column('token_id', sa.Integer(), nullable=False),
    sa.Column('layers', sa.LargeBinary(), nullable=False),
    sa.Column('units', sa.LargeBinary(), nullable=False),
    sa.Column('counts', sa.LargeBinary(), nullable=False),
    sa.Column('acts', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'basis', 'token_id')
    )


def downgrade() -> None:
    op.drop_table('firing_index')
