"""Recipes (`sft VERB recipe=NAME`), shipped as the package `sft_cli.recipes` so that `sft` finds
them in any install (see pyproject.toml). No code: this file only makes the folder a regular
package, which setuptools' editable install can map to a remapped folder."""
