"""Loaders for the paper suites' evaluation / training sets, in their published schemas.

Every loader returns a list of :class:`Example` and takes either a **local file** (jsonl, or a JSON
array) in the schema below, or a **hub name** (anything that is not an existing path), which is
loaded with ``datasets.load_dataset(name, split=split, **hub_kwargs)``. ``hub_kwargs`` also lets a
test drive the hub code path on a local file: ``load_gsm8k("json", split="train",
data_files="x.jsonl")``. Nothing here touches the network by itself; with ``HF_HUB_OFFLINE=1`` a
hub name that is not cached fails fast.

Prompt format of the instruction sets (``Example.prompt``, the text to put in a chat template or
an Alpaca template): the instruction, then -- when the input is non-empty -- a blank line and the
input, i.e. ``instruction`` or ``f"{instruction}\\n\\n{input}"`` (both stripped of surrounding
whitespace). The MiniLLM Alpaca-style prompt (what MiniLLM / DistiLLM / CSD feed GPT-2) is kept in
``meta["alpaca_prompt"]`` (the file's ``prompt`` field, or :func:`alpaca_prompt` when absent).

The real files live in the read-only shared data folder (``shared_data_dir()``; see its README):
they are never copied into this repository.
"""

from __future__ import annotations

# The code lives in one module per family (records: Example, reading, prompt formats;
# instruction_sets; task_sets; splits); every name is re-exported here, the one import path.
from kdbench.data.instruction_sets import (
    load_alpaca_eval,
    load_dolly_hf,
    load_minillm_jsonl,
    load_self_instruct_user_oriented,
    load_vicuna,
)
from kdbench.data.records import Example, alpaca_prompt, instruction_prompt, shared_data_dir
from kdbench.data.splits import sample_subset, split_train_valid_test
from kdbench.data.task_sets import (
    DIALOGSUM_INSTRUCTION as DIALOGSUM_INSTRUCTION,  # re-exported: the task prompts' instructions, read with the loaders
    MULTI30K_INSTRUCTION as MULTI30K_INSTRUCTION,  # re-exported: the task prompts' instructions, read with the loaders
    load_dialogsum,
    load_gsm8k,
    load_multi30k,
)

__all__ = [
    "Example",
    "shared_data_dir",
    "alpaca_prompt",
    "instruction_prompt",
    "load_minillm_jsonl",
    "load_dolly_hf",
    "load_vicuna",
    "load_self_instruct_user_oriented",
    "load_gsm8k",
    "load_dialogsum",
    "load_multi30k",
    "load_alpaca_eval",
    "sample_subset",
    "split_train_valid_test",
]
