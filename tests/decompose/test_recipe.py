"""The recipe end to end: shipped synthetic config through the CLI entry point (planted truth
recovered, files written), and the backbone path (tiny Llama + JSONL splits)."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from fastrm.config import load_config
from fastrm.decompose.cli import main
from fastrm.decompose.heads import DecomposedHeads
from fastrm.decompose.recipe import run
from fastrm.decompose.synthetic import PlantedEmbeddingSource, planted_accuracy


def test_cli_synthetic_recovers_planted_truth(tmp_path, capsys):
    out = tmp_path / "syn"
    rc = main(["--config", "decompose_synthetic", f"output_dir={out}", "--no-progress",
               "embeddings.num_train=6000", "embeddings.num_validation=4000",
               "embeddings.num_user=600", "adapt.trials=4", "pca.num_heads=6", "pca.method=covariance",
               "pca.chunk_size=1000"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| head | explained variance" in printed and "logistic" in printed
    for f in ("heads/heads.safetensors", "heads/heads.json", "heads/head_0.safetensors",
              "heads/head_logistic.safetensors", "heads/weights_softmax.json", "report.md",
              "report.json", "heads.png", "summary.json"):
        assert (out / f).is_file(), f
    heads = DecomposedHeads.load(out / "heads")
    src = PlantedEmbeddingSource()
    v = src.directions()
    cos = (heads.weight[:4].double() * v.double()).sum(1)
    assert bool((cos > 0.99).all()), cos
    rep = json.loads((out / "report.json").read_text())
    truth = planted_accuracy(src.weights, src.scale, src.agreement, src.noise)
    se = torch.sqrt(truth * (1 - truth) / 4000)
    ho = torch.tensor(rep["heldout_accuracy"][:4], dtype=torch.float64)
    assert bool(((ho - truth).abs() < 4 * se).all()), (ho, truth)
    for m in ("softmax", "logistic"):
        a = rep["adaptation"][m]
        assert a["accuracy_mean"] > a["first_head_accuracy"] + 0.15
    # head_<i>.safetensors is the training recipe's head_checkpoint format
    h2 = load_file(str(out / "heads" / "head_2.safetensors"))
    assert set(h2) == {"head.weight"}  # bias-free, as HF's score
    assert h2["head.weight"].shape == (1, 64)
    torch.testing.assert_close(h2["head.weight"][0], heads.weight[2])


def test_config_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        main(["--config", "decompose_nonexistent"])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert "neither a YAML file" in msg and "decompose_synthetic" in msg  # the shipped ones listed
    with pytest.raises(SystemExit):
        main(["--config", "decompose_synthetic", "pca.num_heads"])
    assert "key=value" in capsys.readouterr().err
    cfg = load_config("decompose_synthetic", ["train_split=nope", f"output_dir={tmp_path}",
                                              "embeddings.num_train=50", "embeddings.num_validation=10",
                                              "embeddings.num_user=10"])
    with pytest.raises(ValueError, match="train_split"):
        run(cfg, progress=False)


def test_qa_feedback_config_parses():
    cfg = load_config("decompose_qa_feedback", [])
    assert cfg.splits.train.split == "train" and cfg.adapt.split == "validation"
    assert cfg.splits.train.path.startswith("../shared/data/")


def test_backbone_path_tiny_llama(tmp_path):
    rows = []
    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    for i in range(40):
        w = [words[int(j)] for j in torch.randint(0, 8, (6,), generator=g)]
        rows.append({"prompt": f"q{i} " + w[0], "chosen": " ".join(w[1:4]) + " good",
                     "rejected": " ".join(w[3:6]) + " bad",
                     "split": "train" if i < 30 else "validation"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = OmegaConf.create({
        "output_dir": str(tmp_path / "out"), "seed": 0, "device": "cpu", "dtype": "fp32",
        "model": {"_component_": "fastrm.models.tiny_llama3_reward_model", "embed_dim": 32,
                  "num_layers": 1, "num_heads": 4, "num_kv_heads": 2, "max_seq_len": 128},
        "tokenizer": {"_component_": "fastrm.data.tokenizer.ByteChatTokenizer"},
        "splits": {
            name: {"_component_": "fastrm.decompose.embed.jsonl_pairs", "path": str(path),
                   "split": name, "max_seq_len": 128}
            for name in ("train", "validation")},
        "embed": {"max_tokens": 256, "shard_size": 8},
        "pca": {"num_heads": 4, "method": "randomized", "n_iter": 3},
        "report": {"heldout_split": "validation", "plot": False},
        "adapt": {"split": "validation", "num_shots": 4, "trials": 2, "methods": ["logistic"]},
    })
    res = run(cfg, progress=False)
    assert res["heads"].num_heads == 4 and res["heads"].dim == 32
    assert res["report"].num_train_pairs == 30 and res["report"].num_heldout_pairs == 10
    assert (tmp_path / "out" / "embeddings" / "train" / "meta.json").is_file()
    # a second run reuses the cached embeddings and gives the same heads
    res2 = run(cfg, progress=False)
    torch.testing.assert_close(res2["heads"].weight, res["heads"].weight)
