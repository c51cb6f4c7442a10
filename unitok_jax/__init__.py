"""unitok_jax: Ming-UniAudio in JAX/Flax."""
