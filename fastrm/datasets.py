"""Dataset builders for YAML configs: ``dataset: {_component_: fastrm.datasets.<builder>, ...}``.

Every builder takes the tokenizer first (torchtune convention; the recipe passes the model's
tokenizer) and returns a :class:`fastrm.data.PreferenceDataset` of
:class:`fastrm.data.PreferenceGroup`. See :mod:`fastrm.data.dataset` for the arguments.
"""

from fastrm.data.dataset import (
    PreferenceDataset, default_shared_data_dir, hh_rlhf_dataset, preference_dataset,
    qa_feedback_dataset, rewardbench_dataset, shp_dataset, synthetic_preference_dataset,
    ultrafeedback_dataset, unpaired_preference_dataset,
)

__all__ = [
    "PreferenceDataset", "default_shared_data_dir", "hh_rlhf_dataset", "preference_dataset",
    "qa_feedback_dataset", "rewardbench_dataset", "shp_dataset", "synthetic_preference_dataset",
    "ultrafeedback_dataset", "unpaired_preference_dataset",
]
