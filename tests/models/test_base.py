"""EstimatorModel's attribute handling: Lightning's hook name is a plain attribute, everything
else still goes through nn.Module's bookkeeping."""

from __future__ import annotations

import torch

from estimators import GumbelSoftmax
from models import CategoricalVAE


def test_hook_name_is_a_plain_attribute_and_modules_still_register() -> None:
    model = CategoricalVAE(estimator=GumbelSoftmax(), image_shape=(2, 3), num_variables=2,
                           num_classes=3, encoder_hidden=[4], decoder_hidden=[4])
    model._current_fx_name = "training_step"
    assert model.__dict__["_current_fx_name"] == "training_step"
    model._current_fx_name = None
    assert model._current_fx_name is None
    model.extra = torch.nn.Parameter(torch.zeros(2))
    model.head = torch.nn.Linear(2, 2)
    names = dict(model.named_parameters())
    assert "extra" in names and "head.weight" in names
    assert "extra" not in model.__dict__ and "head" not in model.__dict__
