"""The public contract: names, docstrings, type hints and the command line."""

from __future__ import annotations

import inspect
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import attnlib

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", attnlib.__all__)
def test_public_names_documented_and_typed(name):
    obj = getattr(attnlib, name)
    doc = inspect.getdoc(obj) or ""
    assert "chapter" in doc.lower(), f"{name}'s docstring should say which chapter teaches it"
    fn = obj.forward if inspect.isclass(obj) and hasattr(obj, "forward") else obj
    fn = fn.__init__ if inspect.isclass(fn) else fn
    sig = inspect.signature(fn)
    missing = [p for p in sig.parameters.values()
               if p.name not in ("self", "cls") and p.annotation is inspect.Parameter.empty]
    assert not missing, f"{name}: parameters without type hints: {[p.name for p in missing]}"


def test_signatures_of_the_contract():
    expect = {
        "scaled_dot_product_attention": ["query", "key", "value", "attn_mask", "dropout_p",
                                         "is_causal", "scale", "enable_gqa", "generator"],
        "attention_weights": ["query", "key", "attn_mask", "is_causal", "scale", "enable_gqa"],
        "causal_mask": ["L", "S", "device"],
        "padding_mask": ["lengths", "S"],
        "repeat_kv": ["x", "n_rep"],
        "kv_cache_bytes": ["n_layers", "n_kv_heads", "head_dim", "seq_len", "batch", "dtype"],
        "flash_attention": ["query", "key", "value", "is_causal", "scale", "block_q", "block_k",
                            "return_lse"],
        "sliding_window_attention": ["query", "key", "value", "window", "causal"],
        "linear_attention": ["query", "key", "value", "causal", "feature_map"],
        "sink_window_mask": ["L", "window", "n_sink", "S"],
        "softcap": ["scores", "cap"],
    }
    for name, params in expect.items():
        assert list(inspect.signature(getattr(attnlib, name)).parameters) == params, name
    # chapter 12 (issue 13): the names the chapter, its exercises and tests share
    classes = {
        "TransformerBlock": (["d_model", "n_heads", "n_kv_heads", "d_ff"], ["x", "kv_cache", "attn_mask"]),
        "TinyGPT": (["vocab_size", "d_model", "n_heads", "n_layers", "max_len", "n_kv_heads"], ["idx", "kv_cache", "attn_mask"]),
        "PagedKVCache": (["n_blocks", "block_size", "n_kv_heads", "head_dim", "dtype"], None),
        "MultiHeadLatentAttention": (["d_model", "n_heads", "head_dim", "kv_rank", "rope_dim"],
                                     ["x", "is_causal", "absorb"]),
    }
    for name, (init, forward) in classes.items():
        cls = getattr(attnlib, name)
        assert list(inspect.signature(cls).parameters)[:len(init)] == init, name
        if forward is not None:
            assert list(inspect.signature(cls.forward).parameters)[1:len(forward) + 1] == forward, name
    assert list(inspect.signature(attnlib.TinyGPT.generate).parameters) == ["self", "idx", "max_new_tokens",
                                                                            "use_cache"]
    for method in ("append", "gather", "block_table", "free"):
        assert callable(getattr(attnlib.PagedKVCache, method)), method
    assert list(inspect.signature(attnlib.mla_kv_cache_bytes).parameters) == [
        "n_layers", "kv_rank", "rope_dim", "seq_len", "batch", "dtype"]
    mha = inspect.signature(attnlib.MultiHeadAttention.forward).parameters
    assert list(mha) == ["self", "x", "context", "attn_mask", "is_causal", "kv_cache"]
    assert list(inspect.signature(attnlib.KVCache).parameters) == []


def test_console_script_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["attnlib"] == "attnlib.cli:main"


def test_selfcheck_command_passes():
    run = subprocess.run([sys.executable, "-m", "attnlib.cli", "selfcheck"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.count("ok ") == 4 and "FAIL" not in run.stdout


def test_cli_version_and_help():
    run = subprocess.run([sys.executable, "-m", "attnlib.cli", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert run.stdout.strip() == f"attnlib {attnlib.__version__}"
    run = subprocess.run([sys.executable, "-m", "attnlib.cli"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "selfcheck" in run.stdout


@pytest.mark.parametrize("module", attnlib.CONCEPT_MODULES, ids=lambda m: m.__name__)
def test_each_concept_module_exports_its_public_functions_and_classes(module):
    """A concept module's __all__ is exactly its public functions and classes, and each is
    ``attnlib.<name>``: adding a reference needs no edit outside its own module."""
    public = [name for name, obj in vars(module).items()
              if not name.startswith("_") and (inspect.isfunction(obj) or inspect.isclass(obj))
              and obj.__module__ == module.__name__]
    assert sorted(module.__all__) == sorted(public), f"{module.__name__}.__all__ must list {public}"
    for name in module.__all__:
        assert getattr(attnlib, name) is getattr(module, name), name
    assert set(module.__all__) <= set(attnlib.__all__)


def test_every_concept_module_is_listed():
    """Every module of attnlib that defines public functions or classes (outside grading, the
    command line and the helpers for pages) is a concept module."""
    import pkgutil

    # triton_flash is an optional extra: it needs the triton package, which importing
    # attnlib must not (tests/test_triton_flash.py checks that).
    helpers = {"cli", "measure", "plotting", "grading", "__main__", "triton_flash"}
    listed = {m.__name__.rsplit(".", 1)[1] for m in attnlib.CONCEPT_MODULES}
    found = {m.name for m in pkgutil.iter_modules(attnlib.__path__) if not m.name.startswith("_")}
    assert found - helpers == listed
