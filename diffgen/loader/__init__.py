"""Resolve a hub id or folder, read model_index.json and load each component."""
