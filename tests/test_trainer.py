"""The training loop (kdbench/engine/trainer.py) and its state: the loss goes down, a saved state
resumes bit for bit, the best validated step is restored, divergence stops a run, activation
checkpointing changes nothing, and teacher fine-tuning runs on the same trainer."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch

from kdbench.engine import state as S
from kdbench.engine.batches import PackedBatches
from kdbench.engine.teacher import LiveTeacher
from kdbench.engine.trainer import LogHooks, TrainingDiverged, train
from kdbench.registry import get_objective, load_plugin_file

try:
    from tests.engine_helpers import SPEC, Hooks, fresh, tiny  # noqa: F401  (tiny: a module fixture)
except ImportError:  # run from inside tests/
    from engine_helpers import SPEC, Hooks, fresh, tiny  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- the loop and its state


def _train(tiny, model, steps, state=None, batches=None, optimizer=None, objective="csd", validate=None,
           valid_every=0, on_step=None, **kw):
    spec = dataclasses.replace(SPEC, steps=steps)
    points = []
    batches = batches or PackedBatches(tiny["enc"], 4, 0)
    hooks = Hooks(log=lambda s, p: points.append((s, p["loss"])), validate=validate, valid_every=valid_every,
                  on_step=on_step)
    res = train(model=model, objective=get_objective(objective), batches=batches, teacher=LiveTeacher(tiny["teacher"]),
                spec=spec, device=torch.device("cpu"), hooks=hooks, state=state, optimizer=optimizer, progress=False,
                **kw)
    return res, points


def test_training_reduces_the_loss_and_counts_tokens(tiny):
    model = fresh(tiny)
    res, points = _train(tiny, model, 6)
    assert [s for s, _ in points] == [1, 2, 3, 4, 5, 6]
    assert points[-1][1] < points[0][1]
    src = PackedBatches(tiny["enc"], 4, 0)
    assert res.train_tokens == sum(next(src).n_tokens for _ in range(6)) and res.tokens_per_s > 0


def test_saved_state_resumes_bit_identically(tiny, tmp_path):
    """Train 4 steps straight vs 2 steps, save, restore into new objects, 2 more steps."""
    from kdbench.engine.trainer import make_optimizer

    torch.manual_seed(0)
    straight = fresh(tiny)
    _, full = _train(tiny, straight, 4)

    torch.manual_seed(0)
    first = fresh(tiny)
    batches = PackedBatches(tiny["enc"], 4, 0)
    opt = make_optimizer(first, SPEC, torch.device("cpu"))
    saved = {}

    def on_step(st, o):
        if st.step == 2:
            S.save(tmp_path / "state", st, first, o, batches)
            saved["ok"] = True
    _, part1 = _train(tiny, first, 4, batches=batches, optimizer=opt, on_step=on_step)
    assert saved

    second = fresh(tiny)
    batches2 = PackedBatches(tiny["enc"], 4, 0)
    opt2 = make_optimizer(second, SPEC, torch.device("cpu"))
    restored, meta = S.load(tmp_path / "state", second, opt2, batches2)
    assert restored.step == 2 and meta["batches"]["index"] == 2
    _, part2 = _train(tiny, second, 4, state=restored, batches=batches2, optimizer=opt2)
    assert [s for s, _ in part2] == [3, 4]  # no duplicate curve points
    assert [loss for _, loss in part2] == [loss for _, loss in full[2:]]  # bit-identical on CPU
    for (k, a), (_, b) in zip(straight.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), k


def test_write_safetensors_streams_a_file_safetensors_reads_back(tmp_path):
    from safetensors.torch import load_file

    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    tensors = {"f32": base, "tied": base, "view": base[:, 1], "bf16": torch.randn(3, generator=g).bfloat16(),
               "i64": torch.arange(5), "u8": torch.tensor([1, 2, 255], dtype=torch.uint8), "scalar": torch.tensor(3.5),
               "empty": torch.zeros(0, 2), "flag": torch.tensor([True, False])}
    S.write_safetensors(tmp_path / "t.safetensors", tensors.items(), {"note": "x"})
    back = load_file(str(tmp_path / "t.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


@pytest.mark.parametrize("where", ["memory", "disk"])
def test_the_best_validated_step_is_restored_and_survives_a_checkpoint(tiny, tmp_path, where):
    """Validation every 2 steps scores step 2 above step 4: training ends with step 2's
    weights, kept in memory or in a file; a checkpoint at step 3 carries them to a resumed run."""
    from kdbench.engine.trainer import make_optimizer

    def best(name):
        return S.BestWeights(tmp_path / name / "best.safetensors" if where == "disk" else None)

    scores = iter([2.0, 1.0, 2.0, 1.0])
    torch.manual_seed(0)
    two = fresh(tiny)
    _train(tiny, two, 2)

    torch.manual_seed(0)
    model = fresh(tiny)
    batches = PackedBatches(tiny["enc"], 4, 0)
    opt = make_optimizer(model, SPEC, torch.device("cpu"))

    def on_step(st, o):
        if st.step == 3:
            S.save(tmp_path / "state", st, model, o, batches)
    res, _ = _train(tiny, model, 4, state=S.TrainState(best=best("a")), batches=batches, optimizer=opt,
                    validate=lambda m: next(scores), valid_every=2, on_step=on_step)
    assert res.selected_step == 2 and res.valid_scores == {2: 2.0, 4: 1.0}
    for (k, a), (_, b) in zip(two.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    assert (tmp_path / "state" / "best.safetensors").is_file()

    resumed = fresh(tiny)
    batches2 = PackedBatches(tiny["enc"], 4, 0)
    opt2 = make_optimizer(resumed, SPEC, torch.device("cpu"))
    # the runner's layout: the resumed run keeps its best weights where the checkpoint linked them from
    state, _ = S.load(tmp_path / "state", resumed, opt2, batches2, best("a"))
    assert state.best and state.best_step == 2
    if where == "disk":  # another location gets a copy
        other = best("b")
        other.adopt(tmp_path / "state" / "best.safetensors")
        assert other.path.read_bytes() == (tmp_path / "a" / "best.safetensors").read_bytes()
    res2, _ = _train(tiny, resumed, 4, state=state, batches=batches2, optimizer=opt2,
                     validate=lambda m: next(scores), valid_every=2)
    assert res2.selected_step == 2
    for (k, a), (_, b) in zip(two.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_format_1_train_state_still_resumes_and_an_unknown_format_is_refused(tiny, tmp_path):
    """Format 1 (the previous kdbench) kept the best weights as best.* inside tensors.safetensors."""
    import json

    from safetensors.torch import load_file

    from kdbench.engine.trainer import make_optimizer
    from kdbench.errors import UserError

    torch.manual_seed(0)
    model = fresh(tiny)
    batches = PackedBatches(tiny["enc"], 4, 0)
    opt = make_optimizer(model, SPEC, torch.device("cpu"))
    state = S.TrainState(best=S.BestWeights())
    _train(tiny, model, 2, state=state, batches=batches, optimizer=opt, validate=lambda m: 1.0, valid_every=1)
    S.save(tmp_path / "state", state, model, opt, batches)
    folder = tmp_path / "state"
    tensors = load_file(str(folder / "tensors.safetensors"))
    tensors.update({f"best.{k}": v for k, v in load_file(str(folder / "best.safetensors")).items()})
    S.write_safetensors(tmp_path / "old.safetensors", tensors.items())  # (load_file's tensors map the file)
    (tmp_path / "old.safetensors").replace(folder / "tensors.safetensors")
    (folder / "best.safetensors").unlink()
    meta = json.loads((folder / "state.json").read_text())
    (folder / "state.json").write_text(json.dumps({**meta, "format": 1}))

    again = fresh(tiny)
    best = S.BestWeights(tmp_path / "run" / "best.safetensors")
    restored, _ = S.load(folder, again, make_optimizer(again, SPEC, torch.device("cpu")),
                         PackedBatches(tiny["enc"], 4, 0), best)
    assert restored.step == 2 and restored.best_step == 1 and best.path.is_file()
    for k, v in load_file(str(best.path)).items():
        assert torch.equal(v, tensors[f"best.{k}"]), k
    (folder / "state.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(UserError, match="format 99"):
        S.load(folder, again, make_optimizer(again, SPEC, torch.device("cpu")), PackedBatches(tiny["enc"], 4, 0))


def test_nan_in_the_loss_or_the_gradient_stops_training(tiny, tmp_path):
    path = tmp_path / "nan_grad.py"
    path.write_text(textwrap.dedent('''
        import torch
        from kdbench.registry import objective

        class _NanGrad(torch.autograd.Function):
            @staticmethod
            def forward(ctx, x):
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                return g * float("nan")

        @objective("nan_grad", behaviour="balanced", paper="test plug-in")
        def nan_grad(s, t):
            """A finite loss whose gradient is NaN."""
            return _NanGrad.apply((s.log_softmax(-1) - t.log_softmax(-1)).pow(2).sum(-1))
    '''))
    (spec,) = load_plugin_file(path)
    with pytest.raises(TrainingDiverged, match="gradient norm is nan at step 1"):
        _train(tiny, fresh(tiny), 2, objective=spec.name)


def _checkpointing(model) -> bool:  # the layers' own flag (transformers renames the model-level one)
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@pytest.mark.parametrize("bf16", [False, True])
def test_activation_checkpointing_trains_bitwise_the_same(tiny, bf16):
    """Recomputing the blocks' activations in backward (the default) changes memory and time,
    never a bit of the result: same losses, same weights after the steps."""
    spec = dataclasses.replace(SPEC, steps=3, bf16_autocast=bf16)
    runs = []
    for ckpt in (False, True):
        model, losses, during = fresh(tiny), [], []
        train(model=model, objective=get_objective("csd"), batches=PackedBatches(tiny["enc"], 4, 0),
              teacher=LiveTeacher(tiny["teacher"]), spec=spec, device=torch.device("cpu"),
              hooks=Hooks(log=lambda s, p: losses.append(p["loss"]),
                          on_step=lambda st, opt: during.append(_checkpointing(model))),
              activation_checkpointing=ckpt, progress=False)
        assert during == [ckpt] * 3 and not _checkpointing(model)  # handed back as it came
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_teacher_finetuning_runs_on_the_trainer_and_matches_a_plain_ce_loop(tiny):
    """The trainer with `ce` (no teacher) is the landed fine-tuning: padded batches, full logits,
    cross-entropy on the response tokens, the same AdamW and schedule."""
    from kdbench.engine.state import lr_at

    spec = dataclasses.replace(SPEC, steps=3)
    torch.manual_seed(0)
    model = fresh(tiny)
    losses = []
    train(model=model, objective=get_objective("ce"), batches=PackedBatches(tiny["enc"], 4, 0), teacher=None,
          spec=spec, device=torch.device("cpu"), hooks=LogHooks(lambda s, p: losses.append(p["loss"])), progress=False)

    torch.manual_seed(0)
    ref = fresh(tiny)
    opt = torch.optim.AdamW(ref.parameters(), lr=spec.lr, betas=spec.betas, weight_decay=spec.weight_decay)
    src = PackedBatches(tiny["enc"], 4, 0)
    ref_losses = []
    for step in range(3):
        b = next(src).padded()
        for gr in opt.param_groups:
            gr["lr"] = lr_at(step, spec)
        logits = ref(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        m = b["loss_mask"]
        loss = torch.nn.functional.cross_entropy(logits[m].float(), b["labels"][m])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), spec.grad_clip)
        opt.step()
        ref_losses.append(loss.item())
    assert losses == pytest.approx(ref_losses, rel=1e-4)
