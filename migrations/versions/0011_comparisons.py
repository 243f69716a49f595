"""comparisons: two models of one shape compared neuron by neuron (same top token, top tokens in
common, cosine of the input weights), written by the compare stage.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 23:20:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('comparisons',
    sa.Column('model_a', sa.Integer(), nullable=False),
    sa.Column('model_b', sa.Integer(), nullable=False),
    sa.Column('info', sa.JSON(), nullable=False),
    sa.Column('same', sa.LargeBinary(), nullable=False),
    sa.Column('overlap', sa.LargeBinary(), nullable=False),
    sa.Column('cosine', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['model_a'], ['models.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['model_b'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_a', 'model_b')
    )


def downgrade() -> None:
    op.drop_table('comparisons')
