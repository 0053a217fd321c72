"""Exact multiply-accumulates and parameter counts of a sub-network, in closed form.

MACs and params are exact functions of the config, so the search computes them instead of predicting
them (DyNAS-T fits predictors to them). Counted at batch 1 and the space's sequence length. Each family owns
its formulas (`FamilyAdapter.macs` / `params`): the encoder layer's in `adapters/costs.py`, the BERT encoders'
embeddings and pooler in `adapters/hf/costs.py`; this module re-exports them for callers that count by hand.
"""

from __future__ import annotations

from instatune_cli.adapters.costs import encoder_macs as encoder_macs
from instatune_cli.adapters.costs import layer_macs as layer_macs
from instatune_cli.adapters.costs import layer_params as layer_params
from instatune_cli.adapters.hf.costs import embedding_macs as embedding_macs
from instatune_cli.adapters.hf.costs import embedding_params as embedding_params
from instatune_cli.adapters.hf.costs import head_macs as head_macs
from instatune_cli.adapters.hf.costs import params as params
from instatune_cli.adapters.hf.costs import total_macs as total_macs
