"""The command lines of the package (installed as console scripts; see pyproject.toml): ``train``
(``unitok-train``, ``python -m unitok_jax.cli.train``; the repository's ``train.py`` is its front door)."""
