"""The HF side of fastrm: every checkpoint is a standard HF reward model
(``<Family>ForSequenceClassification``), and any supported HF model directory trains.

* :mod:`fastrm.hf.families`: HF ``model_type`` -> torchtune decoder builder, key conversion,
  the conversion check run before training.
* :mod:`fastrm.hf.export`: :func:`export_reward_model` (the recipe's checkpoint writer).
* :mod:`fastrm.hf.load`: :func:`load_reward_model`, :class:`HFCheckpointer`.
"""

from fastrm.hf.export import choose_pad_token, export_reward_model
from fastrm.hf.families import FAMILIES, check_conversion, family_for, read_config
from fastrm.hf.load import HFCheckpointer, LoadedRewardModel, load_hf_state_dict, load_reward_model

__all__ = ["FAMILIES", "HFCheckpointer", "LoadedRewardModel", "check_conversion",
           "choose_pad_token", "export_reward_model", "family_for", "load_hf_state_dict",
           "load_reward_model", "read_config"]
