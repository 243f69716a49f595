"""A model's bases of units: its MLP neurons (basis 0) and each sparse autoencoder's latents
(basis: the SAE's id). A page, a URL and a stored row address a unit as (basis, layer, index);
this module says what a basis is called and where its pages are."""

from __future__ import annotations

from dataclasses import dataclass

SITES = ("mlp", "mlp_out", "resid_pre", "resid_post")  # where an SAE reads a layer (TransformerLens: hook_post, ...)
SITE_TEXT = {
    "mlp": "the MLP's neurons (blocks.L.mlp.hook_post)",
    "mlp_out": "the MLP's output (blocks.L.hook_mlp_out)",
    "resid_pre": "the residual stream entering the block (blocks.L.hook_resid_pre)",
    "resid_post": "the residual stream leaving the block (blocks.L.hook_resid_post)",
}
NEURONS = 0


@dataclass(frozen=True)
class Basis:
    """One basis of a model: `id` 0 and `sae` None for the neurons; an SAE's id, name, layer and
    site for its latents. `width` is the units per layer."""

    id: int
    width: int
    sae: str | None = None
    layer: int | None = None
    site: str = "mlp"

    @property
    def unit(self) -> str:
        return "neuron" if self.sae is None else "latent"

    @property
    def is_neurons(self) -> bool:
        return self.sae is None


def neuron_basis(d_mlp: int) -> Basis:
    return Basis(id=NEURONS, width=d_mlp)


def sae_basis(row) -> Basis:
    """The basis of a stored SAE row (app.schema.Sae)."""
    return Basis(id=row.id, width=row.d_sae, sae=row.name, layer=row.layer, site=row.site)
