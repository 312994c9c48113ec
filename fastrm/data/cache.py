"""Prepared data, computed once: tokenized preference groups and packing plans on disk.

Tokenizing a real preference set is most of a run's start-up (qa-feedback with SmolLM2's
tokenizer: seconds per split; the same work on every rank of every run before this cache).
:class:`DataCache` keeps two kinds of files in one folder:

* ``<section>-<builder>-<key>.fastrm-data``: the groups a dataset builder produced (token ids,
  comparisons, margins, labels, provenance) and its statistics;
* ``<section>-plan-<key>.fastrm-data``: the packing plan (which groups share a row, rows per
  step, step order) of every epoch of the run.

The *data key* hashes everything the groups depend on: the dataset config section (builder and
arguments, interpolations resolved), the contents of the files it names (and of files a builder
reads by default, :func:`cache_inputs`), the tokenizer's config section, the contents of its
files (every non-weight file of a tokenizer directory) and its ids for a probe conversation,
the source code of fastrm's data path and of every component named, and
:data:`DATA_FORMAT_VERSION`. The *plan key* adds the packing section, the seed and the epochs.
Files are hashed by content (not mtime), so copies of a dataset on several machines agree.
A hub dataset (no local file) is keyed by its name and arguments: pin ``revision`` for it.

Files are written atomically (:func:`fastrm._io.atomic_path`) and carry their key, their
format version and a SHA-256 of their payload: a partial, corrupted, foreign or outdated file is
rebuilt (with a warning), never trusted. Under torchrun, global rank 0 builds what is missing
while the other ranks wait on a barrier (a gloo group with a 6-hour timeout, whatever the
training backend's), then every rank reads; where the cache folder is not
shared between machines, local rank 0 of each node builds its own copy after that barrier.
The folder is never pruned: delete it to reclaim space.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from fastrm._io import atomic_path
from fastrm.data.group import PreferenceGroup

log = logging.getLogger(__name__)

__all__ = ["DATA_FORMAT_VERSION", "DataCache", "PreparedGroups", "cache_dir_from_config",
           "data_key", "default_cache_dir", "plan_key"]

#: bump when the meaning of cached groups or plans changes without a source change in the data
#: path (the key also hashes those sources)
DATA_FORMAT_VERSION = 1

_MAGIC = b"FASTRMD1"
_SUFFIX = ".fastrm-data"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack",
                    ".onnx", ".npz", ".tflite")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".arrow", ".txt")
#: modules whose code decides what the cached groups and plans hold
_DATA_PATH_MODULES = (
    "fastrm.data.batch", "fastrm.data.dataset", "fastrm.data.formats", "fastrm.data.group",
    "fastrm.data.packing", "fastrm.data.planner", "fastrm.data.synthetic", "fastrm.datasets",
    "fastrm.data.cache", "fastrm.models.tokenizer", "fastrm.models.tokenizer_files",
    "fastrm.models.chat_template")
#: config keys that change how a build looks, not what it produces
_NOT_IN_KEY = ("progress",)


class CacheInvalid(Exception):
    """A cache file that must not be used (partial, corrupted, another key or version)."""


# ---------------------------------------------------------------------------------- location
def default_cache_dir() -> Path:
    """``$FASTRM_CACHE/data``, else ``~/.cache/fastrm/data``."""
    root = os.environ.get("FASTRM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "fastrm")
    return Path(root) / "data"


def cache_dir_from_config(cfg: Mapping[str, Any]) -> Optional[Path]:
    """The recipe's ``data_cache_dir``: absent -> :func:`default_cache_dir`; ``null`` or
    ``false`` -> ``None`` (no cache); ``true`` -> the default; a path -> that folder."""
    if "data_cache_dir" not in cfg:
        return default_cache_dir()
    value = cfg["data_cache_dir"]
    if value is None or value is False:
        return None
    if value is True:
        return default_cache_dir()
    return Path(str(value)).expanduser()


# ---------------------------------------------------------------------------------- keys
def _hash_file(path: Path, h: "hashlib._Hash") -> None:
    h.update(f"{path.stat().st_size}:".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)


def _fingerprint_path(path: Path, skip_weights: bool) -> str:
    """Content hash of a file, or of every file under a folder (relative names included)."""
    h = hashlib.sha256()
    if path.is_file():
        _hash_file(path, h)
        return h.hexdigest()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        if skip_weights and f.suffix.lower() in _WEIGHT_SUFFIXES:
            continue
        h.update(str(f.relative_to(path)).encode() + b"\0")
        _hash_file(f, h)
    return h.hexdigest()


def _named_path(value: Any, dirs: bool) -> Optional[Path]:
    """The existing file (or folder, when ``dirs``) a config string names. A string counts when
    it has a path separator or a data file suffix (so ``split: train`` is not read as a folder
    that happens to exist)."""
    if isinstance(value, str) and ("/" in value or os.sep in value
                                   or value.lower().endswith(_DATA_SUFFIXES)):
        p = Path(value).expanduser()
        if p.is_file() or (dirs and p.is_dir()):
            return p.resolve()
    return None


def _by_content(value: Any, skip_weights: bool) -> Any:
    """``value`` (a config section) with every string naming a file or folder replaced by the
    hash of its contents: where the data lies does not matter, what it holds does (copies on
    several machines give one key)."""
    if isinstance(value, Mapping):
        return {k: _by_content(v, skip_weights) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_by_content(v, skip_weights) for v in value]
    p = _named_path(value, dirs=True)
    if p is not None:
        return {"contents": _fingerprint_path(p, skip_weights)}
    return value


def _components(value: Any) -> list[str]:
    if isinstance(value, Mapping):
        own = [str(value["_component_"])] if "_component_" in value else []
        return own + [c for v in value.values() for c in _components(v)]
    if isinstance(value, (list, tuple)):
        return [c for v in value for c in _components(v)]
    return []


@functools.lru_cache(maxsize=None)
def _module_source_hash(module: str) -> str:
    mod = sys.modules.get(module)
    if mod is None:
        import importlib

        try:
            mod = importlib.import_module(module)
        except ImportError:
            return "unimportable"
    try:
        return hashlib.sha256(inspect.getsource(mod).encode()).hexdigest()
    except (OSError, TypeError):  # a built-in or compiled module: its version stands in
        return str(getattr(mod, "__version__", "no source"))


def _component_module(path: str) -> Optional[str]:
    from fastrm.training.config import resolve_component

    try:
        obj = resolve_component(path)
    except Exception:  # noqa: BLE001 - an unimportable component fails later, when built
        return None
    return getattr(obj, "__module__", None)


def _plain(cfg: Any) -> Any:
    """A config section as plain containers, interpolations resolved."""
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def cache_inputs(section: Mapping[str, Any]) -> list[Path]:
    """Files a dataset builder reads beyond the paths in its arguments: a builder lists them
    with a ``cache_inputs(**arguments)`` attribute (``qa_feedback_dataset``: its default data
    file)."""
    from fastrm.training.config import resolve_component

    comp = section.get("_component_")
    if comp is None:
        return []
    try:
        fn = resolve_component(comp)
    except Exception:  # noqa: BLE001
        return []
    extra = getattr(fn, "cache_inputs", None)
    if extra is None:
        return []
    args = {k: v for k, v in section.items() if k != "_component_"}
    return [Path(p).expanduser().resolve() for p in extra(**args) if Path(p).expanduser().exists()]


def _probe_ids(tokenizer: Any) -> Any:
    """The tokenizer's ids for a fixed conversation (catches a changed vocabulary or template
    that no file or argument shows)."""
    from torchtune.data import Message

    msgs = [Message(role="system", content="You are a careful assistant."),
            Message(role="user", content="Wie viel ist 2+2? \u00e9\u4e2d\U0001f600\n\tOK?"),
            Message(role="assistant", content=" Four (4).\n")]
    try:
        ids = [list(map(int, tokenizer.tokenize_messages(msgs)[0]))]
        try:
            ids.append(list(map(int, tokenizer.tokenize_messages(
                msgs[:2], add_generation_prompt=True)[0])))
        except TypeError:
            pass
        return ids
    except Exception as e:  # noqa: BLE001 - a tokenizer without the protocol: keyed by its type
        return f"no probe: {type(e).__name__}"


def _digest(spec: Any) -> str:
    blob = json.dumps(spec, sort_keys=True, default=repr, ensure_ascii=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def data_key(dataset_cfg: Any, tokenizer_cfg: Any, tokenizer: Any) -> str:
    """Key of the groups a dataset section builds with this tokenizer (see the module
    docstring for what it covers)."""
    ds = _plain(dataset_cfg)
    tok = _plain(tokenizer_cfg)
    ds_key = {k: v for k, v in ds.items() if k not in _NOT_IN_KEY}
    modules = set(_DATA_PATH_MODULES) | {type(tokenizer).__module__}
    modules |= {m for m in map(_component_module, _components(ds) + _components(tok)) if m}
    spec = {
        "version": DATA_FORMAT_VERSION,
        "dataset": _by_content(ds_key, skip_weights=False),
        "dataset_inputs": sorted(_fingerprint_path(p, skip_weights=False) for p in cache_inputs(ds)),
        "tokenizer": _by_content(tok, skip_weights=True),
        "tokenizer_type": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "tokenizer_probe": _probe_ids(tokenizer),
        "sources": {m: _module_source_hash(m) for m in sorted(modules)},
    }
    return _digest(spec)


def plan_key(data: str, packing: Any, seed: int, epochs: Sequence[int], train: bool) -> str:
    """Key of the packing plans of ``epochs`` of the groups keyed ``data``."""
    return _digest({"version": DATA_FORMAT_VERSION, "data": data, "packing": _plain(packing),
                    "seed": int(seed), "epochs": list(map(int, epochs)), "train": bool(train),
                    "sources": {m: _module_source_hash(m) for m in
                                ("fastrm.data.packing", "fastrm.data.planner",
                                 "fastrm.data.group", "fastrm.data.batch")}})


# ---------------------------------------------------------------------------------- file format
def write_arrays(path: Path, key: str, kind: str, arrays: Mapping[str, np.ndarray],
                 meta: Mapping[str, Any]) -> None:
    """``MAGIC | u64 header length | header JSON | payload`` written atomically; the header
    holds the key, the kind, the format version, ``meta``, each array's dtype/shape/offset and
    the payload's length and SHA-256."""
    specs, parts, offset = [], [], 0
    h = hashlib.sha256()
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        buf = a.tobytes()
        specs.append([name, a.dtype.str, list(a.shape), offset, len(buf)])
        parts.append(buf)
        h.update(buf)
        offset += len(buf)
    header = json.dumps({"version": DATA_FORMAT_VERSION, "key": key, "kind": kind,
                         "meta": meta, "arrays": specs, "payload_bytes": offset,
                         "payload_sha256": h.hexdigest()}, ensure_ascii=True).encode()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(_MAGIC + struct.pack("<Q", len(header)) + header)
            for buf in parts:
                f.write(buf)
            f.flush()
            os.fsync(f.fileno())


