"""Every snippet of the README and docs/ runs as pasted.

Python blocks are executed whole, in a fresh namespace, from a folder that holds the repository's `examples/`
(the shipped data): only the models are swapped for tiny ones built from their configs (and a hub name, which
cannot be downloaded here, for a config of the same family with the MiniLM tokenizer), so a snippet trains in
seconds but runs every line a user pastes. Shell blocks are checked without training: every `lets-hf` or
example-script command parses with that command's own parser, and every script it names exists.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shlex
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer, BartConfig, BertConfig, LlamaConfig

from lets_hf.cli import parse_command_line
from lets_hf.tasks.glue import CLI_DEFAULTS, GlueArguments, resolve_model_path
from lets_hf.tasks.iwslt14.main import parse_args as parse_iwslt_args
from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MINILM_VOCAB = 30522
#: Hub names the docs use, and the tiny config of the same family that the test trains in their place.
HUB_STAND_INS = {
    "bert-base-uncased": BertConfig(vocab_size=MINILM_VOCAB),
    "facebook/bart-base": BartConfig(vocab_size=MINILM_VOCAB, pad_token_id=0, bos_token_id=101, eos_token_id=102,
                                     decoder_start_token_id=101, forced_eos_token_id=102),
    "Qwen/Qwen2.5-0.5B": LlamaConfig(vocab_size=MINILM_VOCAB, pad_token_id=0),
}
#: What makes each family tiny.
TINY_SHAPES = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
    "bart": dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                 encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64),
    "llama": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                  intermediate_size=64),
}


def code_blocks(language: str) -> list[tuple[str, str]]:
    """(`file:line`, code) of every fenced block in that language."""
    blocks = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(rf"^ *```{language}\n(.*?)^ *```", text, re.S | re.M):  # list items indent theirs
            line = text[: match.start()].count("\n") + 1
            blocks.append((f"{path.relative_to(REPO)}:{line}", textwrap.dedent(match.group(1))))
    return blocks


def tiny_config(name_or_path: str, **config_overrides):
    if name_or_path in HUB_STAND_INS:
        config = HUB_STAND_INS[name_or_path].__class__.from_dict(HUB_STAND_INS[name_or_path].to_dict())
    else:
        config = AutoConfig.from_pretrained(name_or_path)
    for key, value in {**TINY_SHAPES[config.model_type], **config_overrides}.items():
        setattr(config, key, value)
    return config


@pytest.fixture
def tiny_models(monkeypatch, tmp_path):
    """Auto classes build tiny models from configs; hub tokenizers are the MiniLM one; cwd holds examples/."""

    def from_pretrained(cls, name_or_path, *args, **kwargs):
        torch.manual_seed(0)
        return cls.from_config(tiny_config(str(name_or_path), **kwargs))

    load_tokenizer = AutoTokenizer.from_pretrained

    def tokenizer_from_pretrained(name_or_path, *args, **kwargs):
        if str(name_or_path) in HUB_STAND_INS:
            tokenizer = load_tokenizer(resolve_model_path("minilm"))
            tokenizer.eos_token, tokenizer.bos_token = tokenizer.sep_token, tokenizer.cls_token
            return tokenizer
        return load_tokenizer(name_or_path, *args, **kwargs)

    for name in dir(transformers):  # each auto class holds its own copy of `from_pretrained`
        if name.startswith("AutoModel"):
            monkeypatch.setattr(getattr(transformers, name), "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", tokenizer_from_pretrained)
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    return tmp_path


PYTHON_BLOCKS = code_blocks("python")


def test_the_docs_have_python_snippets():
    assert len(PYTHON_BLOCKS) >= 5 and any(where.startswith("README.md") for where, _ in PYTHON_BLOCKS)


@pytest.mark.parametrize("where,code", PYTHON_BLOCKS, ids=[where for where, _ in PYTHON_BLOCKS])
def test_python_snippet_runs_as_pasted(tiny_models, one_thread, where, code):
    exec(compile(code, where, "exec"), {"__name__": "__main__"})


# ---------------------------------------------------------------------------- shell blocks


@functools.cache
def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"examples.{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _parse_glue(argv):
    parse_command_line(GlueArguments, argv, defaults=CLI_DEFAULTS)


#: The commands whose flags the test parses: `lets-hf <task>` and the example scripts that share their parsers.
PARSERS = {
    "lets-hf glue": _parse_glue,
    "lets-hf iwslt14": parse_iwslt_args,
    "examples/run_glue.py": _parse_glue,
    "examples/run_iwslt14.py": parse_iwslt_args,
    "examples/accelerate_loop.py": lambda argv: _load_example("accelerate_loop").parse_args(argv),
}


def shell_commands() -> list[tuple[str, str]]:
    """(`file:line`, command) of every command in a bash block, continuation lines joined, comments cut."""
    commands = []
    for where, block in code_blocks("bash"):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.split(" #")[0].strip()
            if command and not command.startswith("#"):
                commands.append((where, command))
    return commands


def test_every_script_a_shell_block_names_exists():
    named = {(where, path) for where, command in shell_commands() for path in re.findall(r"\b(\S+\.py)\b", command)}
    assert named
    missing = [f"{where}: {path}" for where, path in named if not (REPO / path).is_file()]
    assert not missing, missing


PARSED = [(where, command) for where, command in shell_commands() if any(key in command for key in PARSERS)
          and not command.endswith("...")]


@pytest.mark.parametrize("where,command", PARSED, ids=[f"{where} {command[:40]}" for where, command in PARSED])
def test_shell_command_flags_parse(where, command):
    words = shlex.split(command)
    for key, parse in PARSERS.items():
        if key in command:
            first = next(i for i, word in enumerate(words) if word.endswith(key.split()[-1]))
            parse(words[first + 1:])
            return
