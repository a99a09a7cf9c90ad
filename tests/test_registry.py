"""Registry: lookup, parameters, settings, aliases, plugins, discovery, catalogue/docs."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kdbench import plugins, registry
from kdbench.catalogue import format_catalogue, main as catalogue_main, render_objectives_md
from kdbench.errors import KdbenchWarning, UserError
from kdbench.registry import (
    BEHAVIOURS,
    ObjectiveError,
    ObjectiveSpec,
    Param,
    ParamSpec,
    get_objective,
    list_objectives,
    load_plugin_file,
    objective,
    parse_setting,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: see conftest


ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ["ab", "akl", "ce", "csd", "dld", "hinton", "jeffreys", "jsd", "kl", "rkl", "skl", "skl_sym", "srkl", "tvd"]


@pytest.fixture()
def fresh_registry(monkeypatch):
    """An empty, undiscovered registry state for this test only (built-ins are re-found)."""
    monkeypatch.setattr(registry, "_state", registry._State())
    monkeypatch.setattr(plugins, "_modules", {})
    return registry


def valid_choices(message: str) -> list[str]:
    return [c.strip() for c in message.split("valid choices:")[1].split(",")]


# ---------------------------------------------------------------------------------------------
# names and parameters
# ---------------------------------------------------------------------------------------------


def test_unknown_name_lists_closest_match_first():
    with pytest.raises(ValueError) as err:
        get_objective("csdd")
    msg = str(err.value)
    assert "unknown objective 'csdd'" in msg and "did you mean 'csd'" in msg
    choices = valid_choices(msg)
    assert choices[0] == "csd"
    assert set(REQUIRED) | {"csd_ss", "csd_us", "csd_ts"} <= set(choices)
    with pytest.raises(ValueError) as err:
        get_objective("rlk")
    assert valid_choices(str(err.value))[0] == "rkl"
    assert isinstance(err.value, UserError) and isinstance(err.value, ObjectiveError)  # CLI: no traceback


def test_bad_parameter_name_type_choice_and_range():
    with pytest.raises(ValueError) as err:
        get_objective("csd", tua=1.5)
    assert valid_choices(str(err.value))[0] == "tau"
    assert set(valid_choices(str(err.value))) == {"tau", "alpha", "w1", "w2"}
    with pytest.raises(ValueError, match="expects a float"):
        get_objective("csd", tau="hot")
    with pytest.raises(ValueError, match="expects a float"):
        get_objective("csd", tau=True)
    with pytest.raises(ValueError, match=r"must be in \[0.05, 100.0\]"):
        get_objective("csd", tau=0)
    with pytest.raises(ValueError, match=r"must be in \{0.0\} ∪ \[1e-30, 1.0\]"):
        get_objective("jsd", beta=1.5)
    with pytest.raises(ValueError, match="finite"):
        get_objective("ab", alpha=float("nan"))
    with pytest.raises(ValueError) as err:
        get_objective("csd", w1="X")
    assert set(valid_choices(str(err.value))) == {"S", "T", "U", "mix"}
    with pytest.raises(ValueError) as err:
        get_objective("dld", norm="meen")
    assert valid_choices(str(err.value))[0] == "mean"
    with pytest.raises(ValueError, match="takes no parameters"):
        get_objective("kl", tau=2.0)


def test_string_values_are_coerced_by_declared_type():
    obj = get_objective("csd", tau="1.5", w1="u", alpha="0.2", w2="mix")
    assert obj.params == {"w1": "U", "w2": "mix", "tau": 1.5, "alpha": 0.2}
    assert isinstance(obj.params["tau"], float)
    assert get_objective("hinton", tau=3).params["tau"] == 3.0
    p_int = ParamSpec("k", int, 3, min=1)
    assert p_int.coerce("4") == 4 and p_int.coerce(5.0) == 5
    with pytest.raises(ValueError, match="expects a int"):
        p_int.coerce("4.5")
    p_bool = Param("flag", bool, False)
    assert p_bool.coerce("true") is True and p_bool.coerce("0") is False and p_bool.coerce(True) is True
    with pytest.raises(ValueError, match="expects a bool"):
        p_bool.coerce("maybe")
    assert Param("name", str, "x").coerce("y") == "y"


def test_resolved_params_setting_and_spec():
    obj = get_objective("csd")
    assert obj.name == "csd" and obj.spec.name == "csd"
    assert obj.params == {"w1": "S", "w2": "S", "tau": 1.0, "alpha": 0.15}
    assert obj.setting == "csd(tau=1.0,w1=S,w2=S)"
    assert get_objective("csd", tau=1.5).setting == "csd(tau=1.5,w1=S,w2=S)"
    # inactive parameters are left out of the setting (alpha only matters for mix, tau for S/mix)
    assert get_objective("csd", w1="T", w2="T", tau=3.0).setting == "csd(w1=T,w2=T)"
    assert get_objective("csd", w1="mix").setting == "csd(alpha=0.15,tau=1.0,w1=mix,w2=S)"
    assert get_objective("kl").setting == "kl"
    assert get_objective("skl_sym").setting == "skl_sym(lam=0.9)"
    assert get_objective("dld").setting == "dld(norm=none,weight=U)"


def test_aliases_resolve_to_canonical_objective_and_params():
    ts = get_objective("csd_ts")
    assert ts.name == "csd" and ts.setting == "csd(tau=1.0,w1=T,w2=S)"
    assert get_objective("csd_ss").setting == get_objective("csd").setting
    assert get_objective("csd_us").params["w1"] == "U"
    assert get_objective("csd_ts", tau="1.5").setting == "csd(tau=1.5,w1=T,w2=S)"
    assert get_objective("csd_ts", w1="T").setting == ts.setting  # the same value is fine
    with pytest.raises(ValueError, match="fixes w1=T"):
        get_objective("csd_ts", w1="S")
    assert get_objective("csd_ts") == get_objective("csd", w1="T", w2="S")


def test_setting_strings_round_trip():
    for spec in list_objectives():
        obj = get_objective(spec.name)
        again = get_objective(obj.setting)
        assert again.setting == obj.setting and again.params == obj.params
    obj = get_objective("csd(tau=1.5, w1=T)")
    assert obj.setting == "csd(tau=1.5,w1=T,w2=S)"
    assert parse_setting("jsd(beta=0.1)") == ("jsd", {"beta": "0.1"})
    assert parse_setting("kl") == ("kl", {})
    with pytest.raises(ValueError, match="key=value"):
        get_objective("csd(tau)")
    with pytest.raises(ValueError, match="both"):
        get_objective("csd(tau=1.5)", tau=2.0)


def test_list_objectives_metadata():
    # built-ins only: plugins loaded by other tests in this process need not document a formula
    specs = {s.name: s for s in list_objectives(include_plugins=False)}
    assert set(REQUIRED) <= set(specs)
    for spec in specs.values():
        assert isinstance(spec, ObjectiveSpec)
        assert spec.behaviour in BEHAVIOURS
        assert spec.formula and spec.summary and spec.paper
        assert isinstance(spec.version, int) and spec.version >= 1
        assert spec.source.startswith("kdbench.objectives.")
        assert all(isinstance(p, ParamSpec) for p in spec.params)
    assert specs["ce"].needs_teacher is False and specs["ce"].needs_labels is True
    assert specs["ce"].behaviour == "supervised"
    assert specs["csd"].aliases == {"csd_ss": {"w1": "S", "w2": "S"}, "csd_us": {"w1": "U", "w2": "S"}, "csd_ts": {"w1": "T", "w2": "S"}}
    assert [p.name for p in specs["csd"].params] == ["w1", "w2", "tau", "alpha"]
    assert specs["csd"].param("tau").default == 1.0
    assert "2509.25837" in specs["csd"].paper and "2404.02657" in specs["akl"].paper
    assert specs["rkl"].behaviour == "mode-seeking" and specs["kl"].behaviour == "mode-covering"


def test_discovery_is_lazy():
    code = "import sys, kdbench.registry; print(any(m == 'kdbench.objectives' or m.startswith('kdbench.objectives.') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# declaring and plugins
# ---------------------------------------------------------------------------------------------

PLUGIN = '''
from kdbench.registry import Param, objective


@objective("{name}", behaviour="balanced", paper="a test plugin",
           params=[Param("scale", float, 1.0, doc="multiplier", min=0.0)])
def {name}(s, t, *, scale):
    """Scaled squared error of probabilities (test plugin).

    L = scale · Σ_v (p − q)²
    """
    return scale * ((t.softmax(-1) - s.softmax(-1)) ** 2).sum(-1)
'''


def write_plugin(directory: Path, filename: str, name: str) -> Path:
    path = directory / filename
    path.write_text(textwrap.dedent(PLUGIN.format(name=name)))
    return path


def test_plugin_file_by_path_and_name(fresh_registry, tmp_path):
    path = write_plugin(tmp_path, "my_objective.py", "sqprob")
    obj = get_objective(f"{path}:sqprob", scale="2")
    assert obj.setting == "sqprob(scale=2.0)" and obj.spec.source == str(path.resolve())
    assert obj.spec.summary == "Scaled squared error of probabilities (test plugin)."
    assert obj.spec.formula == "L = scale · Σ_v (p − q)²"
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    expected = 2 * ((t.softmax(-1) - s.softmax(-1)) ** 2).sum(-1).mean()
    assert obj(s, t, None).item() == pytest.approx(expected.item(), rel=1e-6)
    names = [spec.name for spec in list_objectives()]
    assert "sqprob" in names and "csd" in names
    assert "sqprob" not in [spec.name for spec in list_objectives(include_plugins=False)]
    # after loading, the plain name works too; loading twice is harmless
    assert get_objective("sqprob").params == {"scale": 1.0}
    assert [s.name for s in load_plugin_file(path)] == ["sqprob"]
    assert get_objective(f"{path}:").name == "sqprob"  # the only objective in the file


def test_plugin_file_errors(fresh_registry, tmp_path):
    with pytest.raises(ValueError, match="not found"):
        get_objective(f"{tmp_path}/missing.py:x")
    dup = write_plugin(tmp_path, "dup.py", "kl")
    with pytest.raises(ValueError, match="declared twice"):
        get_objective(f"{dup}:kl")
    broken = tmp_path / "broken.py"
    broken.write_text("def oops(:\n")
    with pytest.raises(ValueError, match="failed to import"):
        load_plugin_file(broken)
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="declares no objective"):
        load_plugin_file(empty)
    ok = write_plugin(tmp_path, "ok.py", "okobj")
    with pytest.raises(ValueError) as err:
        get_objective(f"{ok}:okobjj")
    assert valid_choices(str(err.value))[0] == "okobj"


def test_entry_point_plugins(fresh_registry, tmp_path, monkeypatch):
    write_plugin(tmp_path, "kdb_ep_module.py", "epmod")
    write_plugin(tmp_path, "kdb_ep_function.py", "epfn")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        importlib.metadata.EntryPoint(name="epmod", value="kdb_ep_module", group="kdbench.objectives"),
        importlib.metadata.EntryPoint(name="epfn", value="kdb_ep_function:epfn", group="kdbench.objectives"),
        importlib.metadata.EntryPoint(name="gone", value="kdb_no_such_module", group="kdbench.objectives"),
    ]
    monkeypatch.setattr(plugins, "entry_points", lambda: eps)
    with pytest.warns(UserWarning, match="'gone'"):
        names = [s.name for s in list_objectives()]
    assert {"epmod", "epfn", "csd"} <= set(names)
    assert get_objective("epfn", scale=0.5).setting == "epfn(scale=0.5)"
    assert registry._state.specs["epmod"].source == "kdb_ep_module"


def test_duplicate_entry_point_is_reported_and_skipped(fresh_registry, tmp_path, monkeypatch):
    write_plugin(tmp_path, "kdb_ep_dup.py", "rkl")
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [importlib.metadata.EntryPoint(name="dup", value="kdb_ep_dup", group="kdbench.objectives")]
    monkeypatch.setattr(plugins, "entry_points", lambda: eps)
    with pytest.warns(KdbenchWarning, match="'dup'.*'rkl' is declared twice"):
        names = [s.name for s in list_objectives()]
    assert "rkl" in names and registry._state.specs["rkl"].source == "kdbench.objectives.rkl"
    with pytest.raises(ObjectiveError, match=r"entry point 'dup' \(kdb_ep_dup\) failed to load.*declared twice"):
        get_objective("dup")


def _warnings_of(fn):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(w.message) for w in caught if issubclass(w.category, KdbenchWarning)]


def test_broken_plugins_in_the_plugin_path_are_skipped_by_name(fresh_registry, tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    write_plugin(folder, "good.py", "goodobj")
    (folder / "syntax.py").write_text("def oops(:\n")
    (folder / "importerr.py").write_text("import kdbench_no_such_module_xyz\n")
    (folder / "nothing.py").write_text("x = 1\n")
    (folder / "badecl.py").write_text(textwrap.dedent('''
        from kdbench.registry import objective

        @objective("fine_first", behaviour="balanced", paper="-")
        def fine_first(s, t):
            """Registered before the bad one: must be rolled back."""
            return (s - t).pow(2).mean(-1)

        @objective("badecl", behaviour="greedy", paper="-")
        def badecl(s, t):
            return s.sum(-1)
    '''))
    write_plugin(folder, "dupkl.py", "kl")
    (folder / "_private.py").write_text("raise RuntimeError('never imported')\n")
    monkeypatch.setenv("KDBENCH_PLUGIN_PATH", str(folder))
    specs, warned = _warnings_of(list_objectives)
    names = {s.name for s in specs}
    assert "goodobj" in names and "csd" in names and "fine_first" not in names
    assert registry._state.specs["kl"].source == "kdbench.objectives.kl"
    assert len(warned) == 5 and all(w.count("\n") == 0 for w in warned)
    joined = " | ".join(warned)
    for stem, why in [("syntax", "SyntaxError"), ("importerr", "ModuleNotFoundError"), ("nothing", "no objective"),
                      ("badecl", "behaviour"), ("dupkl", "declared twice")]:
        assert any(f"{stem}.py" in w and why in w for w in warned), (stem, joined)
    # a command that does not use them goes on: one warning each per process, never twice
    obj, again = _warnings_of(lambda: get_objective("csd"))
    assert obj.name == "csd" and again == []
    # asking for a broken one: its failure, naming the file
    with pytest.raises(ObjectiveError, match=r"syntax\.py.*SyntaxError"):
        get_objective("syntax")
    with pytest.raises(ObjectiveError, match="plug-ins that failed to load: badecl, dupkl, importerr, nothing, syntax"):
        get_objective("nosuchobjective")
    with pytest.raises(ObjectiveError, match=r"importerr\.py.*failed to import.*kdbench_no_such_module_xyz"):
        get_objective(f"{folder / 'importerr.py'}:x")


@pytest.mark.parametrize("value, why", [("/nonexistent-kdbench-plugins", "does not exist"), ("FILE", "is not a directory")])
def test_bad_plugin_path_is_an_error(fresh_registry, tmp_path, monkeypatch, value, why):
    if value == "FILE":
        value = str(tmp_path / "afile.py")
        Path(value).write_text("x = 1\n")
    monkeypatch.setenv("KDBENCH_PLUGIN_PATH", f"{value}{__import__('os').pathsep}")
    with pytest.raises(ObjectiveError, match=f"KDBENCH_PLUGIN_PATH names .*{why}"):
        list_objectives()


def test_case_only_differences_get_a_hint():
    for wrong, right in [("KL", "kl"), ("CSD", "csd"), ("Csd_Ts", "csd_ts"), ("TVD", "tvd")]:
        with pytest.raises(ObjectiveError) as err:
            get_objective(wrong)
        assert f"did you mean {right!r}?" in str(err.value)
        assert valid_choices(str(err.value))[0] == right


def test_a_local_objectives_folder_never_runs(tmp_path):
    """`kdbench list` from a folder with its own objectives/ package must not import it."""
    import os

    marker = tmp_path / "EXECUTED"
    pkg = tmp_path / "objectives"
    pkg.mkdir()
    code = f"open({str(marker)!r}, 'w').write('x')\nraise SystemExit('local objectives package was imported')\n"
    (pkg / "__init__.py").write_text(code)
    (pkg / "kl.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("KDBENCH_PLUGIN_PATH", None)
    res = subprocess.run([sys.executable, "-m", "kdbench", "list"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "csd" in res.stdout and "kl" in res.stdout
    assert not marker.exists()


def test_decorator_validation(fresh_registry):
    with pytest.raises(ValueError, match="behaviour"):
        objective("x1", behaviour="greedy", paper="-")
    with pytest.raises(ValueError, match="does not accept"):

        @objective("x2", behaviour="balanced", paper="-", params=[Param("tau", float, 1.0)])
        def x2(s, t):
            return s.sum(-1)

    with pytest.raises(ValueError, match="needs choices"):
        Param("w", "choice", "S")
    with pytest.raises(ValueError, match="must be in"):
        Param("tau", float, -1.0, min=0.0)

    @objective("x3", behaviour="balanced", paper="-", aliases={"x3_big": {"k": 5}}, params=[Param("k", int, 1, min=1)])
    def x3(s, t, *, k):
        """Inline objective."""
        return k * (s - t).pow(2).mean(-1)

    assert get_objective("x3_big").setting == "x3(k=5)"
    with pytest.raises(ValueError, match="already taken"):

        @objective("x4", behaviour="balanced", paper="-", aliases={"x3_big": {}})
        def x4(s, t):
            return s.sum(-1)


def test_bad_return_shape_is_reported(fresh_registry):
    @objective("scalar_out", behaviour="balanced", paper="-")
    def scalar_out(s, t):
        return s.sum()

    with pytest.raises(RuntimeError, match="per-position tensor"):
        get_objective("scalar_out")(torch.randn(2, 4), torch.randn(2, 4), None)


def test_sys_exit_inside_an_objective_fails_the_call_not_the_process(fresh_registry):
    """The call boundary (Objective.invoke): SystemExit from an objective's code becomes an ordinary
    exception, which a training run records as failed; the user's Ctrl-C still goes through."""
    from kdbench.objective import ObjectiveContractError

    @objective("exits_when_called", behaviour="balanced", paper="-")
    def exits_when_called(s, t):
        sys.exit(3)

    def exiting_gradient(s, t):
        raise SystemExit("bye")

    @objective("exits_in_gradient", behaviour="balanced", paper="-", gradient=exiting_gradient)
    def exits_in_gradient(s, t):
        return (s - t).pow(2).mean(-1)

    @objective("ctrl_c", behaviour="balanced", paper="-")
    def ctrl_c(s, t):
        raise KeyboardInterrupt

    s, t = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5)
    with pytest.raises(ObjectiveContractError, match=r"'exits_when_called' \(plugin [\w.]*test_registry\) broke its "
                                                     r"contract: it called sys\.exit\(3\)") as err:
        get_objective("exits_when_called")(s, t, None)
    assert isinstance(err.value, Exception)  # what the runner records as failed (runner.run: except Exception)
    h, w = torch.randn(4, 6, requires_grad=True), torch.randn(5, 6, requires_grad=True)
    th, tw = torch.randn(4, 6), torch.randn(5, 6)
    with pytest.raises(ObjectiveContractError, match=r"sys\.exit\(3\)"):  # the training path
        get_objective("exits_when_called").from_hidden(h, w, th, tw).loss.backward()
    with pytest.raises(ObjectiveContractError, match=r"sys\.exit\('bye'\)"):  # a declared gradient too
        get_objective("exits_in_gradient").from_hidden(h, w, th, tw).loss.backward()
    with pytest.raises(KeyboardInterrupt):
        get_objective("ctrl_c")(s, t, None)


