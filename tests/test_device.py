"""The run's device, its kind and precision policy, determinism, RNG state and memory per phase
(kdbench/device.py, kdbench/engine/state.py, kdbench/recipe.py). No GPU is needed: CUDA is
simulated in-process by monkeypatching torch.cuda (:class:`FakeCuda`), and the real runs are
the tiny GSM8K world of tests/tiny_models.py on the CPU."""

from __future__ import annotations

import os
import random
import types
from contextlib import contextmanager

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from kdbench import device as D
from kdbench.cli import main
from kdbench.cli_parser import build_parser
from kdbench.engine import state as S
from kdbench.errors import UserError
from kdbench.store import Artifact, CurvePoint, Metric, Run, open_engine

try:
    from tests.tiny_models import make_tiny_gsm8k, make_tiny_pair, tiny_gsm8k_suite
except ImportError:  # run from inside tests/
    from tiny_models import make_tiny_gsm8k, make_tiny_pair, tiny_gsm8k_suite


# ---------------------------------------------------------------------------- a simulated CUDA


class FakeCuda:
    """What kdbench asks of torch.cuda, answered for ``gpus`` simulated devices: an H100 (9.0) at
    index 0 and T4s (7.5: bf16 only emulated) after it; every call that changes state is recorded."""

    def __init__(self, monkeypatch, gpus: int = 2, initialised: bool = False):
        self.gpus, self.initialised, self.current = gpus, initialised, 0
        self.calls: list[tuple] = []
        self.rng: dict[int, torch.Tensor] = {}
        c = torch.cuda
        patches = {
            "is_available": lambda: gpus > 0, "device_count": lambda: gpus,
            "is_initialized": lambda: self.initialised, "current_device": lambda: self.current,
            "get_device_name": lambda i=None: "NVIDIA H100 80GB HBM3" if (i or 0) == 0 else "Tesla T4",
            "get_device_capability": lambda i=None: (9, 0) if (i or 0) == 0 else (7, 5),
            "device": self._device, "is_bf16_supported": self._bf16, "set_device": self._set_device,
            "get_rng_state": self._get_rng, "set_rng_state": self._set_rng,
            "get_rng_state_all": self._forbidden("get_rng_state_all"),
            "set_rng_state_all": self._forbidden("set_rng_state_all"),
            "reset_peak_memory_stats": lambda d=None: self.calls.append(("reset_peak", str(d))),
            "max_memory_allocated": lambda d=None: 100 * 2**20, "max_memory_reserved": lambda d=None: 160 * 2**20,
            "empty_cache": lambda: self.calls.append(("empty_cache",)),
        }
        for name, fn in patches.items():
            monkeypatch.setattr(c, name, fn)

    @contextmanager
    def _device(self, index):
        before, self.current = self.current, int(index)
        try:
            yield
        finally:
            self.current = before

    def _bf16(self, including_emulation: bool = True) -> bool:
        self.calls.append(("is_bf16_supported", self.current, including_emulation))
        return self.current == 0 or including_emulation  # the T4 "supports" bf16 only by emulation

    def _set_device(self, d) -> None:
        self.calls.append(("set_device", str(d)))

    def _get_rng(self, d="cuda") -> torch.Tensor:
        index = torch.device(d).index
        return self.rng.setdefault(index, torch.full((16,), 40 + index, dtype=torch.uint8))

    def _set_rng(self, state, d="cuda") -> None:
        self.calls.append(("set_rng_state", str(d), int(state[0])))

    def _forbidden(self, name):
        def fail(*a, **k):
            raise AssertionError(f"torch.cuda.{name} called: only the run device's generator is kdbench's")
        return fail


@pytest.fixture
def no_cublas_env(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)


# ---------------------------------------------------------------------------- 1. which device


def test_auto_is_cuda_when_available_else_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert D.resolve_device("auto") == torch.device("cpu")
    FakeCuda(monkeypatch, gpus=2)
    assert D.resolve_device("auto") == torch.device("cuda", 0)  # concrete: what the run records
    assert D.resolve_device("cuda") == torch.device("cuda", 0)
    assert D.resolve_device("cuda:1") == torch.device("cuda", 1)
    assert D.resolve_device("cpu") == torch.device("cpu")


