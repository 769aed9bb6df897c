"""Reward functions, registry and math verification. No torch here."""
