"""What the reward-model recipe (:mod:`fastrm.recipes.reward_model`) is made of, one job a
module, usable on their own (``fastrm.decompose`` builds its backbone with
:func:`build_model`, the benchmarks take the recipe's dtype rule from :func:`resolve_dtype`):

* :mod:`~fastrm.training.config`: config checks (unknown keys with a "did you mean") and the
  command-line parser (optional sections can be turned off);
* :mod:`~fastrm.training.distributed`: process group, device mesh, reductions, full tensors
  gathered one at a time;
* :mod:`~fastrm.training.dtype`: the dtype rule (``fp32``, ``bf16``, ``auto``), TF32 for fp32 on CUDA;
* :mod:`~fastrm.training.model_setup`: build the model (in one process, or on the meta device
  and sharded with FSDP2 over several ranks), the fresh head / adapters, the trainable policy,
  the step module that binds the head to the loss;
* :mod:`~fastrm.training.step_data`: a split's packed steps for this rank, per epoch;
* :mod:`~fastrm.training.metrics`: named additive sums for step and evaluation metrics;
* :mod:`~fastrm.training.evaluation`: evaluation of a split;
* :mod:`~fastrm.training.checkpoint`: the exported model, reward statistics, RNG states;
* :mod:`~fastrm.training.training_state`: the resumable state, sharded with DCP.

Names are imported lazily, so ``fastrm.loss`` can use :mod:`fastrm.training.metrics` without
importing torchtune's model code.
"""

import importlib

_LAZY = {
    "ConfigError": "config", "validate_config": "config", "parse": "config",
    "init_distributed": "distributed", "device_mesh": "distributed",
    "resolve_dtype": "dtype", "enable_tf32": "dtype",
    "build_model": "model_setup", "apply_trainable_policy": "model_setup",
    "RewardModelStep": "model_setup", "shard": "model_setup",
    "build_sharded_step_module": "model_setup", "fresh_parameters": "model_setup",
    "save_training_state": "training_state", "load_training_state": "training_state",
    "StepData": "step_data", "build_step_data": "step_data",
    "ComparisonSums": "metrics", "StepAccumulator": "metrics",
    "evaluate": "evaluation",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"fastrm.training.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fastrm.training' has no attribute {name!r}")
