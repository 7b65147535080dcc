"""Stages: one module per stage plus the shared model-family adapters and training machinery below it."""
