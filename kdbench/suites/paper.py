"""The paper suites (REFERENCE §3): GPU budgets, hub models, MiniLLM / task data.

They run on GPUs (``--device cuda``); on a CPU machine they run only with small local models
(``--teacher PATH --student PATH``) and a cut budget, which the tests do. Data come from a
data root in the layout of ``../shared/data`` (``--data-dir`` / ``$KDBENCH_DATA_DIR``) or,
without one, from the hub names in kdbench/data/sources.py. docs/suites.md says how to run them.
"""

from __future__ import annotations

from kdbench.suites.spec import EvalSpec, PairSpec, SuiteSpec, TaskSpec, TrainSpec

# -------------------------------------------------------------- task-agnostic instruction following

GPT2_XL = "openai-community/gpt2-xl"
INSTRUCT_PAIRS = {
    "gpt2-xl-to-base": PairSpec(GPT2_XL, {"kind": "pretrained", "name": "openai-community/gpt2"},
                                note="GPT-2 XL (1.5B) -> GPT-2 base (124M), MIT"),
    "gpt2-xl-to-medium": PairSpec(GPT2_XL, {"kind": "pretrained", "name": "openai-community/gpt2-medium"},
                                  note="GPT-2 XL (1.5B) -> GPT-2 medium (355M), MIT"),
    "openllama2-7b-to-3b": PairSpec("openlm-research/open_llama_7b_v2",
                                    {"kind": "pretrained", "name": "openlm-research/open_llama_3b_v2"},
                                    note="OpenLLaMA v2 7B -> 3B, Apache-2.0"),
}

PAPER_INSTRUCT = SuiteSpec(
    name="paper-instruct",
    version="2",  # 2: sampling keyed per prompt and position (docs/suites.md "Versions and labels")
    description=(
        "The paper's task-agnostic instruction following: teacher fine-tuned on databricks-dolly-15k, "
        "distilled on Dolly; ROUGE-L on Dolly test, Self-Instruct, Vicuna, S-NI and UnNI (MiniLLM's "
        "reference-length >= 11 sets, UnNI capped at 10,000), 5 sampling seeds."
    ),
    pairs=INSTRUCT_PAIRS,
    default_pair="gpt2-xl-to-base",
    # prompt "alpaca": MiniLLM's Alpaca-style prompt (what the papers feed GPT-2 / OpenLLaMA); it is
    # wrapped in a chat template only when the tokenizer has one.
    data={"loader": "paper-instruct", "prompt": "alpaca", "valid_size": 500},
    tasks=(
        TaskSpec("dolly", source="dolly"),            # 500; also the validation task (Dolly valid)
        TaskSpec("self_instruct", source="self_instruct"),  # 242
        TaskSpec("vicuna", source="vicuna"),          # 80
        TaskSpec("sni", source="sni"),                # 1,694
        TaskSpec("unni", source="unni", n_test=10_000),
    ),
    # REFERENCE §3: pure KD loss, AdamW, lr 1e-4, batch 8, 20 epochs, max length 512, prompt <= 256,
    # checkpoint by validation ROUGE-L (here: every epoch).
    train=TrainSpec(steps=0, epochs=20, valid_every_epochs=1, batch_size=8, lr=1e-4, max_prompt_tokens=256,
                    max_tokens=512, warmup_steps=100, log_every=50),
    eval=EvalSpec(n_test=10_000, seeds=(10, 20, 30, 40, 50), max_new_tokens=256, batch_size=32, n_valid=500),
    # Teacher SFT on the same training split. kdbench's choice (REFERENCE §3 gives no teacher budget);
    # an already fine-tuned teacher: --teacher PATH_OR_ID --teacher-finetuned.
    finetune=TrainSpec(steps=0, epochs=3, batch_size=8, lr=1e-5, max_prompt_tokens=256, max_tokens=512,
                       warmup_steps=100, log_every=50),
    licences=("Dolly CC BY-SA 3.0; Self-Instruct Apache-2.0; S-NI Apache-2.0 definitions, per-task instance "
              "licences; UnNI MIT; Vicuna questions via MiniLLM (GPT-4 answers); GPT-2 MIT; OpenLLaMA Apache-2.0"),
)

