"""neurons.entropy: the entropy of a unit's input-side decoding (nats), written by the decode
stage; NULL for units decoded before it (their pages say so until the model is indexed again).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-07 00:00:00
"""
import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('neurons') as batch:
        batch.add_column(sa.Column('entropy', sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('neurons') as batch:
        batch.drop_column('entropy')