@pytest.mark.parametrize("name, gpus, message", [
    ("cuda", 0, "device 'cuda' requested but no CUDA device is available"),
    ("cuda:0", 0, "device 'cuda:0' requested but no CUDA device is available"),
    ("cuda:7", 2, "device 'cuda:7' requested but only 2 CUDA device(s) are visible (cuda:0 to cuda:1)"),
    ("cuda:1", 1, "only 1 CUDA device(s) are visible (cuda:0)"),
    ("tpu", 2, "unknown device 'tpu'; valid choices: auto, cpu, cuda, cuda:N"),
    ("cuda:-1", 2, "unknown device"),
])
def test_a_device_this_machine_lacks_is_one_line(monkeypatch, name, gpus, message):
    FakeCuda(monkeypatch, gpus=gpus)
    with pytest.raises(UserError) as err:
        D.resolve_device(name)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_auto_is_every_device_flags_default():
    from kdbench.config import RunConfig

    p = build_parser()
    assert RunConfig().device == "auto" and RunConfig().deterministic is False  # run, prepare, sweep
    assert p.parse_args(["analyze"]).device == "auto"
    assert p.parse_args(["eval", "1", "--lm-eval", "x"]).device == "auto"
    assert p.parse_args(["eval", "1", "--lm-eval", "x", "--device", "cuda:1"]).device == "cuda:1"


# ---------------------------------------------------------------------------- 3. bf16 where native, on the run's GPU


def test_bf16_is_asked_of_the_run_device_without_emulation(monkeypatch):
    fake = FakeCuda(monkeypatch, gpus=2)
    assert D.native_bf16(torch.device("cuda", 0)) is True
    assert D.native_bf16(torch.device("cuda", 1)) is False  # a T4: emulated bf16 does not count
    asked = [c for c in fake.calls if c[0] == "is_bf16_supported"]
    assert asked == [("is_bf16_supported", 0, False), ("is_bf16_supported", 1, False)]
    assert fake.current == 0  # asked under the device, which is put back
    assert D.inference_dtype(torch.device("cuda", 1)) == torch.float32
    assert D.inference_dtype(torch.device("cuda", 0)) == torch.bfloat16


def test_run_settings_pin_ieee_float32_set_the_device_and_are_put_back(monkeypatch, no_cublas_env):
    fake = FakeCuda(monkeypatch, gpus=2)
    torch.set_float32_matmul_precision("medium")  # as a user's notebook might have left it
    try:
        with D.restoring_settings():
            out = D.pin_run_settings(torch.device("cuda", 1), deterministic=True)
            assert ("set_device", "cuda:1") in fake.calls
            assert torch.get_float32_matmul_precision() == "highest"
            assert D.float32_matmul(torch.device("cuda", 1))["cuda_matmul"] == "ieee"
            assert D.float32_matmul(torch.device("cuda", 1))["cudnn"] == "ieee"
            assert torch.are_deterministic_algorithms_enabled()
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
            assert out == {"fill_uninitialized_memory": True, "cublas_workspace_config": ":4096:8"}
        assert torch.get_float32_matmul_precision() == "medium"
        assert not torch.are_deterministic_algorithms_enabled()
        assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    finally:
        torch.set_float32_matmul_precision("highest")
    with D.restoring_settings():
        assert D.pin_run_settings(torch.device("cpu")) == {}
        assert not torch.are_deterministic_algorithms_enabled()


def test_a_tf32_override_in_the_environment_is_recorded(monkeypatch):
    FakeCuda(monkeypatch, gpus=1)
    monkeypatch.setenv("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1")
    assert D.float32_matmul(torch.device("cuda", 0))["tf32_override"] == "1"
    assert "tf32_override" not in D.float32_matmul(torch.device("cpu"))  # cuBLAS's business only


# ---------------------------------------------------------------------------- 4. --deterministic where it cannot be honoured


def test_deterministic_is_refused_where_cublas_cannot_be_made_deterministic(monkeypatch, no_cublas_env):
    fake = FakeCuda(monkeypatch, gpus=1)
    cuda = torch.device("cuda", 0)
    D.check_deterministic(cuda, True)  # unset, CUDA not started: the run sets it
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    D.check_deterministic(cuda, True)  # the other deterministic value, the user's: kept
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
    with pytest.raises(UserError, match=r"cannot be honoured with CUBLAS_WORKSPACE_CONFIG=':0:0'"):
        D.check_deterministic(cuda, True)
    D.check_deterministic(cuda, False)  # nothing asked, nothing refused
    D.check_deterministic(torch.device("cpu"), True)  # the CPU has nothing to configure
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    fake.initialised = True  # library use: CUDA started before the variable was set
    with pytest.raises(UserError, match="CUDA was initialised in this process before CUBLAS_WORKSPACE_CONFIG"):
        D.check_deterministic(cuda, True)


