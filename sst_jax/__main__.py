"""`python -m sst_jax` = the `sst-merge` command (see sst_jax.cli)."""

from sst_jax.cli import run

if __name__ == "__main__":
    run()
