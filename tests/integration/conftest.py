"""The scale tests' session fixtures, registered here once for the whole directory.

A fixture imported into two test modules is two fixtures to pytest, each with its own cache: the
uninterrupted reference run (about 25 s) ran once for test_fault_tolerance and again for test_zero.
"""

from tests.integration.scale_jobs import deepspeed_ops, reference  # noqa: F401  (fixtures)
