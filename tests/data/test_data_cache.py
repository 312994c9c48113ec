"""The prepared-data cache (fastrm.data.cache) as the recipe uses it (build_step_data): a
cached split yields exactly the batches of an uncached build, the key follows every input,
and a damaged file is rebuilt, never trusted."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fastrm.data import cache as data_cache
from fastrm.data.cache import DataCache, PreparedGroups, data_key, plan_key
from fastrm.training.step_data import build_step_data
from fixtures.hf_tokenizers import build_tokenizer_dir

REPO = Path(__file__).resolve().parents[2]
WORDS = ["water", "Lima", "größer", "中文", "emoji 😀", "x", "the answer is", "no", "42", "\n\n"]


def write_pairs(path: Path, n: int = 48, seed: int = 0) -> Path:
    """Pairs with explicit prompts, prompt ids (several pairs per prompt) and margins."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = i % (n // 3)
        text = lambda k: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, k)))  # noqa: E731
        prompt = f"question {q}: " + " ".join(WORDS[(q + j) % len(WORDS)] for j in range(q % 7 + 1))
        chosen, rejected = text(30), text(30)
        if chosen == rejected:
            rejected += " !"
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "margin": round(rng.random(), 3), "prompt_id": f"q{q}"})
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    return build_tokenizer_dir("smollm2", tmp_path_factory.mktemp("tok") / "smollm2")


def make_cfg(tmp_path: Path, tokenizer_dir: Path, cache_dir, **overrides):
    data = tmp_path / "pairs.jsonl"
    if not data.exists():
        tmp_path.mkdir(parents=True, exist_ok=True)
        write_pairs(data)
    cfg = OmegaConf.create({
        "seed": 3, "epochs": 2, "device": "cpu",
        "tokenizer": {"_component_": "fastrm.models.tokenizer.hf_tokenizer", "path": str(tokenizer_dir)},
        "dataset": {"_component_": "fastrm.datasets.preference_dataset", "source": "json",
                    "data_files": str(data), "max_seq_len": 96, "group_by_prompt": True,
                    "progress": False},
        "packing": {"max_seq_len": 192, "rows_per_step": 1, "prefix_sharing": True},
        "loss": {"_component_": "fastrm.RewardLoss"},
    })
    if cache_dir is not ...:
        cfg.data_cache_dir = None if cache_dir is None else str(cache_dir)
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v, force_add=True)
    return cfg


def tokenizer_of(cfg):
    from torchtune import config

    return config.instantiate(cfg.tokenizer)


def split(cfg, world_size=1, rank=0, train=True):
    return build_step_data(cfg, "dataset", tokenizer_of(cfg), world_size, rank, seed=cfg.seed,
                           train=train)


def all_batches(data, epochs=2) -> list:
    if not data.train:
        return [(b, real) for b, real in data.eval_steps()]
    return [b for e in range(epochs) for b in data.epoch_steps(e)]


def assert_same_batches(got: list, want: list) -> None:
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        if isinstance(a, tuple):
            (a, ra), (b, rb) = a, b
            assert ra == rb
        for name, va in vars(a).items():
            vb = getattr(b, name)
            if isinstance(va, torch.Tensor):
                assert va.dtype == vb.dtype and torch.equal(va, vb), name
            else:
                assert va == vb, name


def cache_files(d: Path, kind: str = "") -> list[Path]:
    return sorted(Path(d).glob(f"*{kind}*.fastrm-data" if kind else "*.fastrm-data"))


