"""Probes: spectral metrics (pure functions) and capture of activations at the model's taps."""
