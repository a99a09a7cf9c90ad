"""Model folders are published atomically: a failure leaves neither a half-written folder nor a temp."""

import pytest

from kdbench.diskcache import publishing_dir
from kdbench.models import layer_subset


def test_publishing_dir_replaces_the_target_only_on_success(tmp_path):
    out = tmp_path / "model"
    with publishing_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (out / "config.json").read_text() == "{}"

    with pytest.raises(RuntimeError):
        with publishing_dir(out) as tmp:
            (tmp / "config.json").write_text('{"half": true}')
            raise RuntimeError("killed midway")
    assert (out / "config.json").read_text() == "{}"  # the old, complete folder survives
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary folder left behind


def test_student_keeps_every_other_block_and_the_last():
    assert layer_subset(30, 2) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 29]
    assert layer_subset(5, 2) == [0, 2, 4]


CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "transformers_version": "5.24.0"}


def _model_folder(root, tokenizer_config: dict, config: dict = CONFIG):
    import json

    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    (root / "model.safetensors").write_bytes(b"\x00weights\x01" * 64)
    (root / "tokenizer.json").write_text('{"model": {"vocab": {"a": 0, "b": 1}}}')
    (root / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return root


def test_fingerprints_are_by_content_not_by_folder_or_load_options(tmp_path, monkeypatch):
    from kdbench.models import fingerprint, tokenizer_digest

    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    base = {"model_max_length": 8192, "chat_template": "{{ messages }}", "local_files_only": True}
    a = _model_folder(tmp_path / "install-a" / "teacher", base)
    # another folder, the tokenizer saved without HF_HUB_OFFLINE (transformers 5 writes local_files_only)
    b = _model_folder(tmp_path / "elsewhere" / "t", {**base, "local_files_only": False})
    assert fingerprint(a, {"eval": 1}) == fingerprint(b, {"eval": 1})
    assert tokenizer_digest(a) == tokenizer_digest(b)
    # what the tokenizer *is* still counts: a changed chat template is another identity
    c = _model_folder(tmp_path / "c", {**base, "chat_template": "{{ other }}"})
    assert tokenizer_digest(c) != tokenizer_digest(a) and fingerprint(c) != fingerprint(a)
    assert fingerprint(a, {"eval": 2}) != fingerprint(a, {"eval": 1})


def test_fingerprints_ignore_the_transformers_version_that_saved_the_model(tmp_path, monkeypatch):
    from kdbench.models import fingerprint, model_digest

    monkeypatch.setenv("KDBENCH_CACHE", str(tmp_path / "cache"))
    tok = {"model_max_length": 8192}
    a = _model_folder(tmp_path / "a", tok)
    # the same weights saved by the next transformers release (5.24 -> 5.25 did exactly this)
    b = _model_folder(tmp_path / "b", tok, {**CONFIG, "transformers_version": "5.25.0"})
    assert model_digest(a) == model_digest(b) and fingerprint(a) == fingerprint(b)
    # what the config *says* about the model still counts
    c = _model_folder(tmp_path / "c", tok, {**CONFIG, "num_hidden_layers": 3})
    assert model_digest(c) != model_digest(a) and fingerprint(c) != fingerprint(a)