def test_numbers_are_read_strictly():
    """No '_' digit separators (float('1_5') is 15.0); other Unicode digits read as Python reads them."""
    from kdbench.run_option import _int_in, _positive_float

    for text in ("1_5", "1_000", " 1_0 "):
        with pytest.raises(ObjectiveError, match="'_' digit separators are not accepted"):
            get_objective("csd", tau=text)
    with pytest.raises(ObjectiveError, match="digit separators"):
        get_objective("csd(tau=1_5)")
    assert get_objective("csd", tau="１.５").params["tau"] == 1.5  # full-width digits
    assert get_objective("hinton", tau="٢").params["tau"] == 2.0  # Arabic-Indic
    k = ParamSpec("k", int, 3, min=1)
    assert k.coerce("１２") == 12 and k.coerce("1e3") == 1000 and k.coerce(str(10**22)) == 10**22
    for bad in ("1_0", "1e22", "1.5"):  # 1e22 as a float is not the integer it reads as
        with pytest.raises(ObjectiveError, match="expects a int"):
            k.coerce(bad)
    with pytest.raises(ObjectiveError, match="expects a float"):
        get_objective("csd", tau=10**400)  # float() overflows: a clear refusal, not an OverflowError
    steps, lr = _int_in("--steps", 1, 10**9), _positive_float("--lr")
    assert steps("１０") == 10 and lr("３e-4") == pytest.approx(3e-4)
    import argparse

    for parse, text in ((steps, "1_0"), (lr, "1_0"), (lr, "1e-4_")):
        with pytest.raises(argparse.ArgumentTypeError, match="digit separators"):
            parse(text)


