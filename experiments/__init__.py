"""Scripts that reproduce a published table end to end over `cl_jax.run`; each writes its table under results/."""
