"""The layer-stack architecture for data-flow-space (DFS) merging.

Importing this package registers ``mergekit_evo_layerstack`` with ``AutoConfig`` and
``AutoModelForCausalLM``, so layer-stack checkpoints load with the Auto classes in this process; saved
checkpoints also carry the two files below (``auto_map``) and load anywhere with ``trust_remote_code=True``.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from mergekit_evolve.modeling.configuration_layerstack import LayerStackConfig
from mergekit_evolve.modeling.modeling_layerstack import LayerStackForCausalLM, LayerStackModel

AutoConfig.register(LayerStackConfig.model_type, LayerStackConfig, exist_ok=True)
AutoModelForCausalLM.register(LayerStackConfig, LayerStackForCausalLM, exist_ok=True)

__all__ = ["LayerStackConfig", "LayerStackForCausalLM", "LayerStackModel"]