def test_a_range_may_admit_an_exact_limit_outside_it():
    beta = ParamSpec("beta", float, 0.5, min=1e-30, max=1.0, also=(0.0,))
    assert beta.coerce("0") == 0.0 and beta.coerce(1e-30) == 1e-30 and beta.coerce(1) == 1.0
    assert beta.describe() == "beta: float in {0.0} ∪ [1e-30, 1.0] = 0.5"
    for bad in (1e-31, -0.1, 1.5):
        with pytest.raises(ObjectiveError, match=r"must be in \{0.0\} ∪ \[1e-30, 1.0\]"):
            beta.coerce(bad)


def test_plugin_modules_may_hold_odd_objects(fresh_registry, tmp_path):
    """A module-level __getattr__ or an object whose __getattr__ raises declares nothing and breaks nothing."""
    path = tmp_path / "odd.py"
    path.write_text(textwrap.dedent('''
        from kdbench.registry import objective

        def __getattr__(name):
            raise RuntimeError("module __getattr__ asked for " + name)

        class Odd:
            def __getattr__(self, name):
                raise RuntimeError("odd object: no " + name)

        odd = Odd()

        @objective("odd_ok", behaviour="balanced", paper="-")
        def odd_ok(s, t):
            """Fine."""
            return (s - t).pow(2).mean(-1)
    '''))
    assert get_objective(f"{path}:odd_ok").name == "odd_ok"
    (tmp_path / "only_odd.py").write_text("class Odd:\n    def __getattr__(self, n):\n        raise ValueError(n)\n"
                                          "odd = Odd()\n")
    with pytest.raises(ObjectiveError, match="declares no objective"):
        get_objective(f"{tmp_path / 'only_odd.py'}:x")