def test_an_op_without_a_deterministic_implementation_becomes_one_line():
    x = torch.zeros(4)
    with D.restoring_settings():
        torch.use_deterministic_algorithms(True)
        with pytest.raises(UserError) as err, D.refusing_nondeterministic_ops(torch.device("cpu"), "the start-up check"):
            x.put_(torch.tensor([1, 1]), torch.tensor([1.0, 2.0]))
    assert str(err.value) == ("--deterministic cannot be honoured on cpu: put_ has no deterministic implementation "
                              "there (the start-up check); run without --deterministic")
    with pytest.raises(RuntimeError, match="other"), D.refusing_nondeterministic_ops(torch.device("cpu"), "x"):
        raise RuntimeError("other")  # anything else passes unchanged


def test_the_command_configures_cublas_before_torch_for_a_deterministic_run(monkeypatch, no_cublas_env):
    from kdbench import cli
    from kdbench.config import RunConfig

    cli._before_torch(RunConfig(objective="kl"))
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    cli._before_torch(RunConfig(objective="kl", deterministic=True))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    cli._before_torch(RunConfig(objective="kl", deterministic=True))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the user's value is kept


# ---------------------------------------------------------------------------- 2. kind and precision in the fingerprint


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    return make_tiny_pair(tmp_path_factory.mktemp("devicepair"))


def _fingerprint(teacher, device) -> str:
    from kdbench.prepare import reference_fingerprint

    prep = types.SimpleNamespace(suite=tiny_gsm8k_suite(), teacher_path=teacher, base_teacher_path=teacher,
                                 device=device)
    return reference_fingerprint(prep)


AMX = ("Intel(R) Xeon(R) Platinum 8481C", frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}))
AVX2 = ("Intel(R) Xeon(R) CPU @ 2.20GHz", frozenset({"avx2", "fma"}))


def test_cpu_and_gpu_kinds_and_precisions_never_share_a_teacher_group(monkeypatch, tiny_pair):
    teacher, _ = tiny_pair
    cpu = torch.device("cpu")
    monkeypatch.setattr(D, "_cpuinfo", lambda: AMX)
    amx = _fingerprint(teacher, cpu)
    assert amx == _fingerprint(teacher, cpu)  # stable
    assert D.device_kind(cpu)["flags"] == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
    assert D.precision_policy(cpu)["autocast"] == "bfloat16"
    monkeypatch.setattr(D, "_cpuinfo", lambda: (AMX[0], AMX[1] - {"avx512_bf16", "amx_bf16"}))
    assert D.precision_policy(cpu) == {"bf16_native": False, "autocast": "off", "frozen_dtype": "float32",
                                       "float32_matmul": {"precision": "highest"}}
    no_bf16 = _fingerprint(teacher, cpu)  # the same CPU model with bf16 masked (a VM): float32 policy
    monkeypatch.setattr(D, "_cpuinfo", lambda: AVX2)
    avx2 = _fingerprint(teacher, cpu)
    monkeypatch.setattr(D, "_cpuinfo", lambda: AMX)
    with D.restoring_settings():
        torch.set_float32_matmul_precision("medium")  # oneDNN may then run float32 matmuls in bf16
        medium = _fingerprint(teacher, cpu)
    FakeCuda(monkeypatch, gpus=2)
    h100, t4 = _fingerprint(teacher, torch.device("cuda", 0)), _fingerprint(teacher, torch.device("cuda", 1))
    assert len({amx, no_bf16, avx2, medium, h100, t4}) == 6
    assert D.device_kind(torch.device("cuda", 1)) == {"type": "cuda", "name": "Tesla T4", "capability": "7.5"}


def test_the_finetune_key_adds_the_device_kind_only_off_the_cpu(monkeypatch, tiny_pair):
    from kdbench import finetune, suites

    teacher, _ = tiny_pair
    spec = suites.MICRO.finetune
    train = [types.SimpleNamespace(prompt=f"q{i}", references=[f"a{i}"]) for i in range(3)]
    before = finetune.finetuned_path(teacher, "micro", spec, train)  # every CPU machine's cached key
    monkeypatch.setattr(D, "_cpuinfo", lambda: AVX2)
    assert finetune.finetuned_path(teacher, "micro", spec, train, device=torch.device("cpu")) == before
    FakeCuda(monkeypatch, gpus=2)
    h100 = finetune.finetuned_path(teacher, "micro", spec, train, device=torch.device("cuda", 0))
    t4 = finetune.finetuned_path(teacher, "micro", spec, train, device=torch.device("cuda", 1))
    assert len({before, h100, t4}) == 3


