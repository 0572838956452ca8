"""Run the ``convcov-fast`` command line as ``python -m convcov_fast``."""

from .cli import main

raise SystemExit(main())
