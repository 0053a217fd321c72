"""instatune: elastic fine-tuning (InstaTune) and Pareto search for smaller transformer sub-networks.

Importing this package is cheap on purpose: torch and friends are imported only by the stage that needs them.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("instatune")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