@pytest.mark.parametrize("world_size", [1, 2])
def test_cached_split_yields_the_batches_of_an_uncached_build(tmp_path, tokenizer_dir, world_size):
    plain = make_cfg(tmp_path, tokenizer_dir, None)
    cached = make_cfg(tmp_path, tokenizer_dir, tmp_path / "cache")
    for rank in range(world_size):
        want = all_batches(split(plain, world_size, rank))
        first = split(cached, world_size, rank)  # rank 0 builds (and writes) or reads
        again = split(cached, world_size, rank)  # read back from the files
        assert isinstance(again.packed.units, list) and len(cache_files(tmp_path / "cache")) == 2
        assert_same_batches(all_batches(first), want)
        assert_same_batches(all_batches(again), want)
    # the groups of the second build came from the file, not from the builder
    from torchtune import config

    calls = []
    real = config.instantiate

    def spy(node, *a, **kw):
        calls.append(node.get("_component_"))
        return real(node, *a, **kw)

    config.instantiate, saved = spy, config.instantiate
    try:
        read = split(cached)
    finally:
        config.instantiate = saved
    assert "fastrm.datasets.preference_dataset" not in calls
    # ... and the packing plans too: every epoch of the run, equal to planning afresh
    assert sorted(read.packed._plans) == [0, 1]
    for epoch, (steps, num_rows) in read.packed._plans.items():
        want_steps, want_rows = read.packed.plan_epoch(epoch)
        assert num_rows == want_rows and len(steps) == len(want_steps)
        assert all(len(a) == len(b) and all(map(torch.equal, map(torch.from_numpy, a),
                                                map(torch.from_numpy, b)))
                   for a, b in zip(steps, want_steps))
    assert isinstance(read.packed.units[0], type(split(plain).packed.units[0]))
    # evaluation splits (every step, round robin over ranks) too
    assert_same_batches(all_batches(split(cached, 2, 1, train=False)),
                        all_batches(split(plain, 2, 1, train=False)))


def test_groups_survive_the_file_format_exactly(tmp_path):
    """Grouped responses with score margins, unpaired labels, missing margins, tuple
    provenance, categories and unicode prompt texts round-trip field for field."""
    from fastrm.data.cache import decode_groups, encode_groups, read_arrays, write_arrays
    from fastrm.data.tokenizer import ByteChatTokenizer
    from fastrm.datasets import preference_dataset, synthetic_preference_dataset

    tok = ByteChatTokenizer()
    fixtures = REPO / "tests" / "fixtures"
    sets = [synthetic_preference_dataset(tok, num_prompts=30, responses_per_prompt=3, progress=False),
            preference_dataset(tok, source="json", data_files=str(fixtures / "unpaired.jsonl"),
                               format="unpaired", progress=False),
            preference_dataset(tok, source="json", data_files=str(write_pairs(tmp_path / "p.jsonl")),
                               group_by_prompt=True, progress=False),
            preference_dataset(tok, source="json", data_files=str(fixtures / "trl_implicit.jsonl"),
                               progress=False)]
    assert any(isinstance(g.source_index, tuple) for g in sets[2].groups)
    assert any(g.labels is not None for g in sets[1].groups)
    assert any(m is None for g in sets[3].groups for _, _, m in g.comparisons)
    for i, ds in enumerate(sets):
        path = tmp_path / f"{i}.fastrm-data"
        write_arrays(path, "k", "groups", *encode_groups(ds))
        back = decode_groups(*read_arrays(path, "k", "groups"))
        assert isinstance(back, PreparedGroups)
        assert back.groups == ds.groups  # dataclass equality: every field
        assert back.stats == {k: v for k, v in ds.stats.items()} and back.num_prompts == ds.num_prompts


