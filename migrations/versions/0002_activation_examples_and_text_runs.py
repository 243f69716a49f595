"""activation examples and text runs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 18:04:02.381816
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('example_runs',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('corpus', sa.Text(), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('context', sa.Integer(), nullable=False),
    sa.Column('n_windows', sa.Integer(), nullable=False),
    sa.Column('n_tokens', sa.BigInteger(), nullable=False),
    sa.Column('n_documents', sa.Integer(), nullable=False),
    sa.Column('bos_prefix', sa.Boolean(), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id')
    )
    op.create_table('example_windows',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('window', sa.Integer(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('token_ids', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'window')
    )
    op.create_table('neuron_activations',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('tokens', sa.BigInteger(), nullable=False),
    sa.Column('frequency', sa.Float(), nullable=False),
    sa.Column('frequency_above', sa.Float(), nullable=False),
    sa.Column('threshold', sa.Float(), nullable=True),
    sa.Column('mean', sa.Float(), nullable=False),
    sa.Column('std', sa.Float(), nullable=False),
    sa.Column('min_act', sa.Float(), nullable=False),
    sa.Column('max_act', sa.Float(), nullable=False),
    sa.Column('top_windows', sa.LargeBinary(), nullable=False),
    sa.Column('top_max', sa.LargeBinary(), nullable=False),
    sa.Column('top_pos', sa.LargeBinary(), nullable=False),
    sa.Column('top_acts', sa.LargeBinary(), nullable=False),
    sa.Column('int_windows', sa.LargeBinary(), nullable=False),
    sa.Column('int_max', sa.LargeBinary(), nullable=False),
    sa.Column('int_pos', sa.LargeBinary(), nullable=False),
    sa.Column('int_acts', sa.LargeBinary(), nullable=False),
    sa.Column('int_edges', sa.LargeBinary(), nullable=False),
    sa.Column('int_counts', sa.LargeBinary(), nullable=False),
    sa.Column('hist_edges', sa.LargeBinary(), nullable=False),
    sa.Column('hist_counts', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'layer', 'neuron')
    )
    with op.batch_alter_table('neuron_activations', schema=None) as batch_op:
        batch_op.create_index('ix_activations_frequency', ['model_id', 'layer', 'frequency'], unique=False)
        batch_op.create_index('ix_activations_max', ['model_id', 'layer', 'max_act'], unique=False)

    op.create_table('text_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('text', sa.Text(), nullable=False),
    sa.Column('token_ids', sa.LargeBinary(), nullable=True),
    sa.Column('activations', sa.LargeBinary(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )


def downgrade() -> None:
    op.drop_table('text_runs')
    with op.batch_alter_table('neuron_activations', schema=None) as batch_op:
        batch_op.drop_index('ix_activations_max')
        batch_op.drop_index('ix_activations_frequency')

    op.drop_table('neuron_activations')
    op.drop_table('example_windows')
    op.drop_table('example_runs')
