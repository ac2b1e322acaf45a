"""Tools that exercise corral itself: ``corral bench`` (a load test of corral against the configured
backend) and ``corral chaos`` (workers killed at random under load, then a check that no job was
lost). Imported only when one of those commands runs, never by ``import corral``."""
