"""Procedural image-question tasks (the data the embedded model is trained and evaluated on)."""
