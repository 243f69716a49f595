"""neuron_activations.neg_*: a gated MLP's neuron's top negative contexts (the windows with the
most negative min), written with the examples; NULL for other units and for examples written
before (their pages show the positive side until the model is indexed again). And
neuron_activations.silent: the unit's largest |activation| is under 1% of its layer's median,
what "dead" means for SiLU and GELU neurons (NULL until the examples are written again).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07 00:30:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

COLUMNS = ('neg_windows', 'neg_min', 'neg_pos', 'neg_acts')


def upgrade() -> None:
    with op.batch_alter_table('neuron_activations') as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column('silent', sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('neuron_activations') as batch:
        batch.drop_column('silent')
        for name in COLUMNS:
            batch.drop_column(name)
