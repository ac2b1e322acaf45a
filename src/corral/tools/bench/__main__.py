"""``python -m corral.tools.bench SYSTEM ROLE``: one runner process of ``corral bench``."""

from corral.tools.bench.runner import runner_main

runner_main()
