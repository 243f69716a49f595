"""sparse probes

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21 18:51:54.649658
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('feature_layers',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('feature', sa.String(length=100), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('best_neuron', sa.Integer(), nullable=False),
    sa.Column('best_f1', sa.Float(), nullable=False),
    sa.Column('best_precision', sa.Float(), nullable=False),
    sa.Column('best_recall', sa.Float(), nullable=False),
    sa.Column('top_neurons', sa.JSON(), nullable=False),
    sa.Column('curve', sa.JSON(), nullable=False),
    sa.Column('pruned_curve', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'feature', 'layer')
    )
    op.create_table('features',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('kind', sa.String(length=20), nullable=False),
    sa.Column('aggregation', sa.String(length=20), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('counts', sa.JSON(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('best_layer', sa.Integer(), nullable=True),
    sa.Column('best_neuron', sa.Integer(), nullable=True),
    sa.Column('best_f1', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'name')
    )
    op.create_table('neuron_features',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('feature', sa.String(length=100), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('mean_dif', sa.Float(), nullable=False),
    sa.Column('f1', sa.Float(), nullable=False),
    sa.Column('precision', sa.Float(), nullable=False),
    sa.Column('recall', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'layer', 'neuron', 'feature')
    )
    op.create_table('probe_runs',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('specs', sa.JSON(), nullable=False),
    sa.Column('description', sa.Text(), nullable=False),
    sa.Column('settings', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id')
    )


def downgrade() -> None:
    op.drop_table('probe_runs')
    op.drop_table('neuron_features')
    op.drop_table('features')
    op.drop_table('feature_layers')
