"""Read the tokenizer files of an HF model directory (no transformers needed).

An HF model directory carries its tokenizer as

    tokenizer.json               the `tokenizers` pipeline (normalizer, pre-tokenizer, model,
                                 post-processor, added tokens)
    tokenizer_config.json        named special tokens (``bos_token``...), ``chat_template``
                                 (a string or a list of ``{"name", "template"}``)
    chat_template.jinja          the chat template (newer transformers save it here; it takes
                                 priority over ``tokenizer_config.json``)
    additional_chat_templates/   further named templates (``<name>.jinja``)
    special_tokens_map.json      named special tokens (legacy; fills what the config lacks)
    generation_config.json       ``bos_token_id`` / ``eos_token_id`` (an int or a list)

:class:`TokenizerFiles` collects them the way transformers' ``from_pretrained`` resolves them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from fastrm.models.chat_template import SPECIAL_TOKEN_VARIABLES

__all__ = ["TokenizerFiles"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "generation_config.json")


def _load_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); re-save the tokenizer files") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _token_text(value: Any) -> Optional[str]:
    """A special token as stored: a string, or an ``AddedToken`` dict with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


@dataclass
class TokenizerFiles:
    """The tokenizer files of one directory.

    Attributes:
        directory: the model (or tokenizer) directory.
        tokenizer_json: path of ``tokenizer.json``.
        config: ``tokenizer_config.json`` (``{}`` when absent).
        special_tokens: named special tokens (``bos_token`` ... ``mask_token``) -> text, only those
            set; from ``tokenizer_config.json``, missing ones from ``special_tokens_map.json``.
        chat_templates: template name -> Jinja text (a single template is named ``"default"``).
        generation_config: ``generation_config.json`` (``{}`` when absent).
    """

    directory: Path
    tokenizer_json: Path
    config: Dict[str, Any] = field(default_factory=dict)
    special_tokens: Dict[str, str] = field(default_factory=dict)
    chat_templates: Dict[str, str] = field(default_factory=dict)
    generation_config: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def read(cls, path: Union[str, Path]) -> "TokenizerFiles":
        """From a directory, or the path of its ``tokenizer.json``.

        Raises:
            ValueError: no ``tokenizer.json`` there, or a file that is not a JSON object.
        """
        p = Path(path).expanduser()
        tok = p / "tokenizer.json" if p.is_dir() else p
        if not tok.is_file():
            raise ValueError(
                f"path={path}: no tokenizer.json there; pass an HF model directory (tokenizer.json "
                "+ tokenizer_config.json, as `save_pretrained` writes) or the tokenizer.json file "
                "(`fastrm prepare smollm2` writes one for SmolLM2)")
        d = tok.parent
        config = _load_json(d / "tokenizer_config.json") if (d / "tokenizer_config.json").is_file() else {}
        smap = _load_json(d / "special_tokens_map.json") if (d / "special_tokens_map.json").is_file() else {}
        special: Dict[str, str] = {}
        for name in SPECIAL_TOKEN_VARIABLES:
            text = _token_text(config.get(name))
            if text is None and name not in config:
                text = _token_text(smap.get(name))
            if text is not None:
                special[name] = text
        gen = _load_json(d / "generation_config.json") if (d / "generation_config.json").is_file() else {}
        return cls(directory=d, tokenizer_json=tok, config=config, special_tokens=special,
                   chat_templates=cls._read_templates(d, config), generation_config=gen)

    @staticmethod
    def _read_templates(d: Path, config: Dict[str, Any]) -> Dict[str, str]:
        # template files take priority over tokenizer_config.json entries (transformers' rule)
        files: Dict[str, str] = {}
        if (d / "chat_template.jinja").is_file():
            files["default"] = (d / "chat_template.jinja").read_text(encoding="utf-8")
        extra = d / "additional_chat_templates"
        if extra.is_dir():
            for f in sorted(extra.glob("*.jinja")):
                files[f.stem] = f.read_text(encoding="utf-8")
        if files:
            return files
        value = config.get("chat_template")
        if value is None:
            return {}
        if isinstance(value, str):
            return {"default": value}
        if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                           and isinstance(t.get("template"), str) for t in value):
            return {t["name"]: t["template"] for t in value}
        raise ValueError(f"{d / 'tokenizer_config.json'}: chat_template must be a string or a list "
                         "of {'name': ..., 'template': ...}")

    def chat_template(self, name: Optional[str] = None) -> Optional[str]:
        """The template to use: ``name`` if given, else ``"default"`` (or the only one); None when
        the directory has no chat template.

        Raises:
            ValueError: ``name`` is not one of the templates, or several templates and no default.
        """
        if name is not None:
            if name not in self.chat_templates:
                raise ValueError(f"chat_template={name!r}: {self.directory} has templates "
                                 f"{sorted(self.chat_templates)}")
            return self.chat_templates[name]
        if not self.chat_templates:
            return None
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if len(self.chat_templates) == 1:
            return next(iter(self.chat_templates.values()))
        raise ValueError(f"{self.directory} has several chat templates and no 'default': pass "
                         f"chat_template=<one of {sorted(self.chat_templates)}>")

    def generation_eos_ids(self) -> List[int]:
        """``eos_token_id`` of ``generation_config.json`` as a list (Llama 3 lists several)."""
        v = self.generation_config.get("eos_token_id")
        if v is None:
            return []
        return [int(x) for x in (v if isinstance(v, list) else [v])]
