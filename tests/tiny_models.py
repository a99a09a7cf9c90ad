"""Tiny random Llama teacher / student folders with the real SmolLM2 tokenizer, for running the
paper suites' code paths on a CPU in seconds (the real pairs are GPU-sized hub models)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_pair(root: Path) -> tuple[Path, Path]:
    """(teacher, student) folders: 2 layers d=64 and 1 layer d=64, SmolLM2's tokenizer and vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdbench.models import load_tokenizer, prepare_teacher

    tok = load_tokenizer(prepare_teacher("embedded:smollm2-135m-instruct"))
    out = []
    for name, layers, seed in (("teacher", 2, 0), ("student", 1, 1)):
        path = root / name
        if not (path / "config.json").is_file():
            torch.manual_seed(seed)
            cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                              tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
            LlamaForCausalLM(cfg).save_pretrained(path)
            tok.save_pretrained(path)
        out.append(path)
    return out[0], out[1]


EVAL_PROMPTS = ["What is a computer?", "Tell me a joke.", "Who wrote Hamlet?", "Do you like music?", "Hi"]
EVAL_REFERENCES = [["A machine that computes."], ["Why did the chicken cross the road?"], ["Shakespeare."],
                   ["Yes, very much.", "I do."], ["Hello!"]]


def tiny_eval_setup(root: Path):
    """A tiny teacher and student (eval mode), their tokenizer and five chat prompts with
    references as evaluation inputs: ``(teacher, student, tokenizer, TaskInputs)``."""
    from kdbench.data.records import Example
    from kdbench.evaluation.protocol import TaskInputs
    from kdbench.models import load_causal_lm, load_tokenizer

    t_path, s_path = make_tiny_pair(root)
    teacher, student = load_causal_lm(t_path).eval(), load_causal_lm(s_path).eval()
    tok = load_tokenizer(t_path)
    examples = [Example(id=f"t:{i}", prompt=p, references=r, task="t")
                for i, (p, r) in enumerate(zip(EVAL_PROMPTS, EVAL_REFERENCES))]
    return teacher, student, tok, TaskInputs.build(tok, examples, max_prompt_tokens=64, max_tokens=96)


def make_tiny_gsm8k(root: Path) -> tuple[Path, Path, Path]:
    """(teacher, student, data root): the tiny pair and 24 training / 2 test GSM8K-style problems in
    the layout of ../shared/data (24: more than a batch of 8 after validation is split off)."""
    import json

    teacher, student = make_tiny_pair(root / "models")
    data = root / "data" / "gsm8k"
    data.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 24), ("test", 2)):
        (data / f"{name}.jsonl").write_text("".join(
            json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(n)))
    return teacher, student, root / "data"


def gsm8k_run_world(root: Path) -> list[str]:
    """The tiny pair and 40 training / 2 test GSM8K-style problems with worked answers under
    ``root``; returns the ``kdbench run`` arguments of a 4-step ``paper-task-gsm8k`` run on them
    (objective, store and any other option left to the caller): the world of the tests that
    run, kill and resume whole ``kdbench`` processes."""
    import json

    teacher, student = make_tiny_pair(root / "models")
    data = root / "data" / "gsm8k"
    data.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", 40), ("test", 2)):
        (data / f"{name}.jsonl").write_text("".join(
            json.dumps({"question": f"What is {i} + {i % 7}?", "answer": f"{i} + {i % 7} = {i + i % 7} #### {i + i % 7}"})
            + "\n" for i in range(n)))
    return ["--suite", "paper-task-gsm8k", "--teacher", str(teacher), "--teacher-finetuned", "--student", str(student),
            "--data-dir", str(root / "data"), "--steps", "4", "--eval-limit", "2", "--no-save", "--no-progress"]


def tiny_gsm8k_suite():
    """paper-task-gsm8k cut to the tiny world: short sequences, one sampling seed, 4 new tokens."""
    import dataclasses

    from kdbench import suites

    spec = suites.PAPER_TASK_GSM8K
    return dataclasses.replace(spec, train=dataclasses.replace(spec.train, max_prompt_tokens=32, max_tokens=40),
                               eval=dataclasses.replace(spec.eval, seeds=(10,), max_new_tokens=4, n_valid=1),
                               tasks=tuple(dataclasses.replace(t, max_new_tokens=4) for t in spec.tasks))
