"""The training runtime: components built from the Hydra config, the job that trains and tests
one model, callbacks, checkpointing and loggers. The entry point is :mod:`experiments.train`."""