def test_key_changes_when_any_input_changes(tmp_path, tokenizer_dir, monkeypatch):
    import shutil

    def key(cfg):
        return data_key(cfg.dataset, cfg.tokenizer, tokenizer_of(cfg))

    base = make_cfg(tmp_path, tokenizer_dir, None)
    k0 = key(base)
    assert key(make_cfg(tmp_path, tokenizer_dir, None)) == k0  # deterministic
    assert key(make_cfg(tmp_path, tokenizer_dir, None, **{"dataset.progress": True})) == k0

    changed = {}
    for name, edit in {
        "dataset.max_seq_len": 64, "dataset.truncation": "drop", "dataset.split": "train[:90%]",
        "dataset.group_by_prompt": False, "dataset.column_map": {"margin": "prompt_id"},
        "tokenizer.chat": False,
    }.items():
        changed[name] = key(make_cfg(tmp_path, tokenizer_dir, None, **{name: edit}))
    # the data file's contents (same size, same name): one character differs
    data = tmp_path / "pairs.jsonl"
    text = data.read_text()
    stat = data.stat()
    data.write_text(text.replace("question 1:", "question 1;", 1))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # mtime kept: contents decide
    changed["data file contents"] = key(base)
    data.write_text(text)
    assert key(base) == k0
    # the tokenizer's files: a copy is the same tokenizer; an edited template is not
    copy = tmp_path / "tok_copy"
    shutil.copytree(tokenizer_dir, copy)
    assert key(make_cfg(tmp_path, copy, None)) == k0
    cfgfile = copy / "tokenizer_config.json"
    tc = json.loads(cfgfile.read_text())
    tc["chat_template"] = tc["chat_template"].replace("helpful", "useful")
    cfgfile.write_text(json.dumps(tc))
    changed["tokenizer template"] = key(make_cfg(tmp_path, copy, None))
    (copy / "model.safetensors").write_bytes(b"weights do not change tokens")
    assert key(make_cfg(tmp_path, copy, None)) == changed["tokenizer template"]
    # fastrm's data format version and the data path's code
    monkeypatch.setattr(data_cache, "DATA_FORMAT_VERSION", 99)
    changed["format version"] = key(base)
    monkeypatch.undo()
    monkeypatch.setattr(data_cache, "_module_source_hash", lambda m: "v1")
    before_edit = key(base)
    monkeypatch.setattr(data_cache, "_module_source_hash",
                        lambda m: "v2" if m == "fastrm.data.dataset" else "v1")
    assert key(base) != before_edit, "the key ignores the data path's code"
    monkeypatch.undo()
    same = {n: k for n, k in changed.items() if k == k0}
    assert not same, f"the key ignores {sorted(same)}"
    assert len(set(changed.values())) == len(changed)

    # plans: every packing setting, the seed and the epochs
    p0 = plan_key(k0, base.packing, 3, [0, 1], True)
    plans = [plan_key(k0, {**base.packing, "max_seq_len": 256}, 3, [0, 1], True),
             plan_key(k0, {**base.packing, "rows_per_step": 2}, 3, [0, 1], True),
             plan_key(k0, {**base.packing, "prefix_sharing": False}, 3, [0, 1], True),
             plan_key(k0, base.packing, 4, [0, 1], True),
             plan_key(k0, base.packing, 3, [0, 1, 2], True),
             plan_key(k0, base.packing, 3, [0, 1], False),
             plan_key(changed["dataset.max_seq_len"], base.packing, 3, [0, 1], True)]
    assert p0 not in plans and len(set(plans)) == len(plans)


