"""Text/vision encoders: native T5 / UMT5 encoders and CLIP text model (transformers' names and rounding), and
thin, reference-exact wrappers around transformers models."""
