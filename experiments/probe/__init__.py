"""The gradient probe: variance, SNR and bias of estimators at fixed parameters
(:mod:`.statistics`, :mod:`.sampler`), logged during training (:mod:`.callback`) or studied
offline on a checkpoint (``python -m experiments.probe.study``). Definitions: docs/gradients.md."""
