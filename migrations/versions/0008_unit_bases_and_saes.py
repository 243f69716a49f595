"""units of a basis: every per-unit table gains `basis` (0: the model's MLP neurons, otherwise
the id of one of its sparse autoencoders in the new `saes` table) at the front of its key;
`unit_links` holds the units of another basis that a unit's weights tie it to most.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 06:00:00
"""
import warnings

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

# table: (old key, new key) -- `basis` goes right after model_id
KEYS = {
    'neurons': ['model_id', 'layer', 'neuron'],
    'neuron_activations': ['model_id', 'layer', 'neuron'],
    'token_index': ['model_id', 'token_id'],
    'feature_layers': ['model_id', 'feature', 'layer'],
    'neuron_features': ['model_id', 'layer', 'neuron', 'feature'],
}
# table: index name -> (old columns, new columns)
INDEXES = {
    'neurons': {'ix_neurons_score': ['model_id', 'layer', 'top_score']},
    'neuron_activations': {'ix_activations_frequency': ['model_id', 'layer', 'frequency'],
                           'ix_activations_max': ['model_id', 'layer', 'max_act']},
    'clamp_curves': {'ix_clamp_curves_neuron': ['model_id', 'layer', 'neuron']},
    'generations': {'ix_generations_neuron': ['model_id', 'layer', 'neuron']},
    'text_runs': {},
}


def _with_basis(columns: list[str]) -> list[str]:
    return [columns[0], 'basis', *columns[1:]]


def _rekey(add: bool) -> None:
    sqlite = op.get_bind().dialect.name == 'sqlite'  # SQLite's keys have no names; batch mode rebuilds its tables
    if not add:  # a latent's row would collide with its neuron namesake's
        for table in [*KEYS, *INDEXES]:
            op.execute(sa.text(f'DELETE FROM {table} WHERE basis <> 0'))
    for table in [*KEYS, *(t for t in INDEXES if t not in KEYS)]:
        with warnings.catch_warnings(), op.batch_alter_table(table, schema=None, recreate='auto') as batch_op:
            # SQLite's rebuilt table is declared with the old key's columns, then given the new key
            warnings.filterwarnings('ignore', message='.*specifies columns .* as primary_key=True')
            for name in INDEXES.get(table, {}):
                batch_op.drop_index(name)
            if table in KEYS and not sqlite:
                batch_op.drop_constraint(f'{table}_pkey', type_='primary')
            if add:
                batch_op.add_column(sa.Column('basis', sa.Integer(), nullable=False, server_default='0'))
            else:
                batch_op.drop_column('basis')
            if table in KEYS:
                key = KEYS[table]
                batch_op.create_primary_key(f'{table}_pkey', _with_basis(key) if add else key)
            for name, columns in INDEXES.get(table, {}).items():
                batch_op.create_index(name, _with_basis(columns) if add else columns, unique=False)


def upgrade() -> None:
    op.create_table('saes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=100), nullable=False),
    sa.Column('site', sa.String(length=20), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('architecture', sa.String(length=20), nullable=False),
    sa.Column('d_in', sa.Integer(), nullable=False),
    sa.Column('d_sae', sa.Integer(), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('cfg', sa.JSON(), nullable=False),
    sa.Column('weights', sa.LargeBinary(), nullable=True),
    sa.Column('training', sa.JSON(), nullable=True),
    sa.Column('quality', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('model_id', 'name', name='uq_saes_model_name')
    )
    op.create_table('unit_links',
    sa.Column('model_id', sa.Integer(), nullable=False),
    sa.Column('basis', sa.Integer(), nullable=False),
    sa.Column('layer', sa.Integer(), nullable=False),
    sa.Column('neuron', sa.Integer(), nullable=False),
    sa.Column('other', sa.Integer(), nullable=False),
    sa.Column('ids', sa.LargeBinary(), nullable=False),
    sa.Column('weights', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['model_id'], ['models.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('model_id', 'basis', 'layer', 'neuron', 'other')
    )
    _rekey(add=True)


def downgrade() -> None:
    _rekey(add=False)
    op.drop_table('unit_links')
    op.drop_table('saes')
