"""``python -m fpc_ray`` is the ``fpc-ray`` command (for machines where the script is not on PATH)."""

from fpc_ray.cli import main

main()
