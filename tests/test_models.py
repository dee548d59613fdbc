from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atlas.models import LoadedModel, ModelLoadError, load_model
from atlas.models.tiny import TINY_MODELS, build_tiny_hf_model, tiny_tokenizer
from tests.tolerances import assert_close_at_scale


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_tiny_models_match_their_hf_model_and_expose_hooks(name: str) -> None:
    loaded = load_model(name)
    tokenizer = tiny_tokenizer()
    reference = build_tiny_hf_model(TINY_MODELS[name], vocab_size=len(tokenizer))
    ids = loaded.tokenize("hello world")
    with torch.no_grad():
        ours = loaded.model(ids)
        theirs = reference(ids).logits
    assert ours.shape == (1, ids.shape[1], loaded.info.vocab_size)
    assert_close_at_scale(ours, theirs, what=f"{name} logits vs Hugging Face")
    _, cache = loaded.model.run_with_cache(ids)
    for layer in range(loaded.info.n_layers):
        for hook in ("mlp.hook_in", "mlp.hook_out", "hook_resid_mid", "attn.hook_pattern", "ln2.hook_scale"):
            assert f"blocks.{layer}.{hook}" in cache


def test_tiny_architectures_differ_as_intended(tiny_gpt2: LoadedModel, tiny_llama: LoadedModel) -> None:
    assert tiny_gpt2.info.architecture == "GPT2LMHeadModel"
    assert tiny_llama.info.architecture == "LlamaForCausalLM"
    llama_cfg = tiny_llama.model.original_model.config
    assert llama_cfg.num_key_value_heads < llama_cfg.num_attention_heads  # grouped-query attention
    assert hasattr(tiny_gpt2.model.original_model.transformer, "wpe")  # absolute positions


def test_local_directory_loads(tmp_path: Path) -> None:
    tokenizer = tiny_tokenizer()
    hf = build_tiny_hf_model(TINY_MODELS["tiny-llama"], vocab_size=len(tokenizer))
    hf.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert loaded.info.source == "local-dir" and loaded.info.n_layers == 2
    ids = loaded.tokenize("abc")
    with torch.no_grad():
        assert_close_at_scale(loaded.model(ids), hf(ids).logits, what="local-dir logits vs Hugging Face")


def test_bad_model_names_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(str(tmp_path / "empty"))


def test_hub_model_offline_fails_with_a_clear_message() -> None:
    """The hub route is the real one; offline it must end in one readable line, not a traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "atlas_cli", "model", "info", "--model", "gpt2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "could not load 'gpt2' from the Hugging Face hub" in message
    assert "HF_HUB_OFFLINE=1 is set" in message
    assert "Traceback" not in result.stderr
