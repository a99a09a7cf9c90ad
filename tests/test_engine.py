"""The engine: packed batches, the hidden-state training path, the start-up check, the train
state, and fine-tuning on the same trainer. Tiny random Llama models with the real SmolLM2
tokenizer (tests/tiny_models.py) and real chatterbot-corpus examples keep it to seconds."""

from __future__ import annotations

import copy
import dataclasses
import textwrap

import pytest
import torch

from kdbench.data.batching import collate, encode
from kdbench.engine import state as S
from kdbench.engine.batches import PackedBatches, pack
from kdbench.engine.check import FastPathMismatch, startup_check
from kdbench.engine.forward import final_hidden, head_logits_check, output_head
from kdbench.engine.teacher import LiveTeacher
from kdbench.engine.trainer import TrainingDiverged, train
from kdbench.registry import get_objective, list_objectives, load_plugin_file
from kdbench.suites import TrainSpec

try:
    from tests.tiny_models import make_tiny_pair
except ImportError:  # run from inside tests/
    from tiny_models import make_tiny_pair

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = TrainSpec(steps=4, batch_size=4, max_prompt_tokens=48, max_tokens=64, warmup_steps=1, log_every=1,
                 bf16_autocast=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from kdbench.data.micro import build_splits
    from kdbench.models import load_causal_lm, load_tokenizer

    teacher_path, student_path = make_tiny_pair(tmp_path_factory.mktemp("engine_models"))
    tok = load_tokenizer(teacher_path)
    train_split = build_splits(0.05, 0.12)["train"][:24]
    enc = [(e.id, encode(tok, e.prompt, e.references[0], SPEC.max_prompt_tokens, SPEC.max_tokens, ""))
           for e in train_split]
    teacher = load_causal_lm(teacher_path).eval().requires_grad_(False)
    student0 = load_causal_lm(student_path)
    return {"tok": tok, "enc": enc, "teacher": teacher, "student0": student0, "teacher_path": teacher_path}


def fresh(tiny):
    return copy.deepcopy(tiny["student0"]).train()


# --------------------------------------------------------------------------- packed batches


def test_packed_hidden_states_equal_per_sequence_ones(tiny):
    model = tiny["teacher"]
    items = tiny["enc"][:5]
    batch = pack([e for _, e in items], [i for i, _ in items])
    packed = final_hidden(model, batch)
    one_by_one = torch.cat([final_hidden(model, pack([e], [i])) for i, e in items])
    torch.testing.assert_close(packed, one_by_one, rtol=1e-4, atol=1e-5)
    # and the padded landed layout selects the same rows and labels
    padded = collate([e for _, e in items], tiny["tok"].pad_token_id)
    h = model.base_model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).last_hidden_state
    torch.testing.assert_close(h[padded["loss_mask"]], packed, rtol=1e-4, atol=1e-5)
    assert torch.equal(padded["labels"][padded["loss_mask"]], batch.labels)
    assert batch.n_tokens == int(padded["attention_mask"].sum())  # no padding in a packed batch


def test_batch_order_is_fixed_per_seed_and_the_cursor_resumes(tiny):
    enc = tiny["enc"]
    a = PackedBatches(enc, 4, seed=3)
    first = [next(a).example_ids for _ in range(8)]  # crosses an epoch (6 batches per epoch)
    again = PackedBatches(enc, 4, seed=3)
    assert [next(again).example_ids for _ in range(8)] == first
    assert [next(PackedBatches(enc, 4, seed=4)).example_ids] != first[:1]
    b = PackedBatches(enc, 4, seed=3)
    for _ in range(5):
        next(b)
    cursor = b.state_dict()
    c = PackedBatches(enc, 4, seed=3)
    c.load_state_dict(cursor)
    assert [next(c).example_ids for _ in range(3)] == first[5:8]
    assert a.describe()["epoch0_order_sha256"] == again.describe()["epoch0_order_sha256"]
    with pytest.raises(ValueError, match="does not belong"):
        PackedBatches(enc, 4, seed=9).load_state_dict(cursor)
    with pytest.raises(ValueError, match="unique"):
        PackedBatches(enc + enc[:1], 4, seed=0)


# --------------------------------------------------------------------------- fast path == dense path


