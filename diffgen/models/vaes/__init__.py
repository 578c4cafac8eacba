"""Native VAEs and VAE decoders (over the diffusers VAEs' own weights)."""

#: set to 0 to decode with diffusers' VAE instead: Wan's frame-by-frame schedule, FLUX's AutoencoderKL class
NATIVE_VAE_ENV = "DIFFGEN_NATIVE_VAE"
