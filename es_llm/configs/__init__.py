"""DeepSpeed configs (ds/) and model presets (models/), shipped as package data."""
