"""Text/vision encoders: thin, reference-exact wrappers around transformers models."""