# -------------------------------------------------------------- task-specific (one suite per task)

GEMMA_PAIRS = {
    "gemma-7b-it-to-2b-it": PairSpec("google/gemma-7b-it", {"kind": "pretrained", "name": "google/gemma-2b-it"},
                                     note="Gemma-7B-IT (SFT per task) -> Gemma-2B-IT, Gemma terms of use"),
}
# kdbench's choice for the task-specific budget (REFERENCE §3 gives only "1k examples per task"):
# AdamW lr 1e-5 (full fine-tuning of a 2B model), batch 8, 3 epochs, validation every epoch.
_TASK_TRAIN = dict(steps=0, epochs=3, valid_every_epochs=1, batch_size=8, lr=1e-5, warmup_steps=20, log_every=25)
_TASK_FINETUNE = dict(steps=0, epochs=3, batch_size=8, lr=1e-5, warmup_steps=20, log_every=25)
_TASK_EVAL = dict(seeds=(10, 20, 30, 40, 50), batch_size=32, n_valid=200)


def _task_suite(name: str, description: str, task: TaskSpec, loader: str, lengths: tuple[int, int], n_test: int,
                max_new_tokens: int, licences: str) -> SuiteSpec:
    p, t = lengths
    return SuiteSpec(
        # version 2: sampling keyed per prompt and position (docs/suites.md "Versions and labels")
        name=name, version="2", description=description, pairs=GEMMA_PAIRS, default_pair="gemma-7b-it-to-2b-it",
        data={"loader": loader, "n_train": 1000, "prompt": "plain"},
        tasks=(task,),
        train=TrainSpec(max_prompt_tokens=p, max_tokens=t, **_TASK_TRAIN),
        eval=EvalSpec(n_test=n_test, max_new_tokens=max_new_tokens, **_TASK_EVAL),
        finetune=TrainSpec(max_prompt_tokens=p, max_tokens=t, **_TASK_FINETUNE),
        licences=licences,
    )


PAPER_TASK_GSM8K = _task_suite(
    "paper-task-gsm8k",
    "Task-specific GSM8K: 1k training problems; accuracy of the final number (after ####), greedy decoding.",
    TaskSpec("gsm8k", source="gsm8k", kind="exact", answer="final_number", greedy=True, sample=False),
    loader="gsm8k", lengths=(256, 512), n_test=1319, max_new_tokens=256, licences="GSM8K MIT")

PAPER_TASK_DIALOGSUM = _task_suite(
    "paper-task-dialogsum",
    "Task-specific DialogSum: 1k training dialogues; ROUGE-L against the 3 test references, 5 sampling seeds.",
    TaskSpec("dialogsum", source="dialogsum"),
    loader="dialogsum", lengths=(1024, 1152), n_test=500, max_new_tokens=128,
    licences="DialogSum CC BY-NC-SA 4.0 (non-commercial)")

PAPER_TASK_TRANSLATION = _task_suite(
    "paper-task-translation",
    "Task-specific translation, Multi30k English->German (a substitute for the paper's Assamese->English, "
    "which is not public on GitHub): 1k training pairs; corpus BLEU and chrF (sacrebleu) + ROUGE-L, greedy "
    "headline plus 5 sampling seeds.",
    TaskSpec("multi30k_en_de", source="translation", kind="translation", greedy=True, sample=True),
    loader="translation", lengths=(256, 384), n_test=1000, max_new_tokens=128,
    licences="Multi30k: no licence stated (Flickr30k captions; research use)")

PAPER_TASK = (PAPER_TASK_GSM8K, PAPER_TASK_DIALOGSUM, PAPER_TASK_TRANSLATION)
