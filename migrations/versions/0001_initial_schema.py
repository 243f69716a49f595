"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-21 16:11:03.657716
"""
import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('family', sa.String(length=50), nullable=False),
    sa.Column('architecture', sa.String(length=100), nullable=False),
    sa.Column('n_layers', sa.Integer(), nullable=False),
    sa.Column('d_model', sa.Integer(), nullable=False),
    sa.Column('d_mlp', sa.Integer(), nullable=False),
    sa.Column('vocab_size', sa.Integer(), nullable=False),
    sa.Column('device', sa.String(length=20), nullable=False),
    sa.Column('dtype', sa.String(length=20), nullable=False),
    sa.Column('decode_norm', sa.String(length=20), nullable=False),
    sa.Column('tokenizer_json', sa.Text(), nullable=True),
    sa.Column('info', sa.JSON(), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('stage', sa.String(length=50), nullable=False),
    sa.Column('key', sa.String(length=100), nullable=False),
    sa.Column('params', sa.JSON(), nullable=False),
    sa.Column('requires_stage', sa.String(length=50), nullable=True),
    sa.Column('state', sa.String(length=20), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('progress', sa.Float(), nullable=False),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('run_after', sa.DateTime(), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('model_id', 'stage', 'key', name='uq_jobs_model_stage_key')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_claim', ['state', 'run_after'], unique=False)

    op.create_table('neurons',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('top_token_id', sa.Integer(), nullable=False),
    sa.Column('top_prob', sa.Float(), nullable=False),
    sa.Column('top_score', sa.Float(), nullable=False),
    sa.Column('mean_top100', sa.Float(), nullable=False),
    sa.Column('in_ids', sa.LargeBinary(), nullable=False),
    sa.Column('in_probs', sa.LargeBinary(), nullable=False),
    sa.Column('in_scores', sa.LargeBinary(), nullable=False),
    sa.Column('out_pos_ids', sa.LargeBinary(), nullable=False),
    sa.Column('out_pos_logits', sa.LargeBinary(), nullable=False),
    sa.Column('out_neg_ids', sa.LargeBinary(), nullable=False),
    sa.Column('out_neg_logits', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'layer', 'neuron')
    )
    with op.batch_alter_table('neurons', schema=None) as batch_op:
        batch_op.create_index('ix_neurons_score', ['model_id', 'layer', 'top_score'], unique=False)

    op.create_table('search_parts',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('part', sa.String(length=50), nullable=False),
    sa.Column('k', sa.Integer(), nullable=False),
    sa.Column('layers', sa.LargeBinary(), nullable=False),
    sa.Column('neurons', sa.LargeBinary(), nullable=False),
    sa.Column('scores', sa.LargeBinary(), nullable=False),
    sa.Column('probs', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'part')
    )
    op.create_table('token_index',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('token_id', sa.Integer(), nullable=False),
    sa.Column('layers', sa.LargeBinary(), nullable=False),
    sa.Column('neurons', sa.LargeBinary(), nullable=False),
    sa.Column('scores', sa.LargeBinary(), nullable=False),
    sa.Column('probs', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'token_id')
    )
    op.create_table('vocab',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('token_id', sa.Integer(), nullable=False),
    sa.Column('token', sa.Text(), nullable=False),
    sa.Column('piece', sa.Text(), nullable=False),
    sa.Column('key', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'token_id')
    )
    with op.batch_alter_table('vocab', schema=None) as batch_op:
        batch_op.create_index('ix_vocab_key', ['model_id', 'key'], unique=False)
        batch_op.create_index('ix_vocab_piece', ['model_id', 'piece'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('vocab', schema=None) as batch_op:
        batch_op.drop_index('ix_vocab_piece')
        batch_op.drop_index('ix_vocab_key')

    op.drop_table('vocab')
    op.drop_table('token_index')
    op.drop_table('search_parts')
    with op.batch_alter_table('neurons', schema=None) as batch_op:
        batch_op.drop_index('ix_neurons_score')

    op.drop_table('neurons')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_claim')

    op.drop_table('jobs')
    op.drop_table('models')
