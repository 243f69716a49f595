"""sharded examples: the parts the examples stage merges

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-21 22:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('example_parts',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=10), nullable=False),
    sa.Column('part', sa.String(length=100), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('meta', sa.JSON(), nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'kind', 'part', 'layer')
    )


def downgrade() -> None:
    op.drop_table('example_parts')