@pytest.mark.slow
def test_key_is_the_same_in_a_fresh_process(tmp_path, tokenizer_dir):
    """No dependence on Python's hash seed or on anything process-local."""
    cfg = make_cfg(tmp_path, tokenizer_dir, None)
    OmegaConf.save(cfg, tmp_path / "cfg.yaml")
    code = ("import sys; from omegaconf import OmegaConf; from torchtune import config; "
            "from fastrm.data.cache import data_key; c = OmegaConf.load(sys.argv[1]); "
            "print(data_key(c.dataset, c.tokenizer, config.instantiate(c.tokenizer)))")
    keys = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cfg.yaml")], env=env,
                             capture_output=True, text=True, timeout=300, cwd=REPO)
        assert out.returncode == 0, out.stderr[-2000:]
        keys.add(out.stdout.strip().splitlines()[-1])
    assert keys == {data_key(cfg.dataset, cfg.tokenizer, tokenizer_of(cfg))}


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "foreign key", "garbage", "empty"])
def test_damaged_cache_file_is_rebuilt_not_trusted(tmp_path, tokenizer_dir, damage, caplog):
    cfg = make_cfg(tmp_path, tokenizer_dir, tmp_path / "cache")
    want = all_batches(split(make_cfg(tmp_path, tokenizer_dir, None)))
    split(cfg)
    (groups_file,) = cache_files(tmp_path / "cache", "dataset-preference_dataset")
    good = groups_file.read_bytes()
    if damage == "truncated":
        bad = good[: len(good) - 100]
    elif damage == "flipped byte":
        i = len(good) - 7  # inside the token payload: the header still parses
        bad = good[:i] + bytes([good[i] ^ 0x10]) + good[i + 1:]
    elif damage == "foreign key":
        other = tmp_path / "other.fastrm-data"
        data_cache.write_arrays(other, "0" * 32, "groups",
                                *data_cache.encode_groups(split(cfg).packed.units[:3]))
        bad = other.read_bytes()
    elif damage == "garbage":
        bad = os.urandom(len(good))
    else:
        bad = b""
    groups_file.write_bytes(bad)
    (tmp_path / "cache" / f".{groups_file.name}.tmp12345").write_bytes(good[:50])  # a crash's leftover
    caplog.set_level("WARNING", logger="fastrm.data.cache")
    rebuilt = split(cfg)
    assert "rebuilding" in caplog.text
    assert_same_batches(all_batches(rebuilt), want)
    assert groups_file.read_bytes() == good  # rewritten whole


def test_data_cache_dir_key(tmp_path, tokenizer_dir, monkeypatch):
    """``data_cache_dir``: a folder; null or false: no cache; absent or true: the default
    folder ($FASTRM_CACHE/data)."""
    from fastrm.training.config import ConfigError, validate_config

    monkeypatch.setenv("FASTRM_CACHE", str(tmp_path / "home_cache"))
    split(make_cfg(tmp_path, tokenizer_dir, tmp_path / "mine"))
    assert len(cache_files(tmp_path / "mine")) == 2
    for off in (None, False):
        cfg = make_cfg(tmp_path / f"off{off}", tokenizer_dir, None)
        cfg.data_cache_dir = off
        split(cfg)
    assert not (tmp_path / "home_cache").exists()
    split(make_cfg(tmp_path, tokenizer_dir, ...))  # absent
    assert len(cache_files(tmp_path / "home_cache" / "data")) == 2
    cfg = make_cfg(tmp_path, tokenizer_dir, ..., data_cache_dir=True)
    assert data_cache.cache_dir_from_config(cfg) == tmp_path / "home_cache" / "data"
    # the recipe's config check
    full = OmegaConf.load(REPO / "fastrm" / "recipes" / "configs" / "tiny_llama3_synthetic.yaml")
    full.data_cache_dir = 3
    with pytest.raises(ConfigError, match="data_cache_dir"):
        validate_config(full)
    full.data_cache_dir = None
    validate_config(full)