def read_arrays(path: Path, key: str, kind: str) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays and meta of a file :func:`write_arrays` wrote under ``key``.

    Raises:
        CacheInvalid: missing, truncated, corrupted, another key, kind or format version.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CacheInvalid(f"cannot read: {e}") from None
    if data[:8] != _MAGIC or len(data) < 16:
        raise CacheInvalid("not a fastrm data file (bad magic)")
    (n,) = struct.unpack("<Q", data[8:16])
    try:
        header = json.loads(data[16:16 + n])
    except ValueError as e:
        raise CacheInvalid(f"header unreadable ({e})") from None
    if not isinstance(header, dict):
        raise CacheInvalid("header unreadable")
    if header.get("version") != DATA_FORMAT_VERSION:
        raise CacheInvalid(f"format version {header.get('version')} != {DATA_FORMAT_VERSION}")
    if header.get("key") != key or header.get("kind") != kind:
        raise CacheInvalid(f"holds {header.get('kind')} {header.get('key')}, not {kind} {key}")
    payload = memoryview(data)[16 + n:]
    if len(payload) != header["payload_bytes"]:
        raise CacheInvalid(f"payload has {len(payload)} bytes, header says "
                           f"{header['payload_bytes']} (partial file)")
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        raise CacheInvalid("payload checksum mismatch (corrupted)")
    arrays = {}
    for name, dtype, shape, off, nbytes in header["arrays"]:
        arrays[name] = np.frombuffer(payload[off:off + nbytes], dtype=np.dtype(dtype)).reshape(shape)
    return arrays, header["meta"]