def test_the_teacher_and_prompt_cache_keys_add_the_device_kind_only_off_the_cpu(monkeypatch):
    from kdbench import suites
    from kdbench.data.batching import Encoded
    from kdbench.engine import teacher_cache
    from kdbench.evaluation import prompt_cache

    identity, examples = {"weights": "w", "tokenizer": "t"}, [("e0", Encoded([1, 2, 3], 2))]

    def keys(device):
        t = teacher_cache.cache_key(teacher_cache.key_inputs(identity, examples, suites.MICRO.train, "", device))
        p = prompt_cache.entry_key(prompt_cache.key_inputs(identity, [[1, 2]], 2, device, torch.float32))
        return t, p

    monkeypatch.setattr(D, "_cpuinfo", lambda: AMX)
    monkeypatch.setattr(D, "native_bf16", lambda device: False)  # one dtype on every arm
    cpu = keys(torch.device("cpu"))
    assert teacher_cache.key_inputs(identity, examples, suites.MICRO.train, "", torch.device("cpu"))["device"] == "cpu"
    monkeypatch.setattr(D, "_cpuinfo", lambda: AVX2)
    assert keys(torch.device("cpu")) == cpu  # every CPU machine keeps the entries it has
    FakeCuda(monkeypatch, gpus=2)
    h100, t4 = keys(torch.device("cuda", 0)), keys(torch.device("cuda", 1))
    assert len({cpu[0], h100[0], t4[0]}) == 3 and len({cpu[1], h100[1], t4[1]}) == 3
    threads = torch.get_num_threads()
    try:  # the CPU's prefill rounds by thread count, a GPU's does not (torchrun sets OMP_NUM_THREADS=1)
        torch.set_num_threads(threads + 1)
        assert keys(torch.device("cuda", 0)) == h100 and keys(torch.device("cpu"))[1] != cpu[1]
    finally:
        torch.set_num_threads(threads)


def test_the_run_key_stays_device_free():
    from kdbench import config as C
    from kdbench.registry import get_objective

    def key(**kw):
        rc = C.RunConfig(objective="kl", **kw)
        return C.run_key(rc, get_objective("kl"), C.resolve_suite(rc)[1])

    assert key() == key(device="cpu") == key(device="cuda:1") == key(deterministic=True)


# ---------------------------------------------------------------------------- 5. RNG state


class _Cursor:
    def state_dict(self):
        return {"cursor": 3}

    def load_state_dict(self, d):
        assert d == {"cursor": 3}


def _trained():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    return model, opt


def _tensor_names(folder) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "tensors.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_a_cpu_run_saves_and_restores_its_generators_and_no_gpus(monkeypatch, tmp_path):
    FakeCuda(monkeypatch, gpus=2)  # GPUs visible, the run on the CPU: none of their states is its
    model, opt = _trained()
    torch.manual_seed(5)
    random.seed(5)
    S.save(tmp_path / "state", S.TrainState(step=1), model, opt, _Cursor())
    assert {n for n in _tensor_names(tmp_path / "state") if n.startswith("rng.")} == {"rng.torch"}
    expected = (torch.rand(3), random.random())
    torch.manual_seed(99)
    random.seed(99)
    state, _ = S.load(tmp_path / "state", model, opt, _Cursor())
    assert state.step == 1 and torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]


def test_a_cuda_run_saves_its_own_device_generator_only(monkeypatch, tmp_path):
    fake = FakeCuda(monkeypatch, gpus=2)
    model, opt = _trained()
    S.save(tmp_path / "state", S.TrainState(step=1), model, opt, _Cursor(), device=torch.device("cuda", 1))
    assert {n for n in _tensor_names(tmp_path / "state") if n.startswith("rng.")} == {"rng.torch", "rng.cuda"}
    S.load(tmp_path / "state", model, opt, _Cursor(), device=torch.device("cuda", 1))
    assert [c for c in fake.calls if c[0] == "set_rng_state"] == [("set_rng_state", "cuda:1", 41)]
    fake.calls.clear()  # resumed on another index (the stored device names it): the run's generator still
    S.load(tmp_path / "state", model, opt, _Cursor(), device=torch.device("cuda", 0))
    assert [c for c in fake.calls if c[0] == "set_rng_state"] == [("set_rng_state", "cuda:0", 41)]


