"""Ouro-compatible looped causal LM (filled in by the modeling work)."""