# ---------------------------------------------------------------------------------- groups
class PreparedGroups:
    """The groups of a dataset builder as the cache holds them: a sequence of
    :class:`PreferenceGroup` with the builder's ``stats`` and ``num_prompts``."""

    def __init__(self, groups: list[PreferenceGroup], stats: Optional[dict] = None,
                 num_prompts: Optional[int] = None) -> None:
        self.groups = groups
        self.stats = dict(stats or {})
        self.num_prompts = num_prompts

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> PreferenceGroup:
        return self.groups[i]


def _json_safe(v: Any) -> Any:
    if isinstance(v, tuple):
        return {"__tuple__": [_json_safe(x) for x in v]}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    if isinstance(v, (np.integer,)):
        return int(v)
    return v


def _from_json(v: Any) -> Any:
    if isinstance(v, dict) and set(v) == {"__tuple__"}:
        return tuple(_from_json(x) for x in v["__tuple__"])
    if isinstance(v, list):
        return [_from_json(x) for x in v]
    return v


def encode_groups(data: Sequence[PreferenceGroup]) -> tuple[dict[str, np.ndarray], dict]:
    """Flat arrays + JSON meta of ``data`` (any sequence of groups; its ``stats`` and
    ``num_prompts`` when it has them)."""
    groups = [data[i] for i in range(len(data))]
    tokens: list[int] = []
    prompt_len, n_resp, resp_len, n_comp, ci, cj, cm, has_m = [], [], [], [], [], [], [], []
    has_labels, labels = [], []
    for g in groups:
        prompt_len.append(len(g.prompt_tokens))
        tokens.extend(g.prompt_tokens)
        n_resp.append(len(g.responses))
        for r in g.responses:
            resp_len.append(len(r))
            tokens.extend(r)
        n_comp.append(len(g.comparisons))
        for i, j, m in g.comparisons:
            ci.append(i)
            cj.append(j)
            cm.append(0.0 if m is None else float(m))
            has_m.append(m is not None)
        has_labels.append(g.labels is not None)
        labels.extend(g.labels or [])
    arrays = {
        "tokens": np.asarray(tokens, np.int32 if max(tokens, default=0) < 2**31 else np.int64), "prompt_len": np.asarray(prompt_len, np.int64),
        "num_responses": np.asarray(n_resp, np.int64), "response_len": np.asarray(resp_len, np.int64),
        "num_comparisons": np.asarray(n_comp, np.int64), "comp_i": np.asarray(ci, np.int64),
        "comp_j": np.asarray(cj, np.int64), "comp_margin": np.asarray(cm, np.float64),
        "comp_has_margin": np.asarray(has_m, np.bool_),
        "prompt_id": np.asarray([g.prompt_id for g in groups], np.int64),
        "has_labels": np.asarray(has_labels, np.bool_), "labels": np.asarray(labels, np.int64),
    }
    stats = getattr(data, "stats", None)
    meta = {
        "source_index": [_json_safe(g.source_index) for g in groups],
        "prompt_text": [g.prompt_text for g in groups],
        "category": [g.category for g in groups],
        "stats": {k: v for k, v in (stats or {}).items() if isinstance(v, (int, float, str))},
        "num_prompts": getattr(data, "num_prompts", None),
        "built_by": type(data).__name__,
    }
    return arrays, meta


