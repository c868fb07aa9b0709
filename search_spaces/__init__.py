"""The shipped search spaces (YAML). This file makes the folder the package ``allconv_cli.search_spaces`` (see
pyproject.toml), so an installed allconv finds them with importlib.resources."""
