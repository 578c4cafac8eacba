"""Native DiTs. Each file is one model, built from diffgen.layers, loading diffusers weights unchanged."""
