"""`cszoo-sparse-lora`: `cszoo` with this package's registrations, for sites that forbid `.pth` files.

    cszoo-sparse-lora fit model_configs/params_sparse_lora_tiny.yaml

Same arguments as `cszoo`. Importing `modelzoo_ext.cerebras` (at the top of this module, so it also
happens in every process that ModelZoo's autorestart spawns from this script) installs the
registration hook; then ModelZoo's own command-line entry point runs unchanged.
"""

from __future__ import annotations

import modelzoo_ext.cerebras  # noqa: F401  (installs the registration hook before ModelZoo is imported)


def main() -> None:
    """Run ModelZoo's `cszoo` entry point with our registrations in place."""
    from cerebras.modelzoo.cli.main import main as cszoo_main

    cszoo_main()


if __name__ == "__main__":
    main()
