"""``fastrm plan``: per-rank memory from the meta device, checked two ways.

1. Against measured runs (CPU, fp32, one process): a tiny reward model trains a few real steps
   from the recipe's own builders; the bytes of its parameters, gradients, optimizer state and
   buffers (actual storage sizes) equal the plan's exactly, and the bytes autograd keeps per
   packed token (``saved_tensors_hooks``, each storage once) match the activation formula
   within ACT_TOL (1 %: the only term the formula leaves out is the head's ``[N, D]`` rows per
   scored response).
2. Against hand computation for the shipped Llama-3.1-8B / 70B configs: parameter counts from
   the published dimensions, FSDP2's padded shards, AdamW state sizes and the activation terms
   written out here from the dimensions.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fastrm.config import resolve_config
from fastrm.data.tokenizer import ByteChatTokenizer
from fastrm.training.config import validate_config
from fastrm.training.memory_plan import (
    GIB,
    main,
    measure_activation_bytes,
    measure_training_memory,
    optimizer_state_layout,
    plan_memory,
    probe_optimizer_state,
)
from fastrm.training.model_setup import RewardModelStep, build_model
from fastrm.training.step_data import build_step_data

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "fastrm" / "recipes" / "configs" / "tiny_llama3_synthetic.yaml"
ACT_TOL = 0.01
BIG = ["llama3_1_8b_full_8xh100", "llama3_1_8b_lora_8xh100", "llama3_1_70b_full_8xh100",
       "llama3_1_70b_lora_8xh100"]


def tiny_cfg(**overrides):
    cfg = OmegaConf.load(TINY)
    cfg.model.num_layers = 3
    cfg.dataset.num_prompts = 40
    cfg.packing.prefix_sharing = False
    cfg.packing.max_seq_len = 768
    cfg.optimizer.lr = 1e-3
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return cfg


# --------------------------------------------------------------------- measured runs
LORA = {"model": {"_component_": "fastrm.models.lora_reward_model",
                  "decoder": "fastrm.models.tiny_lora_llama3",
                  "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
                  "lora_rank": 4, "lora_alpha": 8.0, "vocab_size": 261, "num_layers": 3,
                  "num_heads": 4, "num_kv_heads": 2, "embed_dim": 64, "max_seq_len": 2048}}


@pytest.mark.parametrize("name,overrides", [
    ("full", {}),
    ("full_checkpointing", {"enable_activation_checkpointing": True}),
    ("last_layer", {"trainable": {"last_n_layers": 1, "final_norm": True}}),
    ("head_only", {"trainable": {"last_n_layers": 0, "final_norm": False}}),
    ("lora_qkvo", LORA),
    ("lora_qv_sgd", {**LORA, "model": {**LORA["model"], "lora_attn_modules": ["q_proj", "v_proj"]},
                     "optimizer": {"_component_": "torch.optim.SGD", "lr": 0.01, "momentum": 0.9}}),
    ("amsgrad_two_rows", {"optimizer.amsgrad": True, "packing.rows_per_step": 2}),
])
def test_plan_matches_a_measured_run(name, overrides):
    cfg = tiny_cfg()
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v, force_add=True, merge=False)
    measured = measure_training_memory(cfg, ByteChatTokenizer(), steps=3)
    plan = plan_memory(cfg, gpus=1)
    assert plan.attention_backend == "sdpa_segments"  # fp32 on CPU
    for key in ("parameters", "trainable_parameters", "weights_bytes", "buffers_bytes",
                "gradients_bytes", "optimizer_bytes"):
        assert getattr(plan, key) == measured[key], key
    assert plan.fsdp_buffers_bytes == 0  # one rank: nothing is gathered
    formula = plan.activation_bytes_per_token - plan.activation_recompute_bytes_per_token
    assert len(measured["activation_bytes_per_token"]) == 3
    for kept in measured["activation_bytes_per_token"]:
        assert kept == pytest.approx(formula, rel=ACT_TOL), name
        assert kept >= formula  # what is left out only adds
    assert plan.tokens_per_step == cfg.packing.max_seq_len * cfg.packing.get("rows_per_step", 1)
    assert plan.activation_bytes == math.ceil(plan.activation_bytes_per_token * plan.tokens_per_step)


def test_activation_checkpointing_keeps_far_less_and_is_reported_both_ways():
    plain = plan_memory(tiny_cfg(), gpus=1)
    ac = plan_memory(tiny_cfg(enable_activation_checkpointing=True), gpus=1)
    assert ac.activation_bytes_per_token_with_checkpointing == plain.activation_bytes_per_token_with_checkpointing
    assert ac.activation_bytes_per_token == ac.activation_bytes_per_token_with_checkpointing
    assert plain.activation_bytes_per_token == plain.activation_bytes_per_token_without_checkpointing
    kept = ac.activation_bytes_per_token - ac.activation_recompute_bytes_per_token
    assert kept < 0.15 * plain.activation_bytes_per_token
    assert ac.activation_recompute_bytes_per_token > 0 and plain.activation_recompute_bytes_per_token == 0
    assert ac.activation_bytes_per_token < 0.5 * plain.activation_bytes_per_token


def test_prefix_sharing_key_rows_on_cpu_bound_the_measurement():
    """With prefix sharing the backends gather each response's prompt keys; with ``R`` taken
    from the batch the formula gives what is kept, except for what only CPU's sdpa_segments
    keeps (the flash backends have neither): per layer, each prefix group's attention mask as
    an additive ``[L, P + L]`` float tensor, and once, the int64 token permutations. Those are
    added here from the batch's segment plan; the sum matches within ACT_TOL."""
    cfg = tiny_cfg(**{"packing.prefix_sharing": True})
    torch.manual_seed(0)
    model, _ = build_model(cfg, torch.device("cpu"), torch.float32)
    from torchtune import config

    step = RewardModelStep(model, config.instantiate(cfg.loss))
    data = build_step_data(cfg, "dataset", ByteChatTokenizer(), 1, 0, seed=0, train=True)
    batch = next(iter(data.epoch_steps(0)))
    t = batch.tokens.shape[1]
    sp = batch.segment_prefix
    assert sp is not None and int((sp[:, 1] - sp[:, 0]).sum()) > 0
    r = (t + int((sp[:, 1] - sp[:, 0]).sum())) / t
    kept = measure_activation_bytes(lambda: step(batch), model) / t
    plan = plan_memory(cfg, gpus=1, key_rows_per_token=r)
    from fastrm.attention.metadata import VarlenMetadata

    seg = VarlenMetadata.build(batch.cu_seqlens, batch.segment_prefix).segment_plan()
    masks = sum(g.query_len * (g.prefix_len + g.query_len) * 4 for g in seg.groups
                if g.mask is not None)
    assert masks > 0
    perms = sum(8 * x.numel() for x in (seg.query_index, seg.inverse_index) if x is not None)
    sdpa_only = (cfg.model.num_layers * masks + perms) / t
    assert kept == pytest.approx(plan.activation_bytes_per_token + sdpa_only, rel=ACT_TOL)
    assert plan_memory(cfg, gpus=1).key_rows_per_token == 3.0  # the default bound for pairs


