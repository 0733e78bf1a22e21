"""Shared fixtures: the embedded default model and tiny random models per architecture.

Tiny models are built from configs (no download) and borrow SmolLM2's tokenizer, so
every adapter row can be exercised offline in well under a second.
"""

from __future__ import annotations

import pytest
import torch

from editkit.adapters import get_adapter
from editkit.models import LoadedModel, load_model

# (model_type, config class name, config kwargs) for a tiny model of each adapter row.
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("GPT2Config", dict(n_layer=3, n_embd=32, n_head=4, n_positions=256)),
    "gptj": ("GPTJConfig", dict(n_layer=3, n_embd=32, n_head=4, rotary_dim=4, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=256)),
    "opt": ("OPTConfig", dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, ffn_dim=64,
                              word_embed_proj_dim=32, max_position_embeddings=256)),
    "llama": ("LlamaConfig", dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)),
    "mistral": ("MistralConfig", dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)),
    "qwen2": ("Qwen2Config", dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)),
    "qwen3": ("Qwen3Config", dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, head_dim=8,
                                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)),
    "gemma": ("GemmaConfig", dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, head_dim=8,
                                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)),
    "gemma2": ("Gemma2Config", dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4, head_dim=8,
                                    num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)),
    "gemma3_text": ("Gemma3TextConfig", dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                             head_dim=8, num_key_value_heads=2, intermediate_size=64,
                                             max_position_embeddings=256, sliding_window=64)),
    "olmo2": ("Olmo2Config", dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)),
}


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's small models on one thread (restored afterwards).

    On a shared 2-core machine, two OpenMP threads wait on each other at every
    operation whenever another process holds a core: the benchmark tests then
    took 5 minutes instead of 15 seconds.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def session_cache(tmp_path_factory, monkeypatch):
    """``EDITKIT_CACHE`` -> one folder for the test session: statistics of tiny models and
    briefly trained artifacts are shared between tests but never reach the user's cache."""
    monkeypatch.setenv("EDITKIT_CACHE", str(tmp_path_factory.getbasetemp() / "editkit-cache"))


@pytest.fixture(scope="session")
def smollm2() -> LoadedModel:
    """The embedded default model (converted once into the cache, then ~0.3 s to load)."""
    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def make_tiny(smollm2):
    """Factory: ``make_tiny(model_type, seed=0)`` -> a tiny random :class:`LoadedModel`."""
    import transformers

    tokenizer = smollm2.tokenizer

    def build(model_type: str, seed: int = 0) -> LoadedModel:
        class_name, kwargs = TINY_CONFIGS[model_type]
        config = getattr(transformers, class_name)(
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **kwargs
        )
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        model.requires_grad_(False)
        adapter = get_adapter(config.model_type)
        adapter.validate(model)
        return LoadedModel(model=model, tokenizer=tokenizer, adapter=adapter, name=f"tiny-{model_type}",
                           source=f"random init seed {seed}")

    return build


@pytest.fixture(scope="session")
def tiny_llama_folder(make_tiny, tmp_path_factory) -> str:
    """A tiny random Llama saved to a local folder, loadable by name like any user's model."""
    lm = make_tiny("llama")
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def saved_root(make_tiny, tmp_path_factory):
    """A finished study on the tiny Llama (ROME, checkpoints 0-3): its results root and its results."""
    from editkit.runs import run_study
    from tests.test_integrity import tiny_config

    root = tmp_path_factory.mktemp("saved")
    return root, run_study(tiny_config(root), progress=False, lm=make_tiny("llama"))