def test_unwritable_cache_folder_costs_the_cache_not_the_run(tmp_path, tokenizer_dir, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    caplog.set_level("WARNING", logger="fastrm.data.cache")
    got = all_batches(split(make_cfg(tmp_path, tokenizer_dir, blocker / "cache")))
    assert "could not write" in caplog.text
    assert_same_batches(got, all_batches(split(make_cfg(tmp_path, tokenizer_dir, None))))


@pytest.mark.parametrize("rank,local_rank,file_there,builds", [
    (0, 0, False, True),    # rank 0 builds what is missing
    (0, 0, True, False),    # ... and reads what is there
    (1, 1, True, False),    # other ranks read after the barriers
    (2, 0, False, True),    # a node's local rank 0 builds when its folder lacks the file
    (3, 1, False, True),    # last resort: a rank that still finds nothing builds
])
def test_who_builds_under_torchrun(tmp_path, monkeypatch, rank, local_rank, file_there, builds):
    """The order of :meth:`DataCache.prepared` (two barriers, rank 0 first, then each node's
    local rank 0), one rank at a time with the process group faked."""
    barriers = []
    monkeypatch.setattr(data_cache, "_rank", lambda: (rank, local_rank, True))
    monkeypatch.setattr(data_cache, "_barrier", lambda distributed: barriers.append(distributed))
    cache = DataCache(tmp_path)
    encode = lambda v: ({"v": torch.tensor(v).numpy()}, {})  # noqa: E731
    decode = lambda a, m: a["v"].tolist()  # noqa: E731
    if file_there:
        data_cache.write_arrays(cache.path("x", "k"), "k", "test", *encode([5, 6]))
    built = []
    value = cache.prepared("x", "k", "test", lambda: built.append(1) or [5, 6], encode, decode)
    assert value == [5, 6] and barriers == [True, True] and bool(built) == builds
    assert decode(*data_cache.read_arrays(cache.path("x", "k"), "k", "test")) == [5, 6]


def _ranks_worker(rank: int, world: int, port: int, root: str, shared: bool) -> None:
    """Two ranks of one process group; with ``shared=False`` rank 1 plays a second machine
    with its own cache folder (LOCAL_RANK 0 there)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank if shared else 0))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    root = Path(root)
    folder = root / ("shared" if shared or rank == 0 else "node1")

    def build():
        (root / f"built_by_{rank}").touch()
        return [7, rank * 0 + 11]

    encode = lambda v: ({"v": torch.tensor(v).numpy()}, {})  # noqa: E731
    decode = lambda a, m: a["v"].tolist()  # noqa: E731
    value = DataCache(folder).prepared("x", "k" * 32, "test", build, encode, decode)
    (root / f"value_{rank}").write_text(json.dumps(value))
    dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("shared", [True, False])
def test_rank_zero_builds_while_the_others_wait(tmp_path, free_port, shared):
    import torch.multiprocessing as mp

    mp.spawn(_ranks_worker, args=(2, free_port(), str(tmp_path), shared), nprocs=2, join=True)
    built = sorted(p.name for p in tmp_path.glob("built_by_*"))
    # one shared folder: rank 0 alone builds; a node with its own folder builds its copy
    assert built == (["built_by_0"] if shared else ["built_by_0", "built_by_1"])
    assert [json.loads((tmp_path / f"value_{r}").read_text()) for r in (0, 1)] == [[7, 11]] * 2


def test_recipe_rerun_reads_the_prepared_data_and_trains_the_same(tmp_path, caplog):
    """The recipe end to end: a run with the cache off, a first run that fills the cache and a
    rerun that reads it give the same losses; the rerun builds nothing."""
    from fixtures.recipes import run_recipe

    def run(name, cache) -> list[float]:
        cfg = OmegaConf.load(REPO / "fastrm" / "recipes" / "configs" / "tiny_llama3_synthetic.yaml")
        for k, v in {"output_dir": str(tmp_path / name), "max_steps_per_epoch": 3,
                     "data_cache_dir": cache, "num_threads": 1,
                     "dataset.num_prompts": 120, "validation_dataset.num_prompts": 40,
                     "dataset.length_scale": 0.15, "validation_dataset.length_scale": 0.15,
                     "dataset.max_seq_len": 256, "validation_dataset.max_seq_len": 256,
                     "packing.max_seq_len": 512}.items():
            OmegaConf.update(cfg, k, v, force_add=True)
        recipe = run_recipe(cfg)
        return [h["loss"] for h in recipe.history]

    off = run("off", None)
    first = run("first", str(tmp_path / "cache"))
    caplog.clear()
    caplog.set_level("INFO")
    again = run("again", str(tmp_path / "cache"))
    assert caplog.text.count("data cache: read") == 4 and "data cache: built" not in caplog.text
    assert len(off) == 3 and off == first == again
