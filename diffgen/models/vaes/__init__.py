"""Native VAE decoders (over the diffusers VAEs' own weights)."""
