"""Pallas kernels of memjax, importable as `memjax.kernels` (see setup.cfg package_dir)."""
