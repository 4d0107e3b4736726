"""LightningModules whose categorical latent variables are handled by an injected estimator."""

from models.vae import CategoricalVAE

__all__ = ["CategoricalVAE"]

from models.m2 import M2  # noqa: E402

__all__ += ["M2"]
