"""Loading a model as a user would: what goes wrong says so in one line; the vocabulary table."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from app.errors import NeedleError
from tests.hubserver import counting_hub, point_hub_at
from tests.tinymodels import (
    SCRIPT_TOKEN,
    build_tiny,
    build_unsupported,
    build_without_mlp,
)
from workers.adapters import supported_model_types
from workers.loading import (
    LoadedModel,
    load_model,
    resolve_device,
    resolve_dtype,
    tokenizer_json,
    vocabulary,
)

CLOSED_PORT = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once
CLOSED_URL_TEMPLATE = CLOSED_PORT + "/{repo_id}/resolve/{revision}/{filename}"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = build_tiny(family, root / family)
        return built[family]

    return get


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(NeedleError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert message and "\n" not in message and "Traceback" not in message
    return message


# ---- what a user gets back ------------------------------------------------------------------


def test_load_a_local_folder(tiny_dir):
    loaded = load_model(str(tiny_dir("gpt2")), device="cpu")
    assert isinstance(loaded, LoadedModel)
    assert (loaded.device, loaded.dtype) == ("cpu", "float32")
    assert loaded.source == str(tiny_dir("gpt2"))
    assert loaded.config.model_type == "gpt2"
    assert loaded.adapter.family == "gpt2" and loaded.adapter.n_layers == 2
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert next(loaded.model.parameters()).dtype == torch.float32


def test_owner_slash_name_that_exists_locally_is_a_folder(tiny_dir, tmp_path, monkeypatch):
    shutil.copytree(tiny_dir("llama"), tmp_path / "acme" / "tiny-llama")
    monkeypatch.chdir(tmp_path)
    assert load_model("acme/tiny-llama", device="cpu").adapter.family == "llama"


def test_explicit_dtype(tiny_dir):
    loaded = load_model(str(tiny_dir("qwen2")), device="cpu", dtype="float16")
    assert loaded.dtype == "float16"
    assert next(loaded.model.parameters()).dtype == torch.float16


# ---- errors, each one clear line --------------------------------------------------------------


def test_unknown_architecture_is_refused_before_weights_are_read(tmp_path):
    path = build_unsupported(tmp_path / "bert")
    (path / "model.safetensors").unlink()  # the check must come before any weights are looked for
    message = one_line_error(load_model, str(path))
    assert "'bert'" in message and "BertForMaskedLM" in message
    for supported in supported_model_types():
        assert supported in message


def test_model_type_transformers_does_not_know(tmp_path):
    config = {"model_type": "made_up_lm", "architectures": ["MadeUpForCausalLM"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    message = one_line_error(load_model, str(tmp_path))
    assert "made_up_lm" in message and "MadeUpForCausalLM" in message and "llama" in message


@pytest.mark.parametrize("source", ["./no/such/model", "../nowhere", "~/no-such-needle-model", "a/b/c"])
def test_missing_folder(source):
    assert one_line_error(load_model, source) == f"no such folder: {source}"


def test_missing_absolute_folder(tmp_path):
    missing = tmp_path / "gone"
    assert one_line_error(load_model, str(missing)) == f"no such folder: {missing}"


def test_hub_id_with_failing_hub_asks_once(tmp_path, monkeypatch):
    """A hub that answers 503 (a status huggingface_hub's backoff retries) is asked once: no retries."""
    with counting_hub(status=503) as hub:
        point_hub_at(monkeypatch, hub.url, tmp_path / "hub-cache")
        message = one_line_error(load_model, "EleutherAI/pythia-70m")
    assert hub.requests == [("HEAD", "/EleutherAI/pythia-70m/resolve/main/config.json")]
    assert "could not load 'EleutherAI/pythia-70m' from the Hugging Face hub (no connection: " in message
    assert "503 Service Unavailable" in message
    assert "local folder" in message


def test_hub_id_with_unreachable_hub(tmp_path, monkeypatch):
    """A closed local port: the connection is refused, and that is said in one line."""
    point_hub_at(monkeypatch, CLOSED_PORT, tmp_path / "hub-cache")
    message = one_line_error(load_model, "EleutherAI/pythia-70m")
    assert "could not load 'EleutherAI/pythia-70m' from the Hugging Face hub (no connection: " in message
    assert "refused" in message.lower()
    assert "local folder" in message


def test_hub_id_with_silent_hub_times_out_once(tmp_path, monkeypatch):
    """A hub that accepts the connection and never answers: one request, ended by the probe's own time-out
    (without one, the stand-in hub hangs up after HOLD_LIMIT_S and the error would not be a time-out)."""
    with counting_hub(answer=False) as hub:
        point_hub_at(monkeypatch, hub.url, tmp_path / "hub-cache")
        message = one_line_error(load_model, "EleutherAI/pythia-70m")
    assert hub.requests == [("HEAD", "/EleutherAI/pythia-70m/resolve/main/config.json")]
    assert "could not load 'EleutherAI/pythia-70m' from the Hugging Face hub (no connection: " in message
    assert "timed out" in message.lower() or "timeout" in message.lower(), message


def test_hub_id_in_offline_mode(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = one_line_error(load_model, "gpt2")
    assert "Hugging Face hub" in message and "HF_HUB_OFFLINE" in message and "local folder" in message


def test_hub_id_found_in_the_cache_loads_without_network(tiny_dir, tmp_path, monkeypatch):
    """A model already in the Hugging Face cache loads with no request to the hub."""
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    snapshot = cache / "models--acme--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_dir("gpt2"), snapshot)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", CLOSED_URL_TEMPLATE)
    monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
    loaded = load_model("acme/tiny", device="cpu")
    assert loaded.adapter.family == "gpt2" and loaded.source == "acme/tiny"


def test_not_a_hub_id_nor_a_folder():
    message = one_line_error(load_model, "not a model!")
    assert "neither an existing folder nor a Hugging Face hub id" in message


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    message = one_line_error(load_model, str(tmp_path))
    assert message.startswith(f"{tmp_path} is not a model folder: it has no config.json")


def test_file_instead_of_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    assert "is a file, not a model folder" in one_line_error(load_model, str(path))


def test_config_that_is_not_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert "config.json of" in one_line_error(load_model, str(tmp_path))


def test_folder_with_config_but_no_weights(tiny_dir, tmp_path):
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_dir("llama") / name, tmp_path / name)
    message = one_line_error(load_model, str(tmp_path))
    assert "could not load model weights" in message and "model.safetensors" in message