def test_older_checkpoints_with_every_gpus_state_still_load(monkeypatch, tmp_path):
    """Format 2 as an earlier kdbench wrote it: ``rng.cuda.<i>`` for every visible GPU. It loads on
    a CPU-only run (no CUDA state restored) and, on CUDA, restores the run device's index."""
    from safetensors import safe_open

    model, opt = _trained()
    folder = tmp_path / "state"
    S.save(folder, S.TrainState(step=2), model, opt, _Cursor())
    path = folder / "tensors.safetensors"
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}  # not views of the file rewritten below
    tensors.update({f"rng.cuda.{i}": torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(2)})
    S.write_safetensors(path, tensors.items())
    state, _ = S.load(folder, model, opt, _Cursor())  # this machine: no CUDA at all
    assert state.step == 2
    fake = FakeCuda(monkeypatch, gpus=2)
    S.load(folder, model, opt, _Cursor(), device=torch.device("cuda", 1))
    assert [c for c in fake.calls if c[0] == "set_rng_state"] == [("set_rng_state", "cuda:1", 11)]
    fake.calls.clear()
    S.save(folder, S.TrainState(step=3), model, opt, _Cursor())  # saved on the CPU: no CUDA state
    S.load(folder, model, opt, _Cursor(), device=torch.device("cuda", 0))
    assert not [c for c in fake.calls if c[0] == "set_rng_state"]  # the generator stays as the run seeded it


# ---------------------------------------------------------------------------- 6. memory per phase


PHASES_IN_A_FRESH_PROCESS = """
import json, torch
from kdbench import device as D
meter = D.PhaseMemory(torch.device("cpu"))
with meter.phase("outer"):
    with meter.phase("inner"):
        x = torch.ones(50_000_000)  # 200 MB, touched
        del x
print(json.dumps({"per_phase": meter.host_per_phase, "peaks": meter.to_dict(), "process": D.peak_memory_mb()}))
"""


def test_each_phase_has_its_own_host_peak_and_the_process_keeps_its_own():
    """In a fresh process, where a freed 200 MB block goes straight back to the OS (a long-lived
    process's allocator may keep it resident, and then the outer phase rightly counts it)."""
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", PHASES_IN_A_FRESH_PROCESS], env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if not got["per_phase"]:
        pytest.skip("this kernel does not let a process reset its resident-memory high-water mark")
    peaks = got["peaks"]
    assert peaks["host_rss"] == "per phase"
    assert peaks["inner"]["host_rss_peak_mb"] > peaks["outer"]["host_rss_peak_mb"] + 150
    assert got["process"] >= peaks["inner"]["host_rss_peak_mb"] - 1  # the process's peak survives the resets


def test_cuda_peaks_are_reset_at_each_phase_start_and_the_cache_emptied_where_one_ends(monkeypatch):
    fake = FakeCuda(monkeypatch, gpus=1)
    meter = D.PhaseMemory(torch.device("cuda", 0))
    with meter.phase("train"):
        with meter.phase("validation"):
            pass
    resets = [c for c in fake.calls if c[0] == "reset_peak"]
    assert len(resets) == 3  # train starts, validation starts, train goes on
    assert meter.to_dict()["validation"]["cuda_allocated_peak_mb"] == 100.0
    assert meter.to_dict()["train"]["cuda_reserved_peak_mb"] == 160.0
    D.release_memory()
    assert ("empty_cache",) not in fake.calls  # CUDA never started here: nothing to empty
    fake.initialised = True
    D.release_memory()
    assert ("empty_cache",) in fake.calls


