"""LightningModules whose categorical latent variables are handled by an injected estimator."""

from models.vae import CategoricalVAE

__all__ = ["CategoricalVAE"]
