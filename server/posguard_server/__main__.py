"""``python -m posguard_server`` is ``posguard-server``."""

from posguard_server.cli import main

main()