# ------------------------------------------------------------ the shipped big configs
def _llama(size: str) -> dict:
    """Published Llama-3.1 dimensions (config.json of meta-llama/Llama-3.1-8B / 70B)."""
    dims = {"8b": dict(L=32, D=4096, H=32, KV=8, I=14336),
            "70b": dict(L=80, D=8192, H=64, KV=8, I=28672)}[size]
    return dict(dims, V=128256, d=128)


def _param_shapes(m: dict, lora_rank: int = 0) -> list[tuple[tuple[int, ...], bool]]:
    """``(shape, trainable)`` of every parameter of the reward model, written from the dims."""
    D, H, KV, d, I = m["D"], m["H"], m["KV"], m["d"], m["I"]
    full = lora_rank == 0
    shapes = [((m["V"], D), full)]
    for _ in range(m["L"]):
        for out_dim, in_dim in ((H * d, D), (KV * d, D), (KV * d, D), (D, H * d)):
            shapes.append(((out_dim, in_dim), full))
            if lora_rank:
                shapes += [((lora_rank, in_dim), True), ((out_dim, lora_rank), True)]
        shapes += [((I, D), full), ((D, I), full), ((I, D), full), ((D,), full), ((D,), full)]
    shapes += [((D,), full), ((1, D), True)]  # final norm, reward head (no bias)
    return shapes


