"""``python -m allconv_cli`` is the same as the ``allconv`` console script."""

from allconv_cli.cli import main

main()
