"""``python -m corral.tools.bench SYSTEM ROLE``: one runner process of ``corral bench``."""

from corral.tools.bench import runner_main

runner_main()
