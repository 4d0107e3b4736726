"""Helpers for the SLURM and DDP integration tests: a one-node SLURM cluster in a temporary
directory (:mod:`tests.slurm.cluster`) and a callback recording what each DDP rank ended with
(:mod:`tests.slurm.rank_digest`)."""