def _fast_and_dense(obj, h, w, th, tw, labels, chunk):
    outs = []
    for path in ("dense", "fast"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if path == "dense":
            loss = obj.compute(torch.nn.functional.linear(hh.float(), ww), None if th is None else
                               torch.nn.functional.linear(th.float(), tw), None, labels).loss
        else:
            loss = obj.from_hidden(hh, ww, th, tw, labels=labels, chunk_size=chunk).loss
        loss.backward()
        outs.append((loss.detach(), hh.grad, ww.grad))
    return outs


@pytest.mark.parametrize("name", sorted(s.name for s in list_objectives(include_plugins=False)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_equals_dense_path_for_every_objective(name, dtype):
    g = torch.Generator().manual_seed(0)
    n, d, v = 13, 8, 37
    h = torch.randn(n, d, generator=g).to(dtype)
    th = torch.randn(n, d, generator=g).to(dtype)
    w, tw = torch.randn(v, d, generator=g) * 0.7, torch.randn(v, d, generator=g)
    labels = torch.randint(0, v, (n,), generator=g)
    obj = get_objective(name)
    (l0, gh0, gw0), (l1, gh1, gw1) = _fast_and_dense(obj, h, w, th, tw, labels, chunk=4)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert gh1.dtype == dtype  # gradients come back in the hidden states' dtype
    # bf16 gradients: both paths round the same float32 gradient to bf16, one ulp apart at most
    bf16 = dtype == torch.bfloat16
    torch.testing.assert_close(gh1.float(), gh0.float(), rtol=2e-2 if bf16 else 1e-4, atol=2e-3 if bf16 else 1e-5)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-6)


def test_fast_path_for_a_plugin_objective(tmp_path):
    path = tmp_path / "plug.py"
    path.write_text(textwrap.dedent('''
        from kdbench.registry import objective

        @objective("plug_sq", behaviour="balanced", paper="test plug-in")
        def plug_sq(s, t):
            """Squared probability gap."""
            return ((s.softmax(-1) - t.softmax(-1)) ** 2).sum(-1)
    '''))
    (spec,) = load_plugin_file(path)
    g = torch.Generator().manual_seed(1)
    h, th, w, tw = (torch.randn(9, 6, generator=g), torch.randn(9, 6, generator=g), torch.randn(21, 6, generator=g),
                    torch.randn(21, 6, generator=g))
    (l0, gh0, gw0), (l1, gh1, gw1) = _fast_and_dense(get_objective(spec), h, w, th, tw, None, chunk=2)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gh1, gh0, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(gw1, gw0, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- the start-up check


@pytest.mark.parametrize("name", ["kl", "csd", "csd_ts", "ce", "akl", "jsd"])
def test_startup_check_passes_on_real_batches(tiny, name):
    batch = next(PackedBatches(tiny["enc"], 4, 0))
    res = startup_check(fresh(tiny), get_objective(name), batch, LiveTeacher(tiny["teacher"]), chunk_size=256)
    assert res.passed and res.positions == batch.n_counted
    # well inside the check's tolerances (1e-5 / 1e-4); measured up to 1.8e-6 for kl on an AVX-512 CPU
    assert res.value_rel_err < 5e-6 and max(res.grad_hidden_rel_err, res.grad_head_rel_err) < 1e-5
    assert res.loss_fast == pytest.approx(res.loss_dense, rel=5e-6)


def test_startup_check_refuses_an_objective_whose_rows_are_not_independent(tiny, tmp_path):
    path = tmp_path / "coupled.py"
    path.write_text(textwrap.dedent('''
        from kdbench.registry import objective

        @objective("row_coupled", behaviour="balanced", paper="test plug-in")
        def row_coupled(s, t):
            """Normalised by the rows it sees: chunking changes the value."""
            per = (s.log_softmax(-1) - t.log_softmax(-1)).pow(2).sum(-1)
            return per / per.detach().mean()
    '''))
    (spec,) = load_plugin_file(path)
    batch = next(PackedBatches(tiny["enc"], 4, 0))
    with pytest.raises(FastPathMismatch, match=r"refused objective row_coupled.*gives loss .*dense reference"):
        startup_check(fresh(tiny), get_objective(spec), batch, LiveTeacher(tiny["teacher"]), chunk_size=256)


def test_startup_check_refuses_a_wrong_fast_path(tiny, monkeypatch):
    """A deliberately broken training path (positions shifted by one) is caught before training."""
    from kdbench.engine import check as C

    real = C.final_hidden

    def shifted(model, batch):
        h = real(model, batch)
        return torch.roll(h, 1, 0)

    monkeypatch.setattr(C, "final_hidden", shifted)
    batch = next(PackedBatches(tiny["enc"], 4, 0))
    with pytest.raises(FastPathMismatch, match="refused objective kl"):
        startup_check(fresh(tiny), get_objective("kl"), batch, LiveTeacher(tiny["teacher"]), chunk_size=256)


def test_head_check_catches_a_non_linear_head(tiny):
    model = copy.deepcopy(tiny["teacher"])
    batch = next(PackedBatches(tiny["enc"], 4, 0))
    h = final_hidden(model, batch)
    assert head_logits_check(model, batch, h)["rel_err"] < 1e-5
    head = output_head(model)
    model.lm_head = torch.nn.Sequential()  # a head that is not the weight's linear map
    model.lm_head.weight = head.weight
    model.get_output_embeddings = lambda: head
    cap = 0.5 * float(torch.nn.functional.linear(h, head.weight).abs().max())
    model.lm_head.forward = lambda x: cap * torch.tanh(head(x) / cap)  # soft-capping, as Gemma 2 does
    assert head_logits_check(model, batch, h)["rel_err"] > 1e-2
    model.lm_head.forward = lambda x: 1.05 * head(x)  # a logit scale
    assert head_logits_check(model, batch, h)["rel_err"] > 1e-2


# --------------------------------------------------------------------------- the loop and its state


def _train(tiny, model, steps, state=None, batches=None, optimizer=None, objective="csd", **kw):
    spec = dataclasses.replace(SPEC, steps=steps)
    points = []
    batches = batches or PackedBatches(tiny["enc"], 4, 0)
    res = train(model=model, objective=get_objective(objective), batches=batches, teacher=LiveTeacher(tiny["teacher"]),
                spec=spec, device=torch.device("cpu"), log=lambda s, p: points.append((s, p["loss"])), state=state,
                optimizer=optimizer, progress=False, **kw)
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
              log=lambda s, p: losses.append(p["loss"]), activation_checkpointing=ckpt, progress=False,
              on_step=lambda st, opt: during.append(_checkpointing(model)))
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
          spec=spec, device=torch.device("cpu"), log=lambda s, p: losses.append(p["loss"]), progress=False)

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


def test_startup_check_refuses_a_wrong_declared_gradient(tiny, tmp_path):
    """A plug-in's closed-form gradient replaces autograd in training; a wrong one (here: the
    reverse KL gradient with the sign flipped) is refused before the first step."""
    path = tmp_path / "wrong_grad.py"
    path.write_text(textwrap.dedent('''
        from kdbench.registry import objective

        def flipped(s, t):
            ls, lt = s.log_softmax(-1), t.log_softmax(-1)
            p = ls.exp()
            per = (p * (ls - lt)).sum(-1)
            return per, {}, -(p * ((ls - lt) - per.unsqueeze(-1)))

        @objective("rkl_flipped", behaviour="mode-seeking", paper="test plug-in", gradient=flipped)
        def rkl_flipped(s, t):
            """Reverse KL with a wrong declared gradient."""
            ls, lt = s.log_softmax(-1), t.log_softmax(-1)
            return (ls.exp() * (ls - lt)).sum(-1)
    '''))
    (spec,) = load_plugin_file(path)
    batch = next(PackedBatches(tiny["enc"], 4, 0))
    with pytest.raises(FastPathMismatch, match=r"refused objective rkl_flipped.*gradient mismatch"):
        startup_check(fresh(tiny), get_objective(spec), batch, LiveTeacher(tiny["teacher"]), chunk_size=256)
    # the same plug-in with the right sign passes: the check is about the gradient, nothing else
    right = tmp_path / "right_grad.py"
    right.write_text(path.read_text().replace("return per, {}, -(p", "return per, {}, (p").replace(
        '"rkl_flipped"', '"rkl_closed"'))
    (spec,) = load_plugin_file(right)
    assert startup_check(fresh(tiny), get_objective(spec), batch, LiveTeacher(tiny["teacher"]), chunk_size=256).passed
