"""catgrad's Hydra plugins: the local launcher with GPU packing (``gpu_packing``)."""