def _sharded(shape, n: int) -> int:
    return -(-shape[0] // n) * math.prod(shape[1:])


def _plan_cli(capsys, *args) -> dict:
    assert main(list(args) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", BIG)
def test_shipped_big_configs_plan_like_hand_computation(name, capsys):
    size = "70b" if "70b" in name else "8b"
    lora = "lora" in name
    m = _llama(size)
    t0 = time.perf_counter()
    plan = _plan_cli(capsys, "--config", name, "--gpus", "8")
    assert time.perf_counter() - t0 < 30  # meta device: no weights, no memory
    shapes = _param_shapes(m, 16 if lora else 0)
    n_params = sum(math.prod(s) for s, _ in shapes)
    if not lora:  # the published counts minus the LM head (V x D), plus the reward head
        published = {"8b": 8_030_261_248, "70b": 70_553_706_496}[size]
        assert n_params == published - m["V"] * m["D"] + m["D"]
    assert plan["parameters"] == n_params
    assert plan["trainable_parameters"] == sum(math.prod(s) for s, t in shapes if t)
    assert plan["dtype"] == "bfloat16" and plan["attention_backend"] == "flash_attn"
    assert plan["weights_bytes"] == 2 * sum(_sharded(s, 8) for s, _ in shapes)
    assert plan["gradients_bytes"] == 2 * sum(_sharded(s, 8) for s, t in shapes if t)
    n_train_tensors = sum(1 for _, t in shapes if t)
    if "70b_full" in name:  # torchao AdamW8bit: uint8 codes + fp32 scale per 256, code books
        big = [_sharded(s, 8) for s, t in shapes if t and _sharded(s, 8) >= 4096]
        small = [_sharded(s, 8) for s, t in shapes if t and _sharded(s, 8) < 4096]
        expected = (sum(2 * (n + n // 256 * 4) for n in big) + 4 * len(big) + 2 * 256 * 4 * len(big)
                    + sum(2 * 2 * n + 4 for n in small))
        assert plan["optimizer"] == "torchao.optim.AdamW8bit"
        assert plan["optimizer_bytes"] == pytest.approx(expected, abs=len(big))
    else:  # AdamW: exp_avg + exp_avg_sq in bf16, one fp32 step per tensor
        assert plan["optimizer_bytes"] == 2 * 2 * sum(_sharded(s, 8) for s, t in shapes if t) + 4 * n_train_tensors
    D, H, KV, d, I, L = m["D"], m["H"], m["KV"], m["d"], m["I"], m["L"]
    layer_full = 2 * D * 2 + (2 * H * d + 2 * KV * d) * 2 + 2 * I * 2  # bf16 parts of a layer
    layer_bytes = layer_full + 2 * 4 + 4 * H + 2 * 2 * KV * d * 2  # rstd, lse, R = 3 keys
    if lora:
        layer_bytes += 4 * 16 * 2  # lora_a outputs of q, k, v, o
    tokens_id = 0 if lora else 8
    outside = tokens_id + 4 * d + (2 * D + 4) + 2 * D  # ids, RoPE rows, final norm, head input
    assert plan["key_rows_per_token"] == 3.0
    assert plan["activation_bytes_per_token_without_checkpointing"] == pytest.approx(
        L * layer_bytes + outside - (4 if lora else 0))
    assert plan["activation_bytes_per_token_with_checkpointing"] == pytest.approx(
        L * 2 * D + outside + layer_bytes)
    per_layer = shapes[1:1 + (len(shapes) - 3) // L]
    layer_params = sum(math.prod(s) for s, _ in per_layer)
    layer_train = sum(math.prod(s) for s, t in per_layer if t)
    root = m["V"] * D + D + D  # embeddings, final norm, head
    assert plan["fsdp_buffers_bytes"] == 2 * (root + 2 * layer_params + layer_train)
    assert plan["buffers_bytes"] == 131072 * d * 4  # one shared fp32 RoPE cache
    assert plan["total_bytes"] == sum(plan[k] for k in (
        "weights_bytes", "buffers_bytes", "gradients_bytes", "optimizer_bytes",
        "fsdp_buffers_bytes", "activation_bytes"))
    assert plan["fits"] and plan["total_bytes"] <= 0.85 * 80 * GIB


def test_shipped_big_configs_validate_without_weights():
    for name in BIG:
        cfg = OmegaConf.load(resolve_config(name))
        validate_config(cfg)
        assert OmegaConf.is_missing(cfg.checkpointer, "checkpoint_dir")  # the user supplies it
        assert OmegaConf.to_container(cfg.tokenizer)["path"] == "${checkpointer.checkpoint_dir}"
        with pytest.raises(Exception, match="Missing mandatory value: checkpointer.checkpoint_dir"):
            OmegaConf.to_container(cfg, resolve=True)  # what the recipe does first (log_config)
        cfg.checkpointer.checkpoint_dir = "/models/x"
        assert OmegaConf.to_container(cfg, resolve=True)["tokenizer"]["path"] == "/models/x"


def test_plan_table_and_overrides(capsys):
    assert main(["--config", "llama3_1_8b_full_8xh100", "--gpus", "8"]) == 0
    out = capsys.readouterr().out
    assert "weights / rank" in out and "fits" in out and "7,504,928,768" in out
    one = _plan_cli(capsys, "--config", "llama3_1_8b_full_8xh100", "--gpus", "1")
    eight = _plan_cli(capsys, "--config", "llama3_1_8b_full_8xh100", "--gpus", "8")
    assert one["fsdp_buffers_bytes"] == 0 and one["total_bytes"] > 3 * eight["total_bytes"]
    assert one["weights_bytes"] == pytest.approx(8 * eight["weights_bytes"], rel=1e-3)
    # key=value overrides as for fastrm train
    fp32 = _plan_cli(capsys, "--config", "llama3_1_8b_full_8xh100", "--gpus", "8", "dtype=fp32",
                     "packing.rows_per_step=1", "enable_activation_checkpointing=false")
    assert fp32["dtype"] == "float32" and fp32["weights_bytes"] == 2 * eight["weights_bytes"]
    assert fp32["tokens_per_step"] == 8192 and not fp32["activation_checkpointing"]
    assert fp32["activation_bytes_per_token"] == fp32["activation_bytes_per_token_without_checkpointing"]
    # fp32 on CUDA: no flash kernel, sdpa_segments copies the attention output
    assert fp32["attention_backend"] == "sdpa_segments"


def test_plan_options(capsys):
    base = _plan_cli(capsys, "--config", "llama3_1_8b_lora_8xh100", "--gpus", "8")
    assert base["device_memory_bytes"] == 80 * GIB and base["headroom"] == 0.15
    small = _plan_cli(capsys, "--config", "llama3_1_8b_lora_8xh100", "--gpus", "8",
                      "--device-memory-gib", "16", "--headroom", "0.5")
    assert small["device_memory_bytes"] == 16 * GIB and small["budget_bytes"] == 8 * GIB
    assert not small["fits"]
    one = _plan_cli(capsys, "--config", "llama3_1_8b_lora_8xh100", "--gpus", "8",
                    "--key-rows-per-token", "1")
    # R = 3 -> 1 removes 2 gathered key and value rows per layer (bf16, 8 KV heads of 128)
    delta = base["activation_bytes_per_token_without_checkpointing"] - one["activation_bytes_per_token_without_checkpointing"]
    assert delta == 32 * 2 * 2 * 8 * 128 * 2
    keep = _plan_cli(capsys, "--config", "llama3_1_8b_lora_8xh100", "--gpus", "8",
                     "fsdp_reshard_after_forward=false")
    # nothing is resharded after the forward: the whole bf16 model is gathered, plus one
    # layer's LoRA gradients
    lora_layer = 16 * 4 * 4096 + 16 * (4096 + 1024 + 1024 + 4096)  # lora_a, lora_b of q, k, v, o
    assert keep["fsdp_buffers_bytes"] == 2 * (base["parameters"] + lora_layer)
    nopre = _plan_cli(capsys, "--config", "llama3_1_8b_lora_8xh100", "--gpus", "8",
                      "packing.prefix_sharing=false")
    assert nopre["key_rows_per_token"] == 1.0
    assert main(["--config", "llama3_1_8b_lora_8xh100", "--gpus", "8", "--headroom", "0.2",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["budget_bytes"] == int(0.8 * 80 * GIB)


@pytest.mark.parametrize("args,match", [
    (["--gpus", "0"], "--gpus must be >= 1"),
    (["--gpus", "8", "--headroom", "1.5"], "--headroom must lie in"),
    (["--gpus", "8", "--device-memory-gib", "0"], "--device-memory-gib must be > 0"),
    (["--gpus", "8", "--key-rows-per-token", "0.5"], "--key-rows-per-token must be >= 1"),
    (["--gpus", "8", "attention_backend=reference"], "O\\(T\\^2\\) test backend"),
    (["--gpus", "8", "model.lora_dropout=0.1"], "lora_dropout=0"),
    (["--gpus", "8", "model.apply_lora_to_mlp=true"], "apply_lora_to_mlp"),
    (["--gpus", "8", "model.fused_ops=false"], "fused_ops=True"),
    (["--gpus", "8", "packing.shuffle=true"], "unknown key 'packing.shuffle'"),
])
def test_plan_errors_name_the_fix(args, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--config", "llama3_1_8b_lora_8xh100", *args])
    assert e.value.code == 2
    import re
    assert re.search(match, capsys.readouterr().err)


def test_fastrm_cli_runs_plan(capsys):
    from fastrm.cli import main as cli_main

    assert cli_main(["plan", "--config", "llama3_1_70b_lora_8xh100", "--gpus", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == 69_568_577_536


# ------------------------------------------------------------------------- optimizer
@pytest.mark.parametrize("opt", [
    {"_component_": "torch.optim.AdamW", "lr": 1e-3},
    {"_component_": "torch.optim.AdamW", "lr": 1e-3, "fused": True},
    {"_component_": "torch.optim.Adam", "lr": 1e-3, "amsgrad": True},
    {"_component_": "torch.optim.SGD", "lr": 1e-3, "momentum": 0.9},
    {"_component_": "fastrm.optim.AdamW", "lr": 1e-3},
    {"_component_": "torch.optim.SGD", "lr": 1e-3},
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimizer_rules_match_a_real_step(opt, dtype):
    cfg = OmegaConf.create(opt)
    assert optimizer_state_layout(cfg, dtype) == probe_optimizer_state(cfg, dtype)


def test_unknown_optimizer_is_measured():
    cfg = OmegaConf.create({"_component_": "torch.optim.Adagrad", "lr": 0.1})
    per_element, per_tensor = optimizer_state_layout(cfg, torch.float32)
    assert per_element == 4.0  # state_sum in fp32
    assert per_tensor == 4  # fp32 step


@pytest.mark.slow
@pytest.mark.parametrize("numel_shape,extra", [
    ((64, 64), {}),                   # 4096 elements: quantized
    ((128, 256), {"block_size": 128}),  # a smaller block: more scales
    ((63, 65), {}),                   # 4095: kept in bf16
    ((80, 100), {}),                  # 8000, not a whole number of 256-blocks: kept in bf16
])
def test_adamw8bit_rule_matches_a_real_step(numel_shape, extra):
    """torchao compiles its step (about a minute on this CPU): slow."""
    import torchao  # noqa: F401  (a torchtune dependency)
    cfg = OmegaConf.create({"_component_": "torchao.optim.AdamW8bit", "lr": 1e-3, **extra})
    n = math.prod(numel_shape)
    rule = optimizer_state_layout(cfg, torch.bfloat16, n)
    probe = probe_optimizer_state(cfg, torch.bfloat16, numel_shape)
    assert rule == pytest.approx(probe)
