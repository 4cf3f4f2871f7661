"""Ray Tune search spaces for alexnet-ray sweeps."""
