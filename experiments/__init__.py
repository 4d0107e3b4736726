"""Entry points (``python -m experiments.train``) and the callbacks they wire in."""
