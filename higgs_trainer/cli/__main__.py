"""``python -m higgs_trainer.cli``: the ``higgs-trainer`` command without the console script."""

from .main import main

raise SystemExit(main())