def test_plugins_calling_sys_exit_are_skipped_with_a_warning(fresh_registry, tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    write_plugin(folder, "good.py", "goodobj")
    (folder / "bye.py").write_text("import sys\nsys.exit(0)\n")
    (folder / "bye_msg.py").write_text("raise SystemExit('not today')\n")
    monkeypatch.setenv("KDBENCH_PLUGIN_PATH", str(folder))
    specs, warned = _warnings_of(list_objectives)
    assert {"goodobj", "csd", "kl"} <= {s.name for s in specs}
    assert len(warned) == 2 and all(w.count("\n") == 0 for w in warned)
    assert any("bye.py" in w and "it called sys.exit(0)" in w for w in warned)
    assert any("bye_msg.py" in w and "sys.exit('not today')" in w for w in warned)
    with pytest.raises(ObjectiveError, match=r"bye\.py.*it called sys\.exit\(0\)"):
        get_objective("bye")


# ---------------------------------------------------------------------------------------------
# catalogue and docs
# ---------------------------------------------------------------------------------------------


def test_catalogue_table():
    text = format_catalogue(list_objectives())
    for name in REQUIRED:
        assert f"\n{name} " in text
    assert "w1=S, w2=S, tau=1.0, alpha=0.15" in text
    assert "arXiv:2509.25837" in text and "csd_ts = csd(w1=T,w2=S)" in text


def test_committed_objectives_doc_is_up_to_date():
    generated = render_objectives_md(list_objectives(include_plugins=False))
    committed = (ROOT / "docs" / "objectives.md").read_text(encoding="utf-8")
    assert committed == generated, "regenerate: python -m kdbench.catalogue --write docs/objectives.md"
    assert "2τ²" in generated and "divided by β(1−β)" in generated
    for name in REQUIRED:
        assert f"\n## {name}\n" in generated
    assert catalogue_main(["--check", str(ROOT / "docs" / "objectives.md")]) == 0


def test_adding_an_objective_doc_exists():
    text = (ROOT / "docs" / "adding-an-objective.md").read_text(encoding="utf-8")
    assert "@objective(" in text and 'project.entry-points."kdbench.objectives"' in text