def decode_groups(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> PreparedGroups:
    tokens = arrays["tokens"].tolist()
    margins = arrays["comp_margin"].tolist()
    has_m = arrays["comp_has_margin"].tolist()
    ci, cj = arrays["comp_i"].tolist(), arrays["comp_j"].tolist()
    resp_len = arrays["response_len"].tolist()
    labels = arrays["labels"].tolist()
    t = r = c = lab = 0
    groups = []
    for gi, (p, k, nc, hl) in enumerate(zip(arrays["prompt_len"].tolist(),
                                            arrays["num_responses"].tolist(),
                                            arrays["num_comparisons"].tolist(),
                                            arrays["has_labels"].tolist())):
        prompt = tokens[t:t + p]
        t += p
        responses = []
        for n in resp_len[r:r + k]:
            responses.append(tokens[t:t + n])
            t += n
        r += k
        comps = [(ci[x], cj[x], margins[x] if has_m[x] else None) for x in range(c, c + nc)]
        c += nc
        glabels = None
        if hl:
            glabels = labels[lab:lab + k]
            lab += k
        groups.append(PreferenceGroup(
            prompt_tokens=prompt, responses=responses, comparisons=comps,
            prompt_id=int(arrays["prompt_id"][gi]),
            source_index=_from_json(meta["source_index"][gi]), labels=glabels,
            prompt_text=meta["prompt_text"][gi], category=meta["category"][gi]))
    if t != len(tokens) or r != len(resp_len) or c != len(ci) or lab != len(labels):
        raise CacheInvalid("array lengths disagree with the group counts")
    return PreparedGroups(groups, meta.get("stats"), meta.get("num_prompts"))


# ---------------------------------------------------------------------------------- plans
def encode_plans(plans: Mapping[int, tuple[list[list[np.ndarray]], int]]) -> tuple[dict, dict]:
    """Per epoch: ``(steps, num_rows)`` with steps = lists of rows of unit indices."""
    arrays, meta = {}, {"epochs": {}}
    for epoch, (steps, num_rows) in plans.items():
        rows = [row for step in steps for row in step]
        arrays[f"units_{epoch}"] = (np.concatenate(rows).astype(np.int64) if rows
                                    else np.zeros(0, np.int64))
        arrays[f"row_len_{epoch}"] = np.asarray([len(row) for row in rows], np.int64)
        arrays[f"step_rows_{epoch}"] = np.asarray([len(step) for step in steps], np.int64)
        meta["epochs"][str(epoch)] = int(num_rows)
    return arrays, meta


def decode_plans(arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                 num_units: int) -> dict[int, tuple[list[list[np.ndarray]], int]]:
    plans = {}
    for epoch, num_rows in meta["epochs"].items():
        units = np.array(arrays[f"units_{epoch}"])
        row_len = arrays[f"row_len_{epoch}"]
        step_rows = arrays[f"step_rows_{epoch}"]
        if int(row_len.sum()) != units.size or int(step_rows.sum()) != row_len.size:
            raise CacheInvalid(f"plan of epoch {epoch}: lengths disagree")
        if units.size and (units.min() < 0 or units.max() >= num_units):
            raise CacheInvalid(f"plan of epoch {epoch} names groups outside [0, {num_units})")
        rows = np.split(units, np.cumsum(row_len)[:-1]) if row_len.size else []
        bounds = np.concatenate([[0], np.cumsum(step_rows)]).tolist()
        plans[int(epoch)] = ([rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])], int(num_rows))
    return plans


