"""Benchmarks of geofunc against GeoTorch and torch.nn.utils.parametrizations (see run.py)."""
