"""Training: the per-worker loop (`loop`), the recipe (`recipe`) and the driver (`driver`)."""