def test_checkpoint_without_mlp_weights_is_refused(tmp_path):
    message = one_line_error(load_model, str(build_without_mlp(tmp_path / "nomlp")))
    assert message.startswith("model has no MLP weights in ")
    assert "model.layers.0.mlp.down_proj.weight" in message and "random" in message


def test_checkpoint_without_its_lm_head_is_refused(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(tiny_dir("llama"), tmp_path / "m")  # llama's head is not tied to its embedding here
    weights = tmp_path / "m" / "model.safetensors"
    kept = {k: v for k, v in load_file(str(weights)).items() if k != "lm_head.weight"}
    save_file(kept, str(weights), metadata={"format": "pt"})
    assert "model has no LM head weights" in one_line_error(load_model, str(tmp_path / "m"))


def test_folder_without_tokenizer(tiny_dir, tmp_path):
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir("gpt2") / name, tmp_path / name)
    message = one_line_error(load_model, str(tmp_path))
    assert "could not load a tokenizer" in message and "tokenizer.json" in message


def test_cuda_without_a_gpu(tiny_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without one (torch's, not ours)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert resolve_device("auto") == "cpu"
    message = one_line_error(resolve_device, "cuda")
    assert "no CUDA GPU" in message and "cpu" in message
    one_line_error(resolve_device, "cuda:1")
    assert "no CUDA GPU" in one_line_error(load_model, str(tiny_dir("gpt2")), device="cuda")


def test_devices_and_dtypes():
    assert resolve_device("cpu") == "cpu"
    assert "unknown device 'tpu'" in one_line_error(resolve_device, "tpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16
    assert resolve_dtype("BF16", "cpu") == torch.bfloat16
    if torch.cuda.is_available():
        expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert resolve_dtype("auto", "cuda") == expected
    assert "unknown dtype 'int8'" in one_line_error(resolve_dtype, "int8", "cpu")


# ---- vocabulary -------------------------------------------------------------------------------


def rows_by_piece(rows):
    return {row["piece"]: row for row in rows}


def test_vocabulary_byte_level(tiny_dir):
    loaded = load_model(str(tiny_dir("gpt2")))
    tok = loaded.tokenizer
    rows = vocabulary(tok, loaded.adapter.vocab_size)
    assert [r["token_id"] for r in rows] == list(range(loaded.adapter.vocab_size))
    by_piece = rows_by_piece(rows)
    dog_id = tok.convert_tokens_to_ids("Ġdog")
    assert by_piece["Ġdog"] == {"token_id": dog_id, "token": " dog", "piece": "Ġdog", "key": "dog"}
    assert by_piece["dog"]["token"] == "dog" and by_piece["dog"]["key"] == "dog"
    assert by_piece["Ċ"]["token"] == "\n"
    assert by_piece["Ġ"]["token"] == " "
    assert by_piece["â"]["token"] == "<0xE2>"  # a lone lead byte of a UTF-8 character
    assert by_piece[SCRIPT_TOKEN]["token"] == SCRIPT_TOKEN
    assert by_piece["<|endoftext|>"]["token"] == "<|endoftext|>"
    for row in rows:  # where the piece is whole text, the same as the tokenizer's own decoding
        if not row["token"].startswith("<0x"):
            assert row["token"] == tok.convert_tokens_to_string([row["piece"]]), row


def test_vocabulary_sentencepiece(tiny_dir):
    loaded = load_model(str(tiny_dir("llama")))
    tok = loaded.tokenizer
    rows = vocabulary(tok, loaded.adapter.vocab_size)
    by_piece = rows_by_piece(rows)
    dog_id = tok.convert_tokens_to_ids("▁dog")
    assert by_piece["▁dog"] == {"token_id": dog_id, "token": " dog", "piece": "▁dog", "key": "dog"}
    assert by_piece["dog"]["token"] == "dog"
    assert by_piece["▁"]["token"] == " "
    assert by_piece["<0x0A>"]["token"] == "\n"
    assert by_piece["<0x41>"]["token"] == "A"
    assert by_piece["<0xE2>"]["token"] == "<0xE2>"  # not ASCII: the piece stays
    assert by_piece["<unk>"]["token"] == "<unk>" and by_piece["<s>"]["token"] == "<s>"
    assert by_piece[SCRIPT_TOKEN]["token"] == SCRIPT_TOKEN


def test_vocabulary_pads_rows_past_the_tokenizer(tiny_dir):
    loaded = load_model(str(tiny_dir("phi3")))  # W_U padded to a multiple of 64
    n_tokens, vocab_size = len(loaded.tokenizer), loaded.adapter.vocab_size
    assert vocab_size > n_tokens
    rows = vocabulary(loaded.tokenizer, vocab_size)
    assert len(rows) == vocab_size
    assert rows[n_tokens] == {"token_id": n_tokens, "token": f"<unused:{n_tokens}>", "piece": f"<unused:{n_tokens}>",
                              "key": f"<unused:{n_tokens}>"}  # fmt: skip
    assert rows[n_tokens - 1]["token"] == SCRIPT_TOKEN
    assert len(vocabulary(loaded.tokenizer, 10)) == 10


def test_tokenizer_json(tiny_dir):
    loaded = load_model(str(tiny_dir("gpt2")))
    text = tokenizer_json(loaded.tokenizer)
    data = json.loads(text)
    assert data["model"]["type"] == "BPE"
    assert any(t["content"] == SCRIPT_TOKEN for t in data["added_tokens"])
    assert tokenizer_json(object()) is None
