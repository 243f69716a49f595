"""clamp curves and clamped generations

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-21 21:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('clamp_curves',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('target', sa.Text(), nullable=False),
    sa.Column('token_id', sa.Integer(), nullable=True),
    sa.Column('token', sa.Text(), nullable=True),
    sa.Column('note', sa.Text(), nullable=True),
    sa.Column('positions', sa.String(length=10), nullable=False),
    sa.Column('clamp_values', sa.JSON(), nullable=False),
    sa.Column('probs', sa.JSON(), nullable=True),
    sa.Column('baseline', sa.JSON(), nullable=True),
    sa.Column('top_tokens', sa.JSON(), nullable=True),
    sa.Column('source', sa.String(length=10), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_clamp_curves_neuron', 'clamp_curves', ['model_id', 'layer', 'neuron'], unique=False)
    op.create_table('generations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('prompt', sa.Text(), nullable=False),
    sa.Column('value', sa.Float(), nullable=False),
    sa.Column('tokens', sa.Integer(), nullable=False),
    sa.Column('seed', sa.Integer(), nullable=True),
    sa.Column('clamped', sa.JSON(), nullable=True),
    sa.Column('unclamped', sa.JSON(), nullable=True),
    sa.Column('source', sa.String(length=10), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_generations_neuron', 'generations', ['model_id', 'layer', 'neuron'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_generations_neuron', table_name='generations')
    op.drop_table('generations')
    op.drop_index('ix_clamp_curves_neuron', table_name='clamp_curves')
    op.drop_table('clamp_curves')
