"""Multi-objective search for Pareto-optimal sub-networks: LINAS (predictor-guided NSGA-II), plain NSGA-II
and random search under one real-evaluation budget, with an append-only, resumable archive. Further algorithms
plug in through `SearchAlgorithm` and `register_algorithm` (ask / tell; docs/architecture.md, "Search").

Torch-free: deap, moocore and scikit-learn are imported only where they are used.
"""

from instatune_cli.search.interface import (
    Evaluation,
    Proposal,
    SearchAlgorithm,
    algorithm_names,
    register_algorithm,
)
from instatune_cli.search.objectives import ObjectiveSpec
from instatune_cli.search.run import SearchResult, run_search

__all__ = ["Evaluation", "ObjectiveSpec", "Proposal", "SearchAlgorithm", "SearchResult", "algorithm_names",
           "register_algorithm", "run_search"]