# ---------------------------------------------------------------------------------- the cache
def _rank() -> tuple[int, int, bool]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), int(os.environ.get("LOCAL_RANK", dist.get_rank())), True
    return 0, 0, False


#: (default process group, gloo group the waiting ranks block on)
_WAIT_GROUP: Optional[tuple[Any, Any]] = None
#: how long the other ranks wait for rank 0 to prepare the data (NCCL's default 10 min is too
#: short for tokenizing a large set)
WAIT_TIMEOUT_S = 6 * 3600


def _barrier(distributed: bool) -> None:
    """A barrier on a gloo group with a :data:`WAIT_TIMEOUT_S` timeout (created once per
    process group, by every rank at its first call)."""
    if not distributed:
        return
    import datetime

    import torch.distributed as dist

    global _WAIT_GROUP
    world = dist.group.WORLD
    if _WAIT_GROUP is None or _WAIT_GROUP[0] is not world:
        _WAIT_GROUP = (world, dist.new_group(
            backend="gloo", timeout=datetime.timedelta(seconds=WAIT_TIMEOUT_S)))
    dist.barrier(group=_WAIT_GROUP[1])


class DataCache:
    """A folder of prepared data (see the module docstring); ``logger`` receives what was read,
    built or rebuilt (the recipe passes torchtune's, so it shows in the run's output)."""

    def __init__(self, directory: str | os.PathLike, logger: Optional[logging.Logger] = None) -> None:
        self.directory = Path(directory)
        self.log = logger or log

    def path(self, name: str, key: str) -> Path:
        return self.directory / f"{name}-{key}{_SUFFIX}"

    def prepared(self, name: str, key: str, kind: str, build: Callable[[], Any],
                 encode: Callable[[Any], tuple[dict, dict]],
                 decode: Callable[[dict, dict], Any]) -> Any:
        """The object cached under ``(name, key)``: read when a valid file is there, else
        built by ``build()`` and written. Under torchrun every rank must call this (it holds
        two barriers): rank 0 first, then each node's local rank 0, then the rest."""
        rank, local_rank, distributed = _rank()
        path = self.path(name, key)
        value = None
        if rank == 0:
            value = self._load_or_build(path, key, kind, build, encode, decode)
        _barrier(distributed)
        if value is None and local_rank == 0:  # a node whose cache folder is its own
            value = self._load_or_build(path, key, kind, build, encode, decode)
        _barrier(distributed)
        if value is None:
            value = self._load_or_build(path, key, kind, build, encode, decode)
        return value

    def _load_or_build(self, path: Path, key: str, kind: str, build, encode, decode) -> Any:
        if path.exists():
            t0 = time.perf_counter()
            try:
                arrays, meta = read_arrays(path, key, kind)
                value = decode(arrays, meta)
            except CacheInvalid as e:
                self.log.warning("data cache: %s is not usable (%s); rebuilding it", path, e)
            else:
                self.log.info("data cache: read %s (%.2f s)", path, time.perf_counter() - t0)
                return value
        t0 = time.perf_counter()
        value = build()
        built = time.perf_counter() - t0
        arrays, meta = encode(value)
        try:
            write_arrays(path, key, kind, arrays, meta)
        except OSError as e:  # a read-only or full disk costs the cache, not the run
            self.log.warning("data cache: could not write %s (%s); continuing without it", path, e)
        else:
            self.log.info("data cache: built %s in %.2f s -> %s", kind, built, path)
        return value

    def groups(self, name: str, key: str, build: Callable[[], Sequence[PreferenceGroup]]) -> Any:
        """The groups of a dataset section: the builder's own object when this process built
        them, else :class:`PreparedGroups` read from the cache."""
        return self.prepared(name, key, "groups", build, encode_groups, decode_groups)

    def plans(self, name: str, key: str, build: Callable[[], Mapping[int, Any]],
              num_units: int) -> dict:
        """Packing plans per epoch (:meth:`fastrm.data.PackedPreferenceDataset.plan_epoch`)."""
        return self.prepared(name, key, "plans", build, encode_plans,
                             lambda a, m: decode_plans(a, m, num_units))