# ---------------------------------------------------------------------------- a real tiny run


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Two tiny real runs of the GSM8K world (tests/tiny_models.py): with --deterministic, then
    without; their distilled rows, curves, metrics and cost artifacts."""
    from kdbench import suites

    tmp = tmp_path_factory.mktemp("devicerun")
    teacher, student, data_root = make_tiny_gsm8k(tmp)
    small = tiny_gsm8k_suite()
    args = ["run", "--objective", "kl", "--suite", small.name, "--teacher", str(teacher), "--teacher-finetuned",
            "--student", str(student), "--data-dir", str(data_root), "--steps", "2", "--eval-limit", "1",
            "--no-save", "--no-progress", "--db", str(tmp / "runs.db")]
    mp = pytest.MonkeyPatch()
    mp.setitem(suites.SUITES, small.name, small)
    mp.setenv("OMP_NUM_THREADS", "1")
    mp.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        codes = [main([*args, "--deterministic"]), main(args)]
        deterministic_after = torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    engine = open_engine(str(tmp / "runs.db"), readonly=True)
    with Session(engine) as s:
        runs = s.scalars(select(Run).where(Run.role == "distilled").order_by(Run.id)).all()
        out = []
        for r in runs:
            curve = [(c.step, c.split, c.loss, c.terms) for c in
                     s.scalars(select(CurvePoint).where(CurvePoint.run_id == r.id).order_by(CurvePoint.id))]
            metrics = sorted((m.task, m.metric, m.seed, m.value) for m in
                             s.scalars(select(Metric).where(Metric.run_id == r.id)))
            cost = s.scalars(select(Artifact).where(Artifact.run_id == r.id, Artifact.name == "cost")).one().data
            out.append(types.SimpleNamespace(run=r, curve=curve, metrics=metrics, cost=cost))
        s.expunge_all()
    engine.dispose()
    return {"codes": codes, "runs": out, "deterministic_after": deterministic_after}


def test_a_run_records_its_resolved_device_kind_precision_and_determinism(tiny_runs):
    assert tiny_runs["codes"] == [0, 0]
    det, plain = (r.run for r in tiny_runs["runs"])
    for run in (det, plain):
        assert run.status == "finished"
        assert run.config["device"] == "cpu" and run.config["request"]["device"] == "auto"  # resolved; asked
        assert run.config["device_kind"] == D.device_kind(torch.device("cpu"))
        assert run.config["precision"]["float32_matmul"] == {"precision": "highest"}
        assert set(run.config["precision"]) == {"bf16_native", "autocast", "frozen_dtype", "float32_matmul"}
    assert det.config["deterministic"] is True and det.config["request"]["deterministic"] is True
    assert det.config["determinism"] == {"fill_uninitialized_memory": True}
    assert plain.config["deterministic"] is False and "determinism" not in plain.config
    assert not tiny_runs["deterministic_after"]  # the process is as it was after the runs


def test_deterministic_is_provenance_and_the_cpu_gives_the_same_bits_either_way(tiny_runs):
    det, plain = tiny_runs["runs"]
    assert det.run.config_hash == plain.run.config_hash  # one experiment: a repeat
    assert det.run.config["reference_fingerprint"] == plain.run.config["reference_fingerprint"]
    assert det.run.config["reference_runs"] == plain.run.config["reference_runs"]  # the second reused them
    assert det.curve == plain.curve and det.metrics == plain.metrics  # CPU kernels are deterministic already


def test_the_cost_artifact_has_each_phases_memory(tiny_runs):
    for r in tiny_runs["runs"]:
        memory = r.cost["memory"]
        phases = {k for k, v in memory.items() if isinstance(v, dict)}
        expected = {"prepare", "reference_rows", "teacher_cache", "startup_check", "train", "evaluation"}
        if any(split == "valid" for _, split, _, _ in r.curve):
            expected.add("validation")
        assert phases == expected
        assert all(memory[p]["host_rss_peak_mb"] > 0 and set(memory[p]) == {"host_rss_peak_mb"} for p in phases)
        # runs.peak_memory_mb keeps its meaning: the process's peak resident memory, over every phase
        assert r.run.peak_memory_mb == pytest.approx(r.cost["peak_memory_mb"])
        assert r.run.peak_memory_mb >= max(memory[p]["host_rss_peak_mb"] for p in phases) - 1


def test_a_resumed_run_keeps_the_device_it_started_on(monkeypatch):
    """A stored request may say auto; the resume runs on the device the run recorded."""
    from kdbench import recipe
    from kdbench.config import RunConfig

    seen = []

    def setup(self, check=True):
        seen.append(self.run_config.device)
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe.DistillRun, "setup", setup)
    released = []
    claim = types.SimpleNamespace(run_config=RunConfig(objective="kl", device="auto"),
                                  run=types.SimpleNamespace(config={"device": "cpu"}),
                                  release=lambda: released.append(True))
    with pytest.raises(KeyboardInterrupt):
        recipe.DistillRun.resume(claim)
    assert seen == ["cpu"] and released == [True]
    claim.run.config = {}  # a row without a recorded device: its request
    with pytest.raises(KeyboardInterrupt):
        recipe.DistillRun.resume(claim)
    assert seen[-1] == "auto" and released == [True, True]
