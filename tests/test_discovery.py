"""Discovery of the plugin's classes by nnU-Net's own look-ups (nnUNet_extTrainer, register/unregister).

The look-ups run in subprocesses (fresh env vars and sys.path) with nnU-Net's real functions,
against a *copy* of the installed nnunetv2 put first on PYTHONPATH: the installed nnunetv2 is
never modified. All subprocess work happens once, in the module-scoped ``world`` fixture.
"""

from __future__ import annotations

import compileall
import hashlib
import importlib.util
import json
import os
import shutil
import stat
import subprocess
import sys

import nnunetv2
import pytest

from nnunetv2_medseqft.cli.main import main
from nnunetv2_medseqft.errors import MedSeqFTError
from nnunetv2_medseqft.plugin import discovery
from nnunetv2_medseqft.plugin.registry import PLANNERS, TRAINERS

REAL_TRAINER = "MedSeqFTPretrainTrainer"  # must exist in nnunetv2_medseqft.trainers.pretrain
FAKE_PKG = "medseqft_fakeplug"  # a stand-in plugin, to test the mechanism independently of the registry
FAKE_TRAINERS = {"FakeShimTrainer": f"{FAKE_PKG}.trainers"}
FAKE_PLANNERS = {"FakeShimPlanner": f"{FAKE_PKG}.planners"}
FAKE_EXT_TRAINERS = {"FakeExtTrainer": f"{FAKE_PKG}.trainers"}
FAKE_SHIM_FILENAME = "medseqft_fake_shim.py"  # fake shims sit next to ours in the nnunetv2 copy

# runs in the subprocess: argv[1] = modules to make unimportable, argv[2] = [[kind, name], ...]
LOOKUP_SCRIPT = r"""
import json, os, sys
for m in json.loads(sys.argv[1]):
    sys.modules[m] = None  # "uninstalled": import raises ModuleNotFoundError(name=m)
import nnunetv2
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

out = {"nnunetv2": nnunetv2.__path__[0], "results": {}}
for kind, name in json.loads(sys.argv[2]):
    try:
        if kind == "loaded":  # which of these modules were imported so far
            res = sorted(m for m in name.split(",") if sys.modules.get(m) is not None)
        else:
            if kind == "trainer":
                cls, base = recursive_find_trainer_class_by_name(name), nnUNetTrainer
            else:
                folder = os.path.join(nnunetv2.__path__[0], "experiment_planning")
                cls = recursive_find_python_class(folder, name, "nnunetv2.experiment_planning")
                base = ExperimentPlanner
            res = None if cls is None else {
                "class": f"{cls.__module__}.{cls.__qualname__}", "subclass": issubclass(cls, base)}
    except Exception as e:
        res = {"error": type(e).__name__, "message": str(e)}
    out["results"][f"{kind}:{name}"] = res
print("@@RESULT@@" + json.dumps(out))
"""

LOADED_PROBE = ("loaded", f"nnunetv2_medseqft,nnunetv2_medseqft.trainers,{FAKE_PKG}")


def _lookup(cwd, pythonpath, lookups, ext_trainer=None, block=()):
    # like a user's shell: bytecode is written (so the .pyc clean-up of unregister is exercised)
    drop = ("nnUNet_extTrainer", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(pythonpath)
    if ext_trainer is not None:
        env["nnUNet_extTrainer"] = ext_trainer
    proc = subprocess.run(
        [sys.executable, "-c", LOOKUP_SCRIPT, json.dumps(list(block)), json.dumps([list(x) for x in lookups])],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise AssertionError(f"look-up subprocess failed (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def _snapshot(root):
    """Every dir and file under root, files with their sha256 (so also __pycache__ contents)."""
    snap = {}
    for dirpath, _, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        snap[rel + "/"] = "dir"
        for fn in filenames:
            with open(os.path.join(dirpath, fn), "rb") as f:
                snap[os.path.join(rel, fn)] = hashlib.sha256(f.read()).hexdigest()
    return snap


def _trainer_dir(nnunet_dir):
    return os.path.join(nnunet_dir, "training", "nnUNetTrainer")


def _planner_dir(nnunet_dir):
    return os.path.join(nnunet_dir, "experiment_planning")


def _our_pycs(folder):
    cache = os.path.join(folder, "__pycache__")
    return sorted(n for n in os.listdir(cache) if n.startswith("medseqft_shim.")) if os.path.isdir(cache) else []


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Copy nnunetv2, run the look-ups via nnUNet_extTrainer, register, look up, go stale, unregister."""
    base = tmp_path_factory.mktemp("discovery")
    # stand-in plugin + an extra ext-trainer shim dir for it
    fake_root = base / "fakeplug"
    (fake_root / FAKE_PKG).mkdir(parents=True)
    (fake_root / FAKE_PKG / "__init__.py").write_text("")
    (fake_root / FAKE_PKG / "trainers.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n\n"
        "class FakeShimTrainer(nnUNetTrainer):\n    pass\n\n"
        "class FakeExtTrainer(nnUNetTrainer):\n    pass\n")
    (fake_root / FAKE_PKG / "planners.py").write_text(
        "from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import "
        "ExperimentPlanner\n\nclass FakeShimPlanner(ExperimentPlanner):\n    pass\n")
    fake_ext = base / "fake_ext"
    fake_ext.mkdir()
    (fake_ext / "medseqft_fake_trainers.py").write_text(discovery.shim_source(FAKE_EXT_TRAINERS))
    ext_var = os.pathsep.join([discovery.shim_dir(), str(fake_ext)])

    # a private nnunetv2, first on PYTHONPATH
    site = base / "site"
    copy = str(site / "nnunetv2")
    shutil.copytree(nnunetv2.__path__[0], copy, symlinks=True)
    discovery.unregister(copy)  # pristine even if the installed nnunetv2 was registered
    (site / "nnunetv2" / "training" / "nnUNetTrainer" / FAKE_SHIM_FILENAME).write_text(
        discovery.shim_source(FAKE_TRAINERS))
    (site / "nnunetv2" / "experiment_planning" / FAKE_SHIM_FILENAME).write_text(
        discovery.shim_source(FAKE_PLANNERS))
    compileall.compile_dir(copy, quiet=1)  # so the look-ups write no .pyc except our shim's
    pypath = [str(site), str(fake_root)]
    w = {"copy": copy, "fake_ext": str(fake_ext)}

    # 1) nnUNet_extTrainer, nothing registered
    w["ext"] = _lookup(base, pypath, [
        ("trainer", "NoSuchTrainer"), LOADED_PROBE,
        ("trainer", REAL_TRAINER), ("trainer", "FakeExtTrainer"), ("trainer", "nnUNetTrainer"),
    ], ext_trainer=ext_var)

    # 2) register (twice), look up without nnUNet_extTrainer
    w["before"] = _snapshot(copy)
    w["register1"] = discovery.register(copy)
    w["stat1"] = {p: (os.stat(p).st_mtime_ns, os.stat(p).st_ino) for p in w["register1"]}
    w["register2"] = discovery.register(copy)
    w["stat2"] = {p: (os.stat(p).st_mtime_ns, os.stat(p).st_ino) for p in w["register2"]}
    w["registered"] = _lookup(base, pypath, [
        ("trainer", "nnUNetTrainer_5epochs"), ("planner", "ExperimentPlanner"),
        ("planner", "NoSuchPlanner"), ("trainer", "NoSuchTrainer"), LOADED_PROBE,
        ("trainer", REAL_TRAINER), ("trainer", "FakeShimTrainer"), ("planner", "FakeShimPlanner"),
        *[("planner", name) for name in PLANNERS], ("trainer", "nnUNetTrainer"),
    ])

    # 3) stale: shims registered + nnUNet_extTrainer set, but the plugins are not importable
    w["stale"] = _lookup(base, pypath, [
        ("trainer", "nnUNetTrainer"), ("trainer", "nnUNetTrainer_5epochs"), ("planner", "ExperimentPlanner"),
        ("trainer", "NoSuchTrainer"),
        ("trainer", REAL_TRAINER), ("planner", "FakeShimPlanner"), ("trainer", "FakeExtTrainer"),
    ], ext_trainer=ext_var, block=["nnunetv2_medseqft", FAKE_PKG])

    # 4) unregister (twice)
    w["pycs"] = _our_pycs(_trainer_dir(copy)) + _our_pycs(_planner_dir(copy))
    w["unregister1"] = discovery.unregister(copy)
    w["after"] = _snapshot(copy)
    w["unregister2"] = discovery.unregister(copy)
    return w


# ---------------------------------------------------------------- nnUNet_extTrainer


def test_ext_trainer_finds_registry_trainer(world):
    res = world["ext"]["results"]
    assert world["ext"]["nnunetv2"] == world["copy"]
    assert res[f"trainer:{REAL_TRAINER}"] == {
        "class": f"{TRAINERS[REAL_TRAINER]}.{REAL_TRAINER}", "subclass": True}


def test_ext_trainer_mechanism_and_nnunet_classes(world):
    res = world["ext"]["results"]
    assert res["trainer:FakeExtTrainer"] == {"class": f"{FAKE_PKG}.trainers.FakeExtTrainer", "subclass": True}
    assert res["trainer:nnUNetTrainer"]["class"].endswith(".nnUNetTrainer")
    assert res["trainer:NoSuchTrainer"]["error"] == "RuntimeError"  # nnU-Net's own "Could not find"
    # hasattr(shim, unrelated name) imported neither plugin
    assert res["loaded:" + LOADED_PROBE[1]] == []


# ---------------------------------------------------------------- register


def test_register_writes_both_shims_idempotently(world):
    copy = world["copy"]
    expected = [os.path.join(_trainer_dir(copy), "medseqft_shim.py"), os.path.join(_planner_dir(copy), "medseqft_shim.py")]
    assert world["register1"] == world["register2"] == expected
    assert world["stat1"] == world["stat2"]  # second register rewrote nothing


def test_registered_lookups_without_env_var(world):
    out = world["registered"]
    res = out["results"]
    assert out["nnunetv2"] == world["copy"]
    assert res[f"trainer:{REAL_TRAINER}"] == {
        "class": f"{TRAINERS[REAL_TRAINER]}.{REAL_TRAINER}", "subclass": True}
    for name in PLANNERS:  # empty today; must resolve once the registry lists planners
        assert res[f"planner:{name}"] == {"class": f"{PLANNERS[name]}.{name}", "subclass": True}


def test_registered_mechanism_and_nnunet_classes(world):
    res = world["registered"]["results"]
    assert res["trainer:FakeShimTrainer"] == {"class": f"{FAKE_PKG}.trainers.FakeShimTrainer", "subclass": True}
    assert res["planner:FakeShimPlanner"] == {"class": f"{FAKE_PKG}.planners.FakeShimPlanner", "subclass": True}
    assert res["trainer:nnUNetTrainer_5epochs"]["class"].endswith(".nnUNetTrainer_5epochs")
    assert res["trainer:nnUNetTrainer"]["class"].endswith(".nnUNetTrainer")
    assert res["planner:ExperimentPlanner"] == {
        "class": "nnunetv2.experiment_planning.experiment_planners.default_experiment_planner.ExperimentPlanner",
        "subclass": True}
    assert res["planner:NoSuchPlanner"] is None
    assert res["trainer:NoSuchTrainer"]["error"] == "RuntimeError"
    assert res["loaded:" + LOADED_PROBE[1]] == []


def test_stale_shims_keep_nnunet_working_and_explain(world):
    res = world["stale"]["results"]
    assert res["trainer:nnUNetTrainer"]["class"].endswith(".nnUNetTrainer")
    assert res["trainer:nnUNetTrainer_5epochs"]["class"].endswith(".nnUNetTrainer_5epochs")
    assert res["planner:ExperimentPlanner"]["class"].endswith(".ExperimentPlanner")
    assert res["trainer:NoSuchTrainer"]["error"] == "RuntimeError"

    shim = os.path.join(_trainer_dir(world["copy"]), "medseqft_shim.py")
    err = res[f"trainer:{REAL_TRAINER}"]
    assert err["error"] == "ImportError"
    assert f"nnunetv2_medseqft is not installed but a stale shim {shim} exists" in err["message"]
    assert "medseqft unregister" in err["message"] and f"delete {shim}" in err["message"]

    err = res["planner:FakeShimPlanner"]
    assert err["error"] == "ImportError"
    assert f"{FAKE_PKG} is not installed but a stale shim" in err["message"]
    assert os.path.join(_planner_dir(world["copy"]), FAKE_SHIM_FILENAME) in err["message"]

    err = res["trainer:FakeExtTrainer"]  # a shim found through nnUNet_extTrainer
    assert err["error"] == "ImportError"
    assert f"remove {world['fake_ext']} from the nnUNet_extTrainer" in err["message"]


def test_unregister_restores_folder_exactly(world):
    assert world["pycs"], "the look-ups should have compiled the shims (else the .pyc clean-up is untested)"
    assert len(world["unregister1"]) == 2 + len(world["pycs"])
    assert world["after"] == world["before"]
    assert world["unregister2"] == []


# ---------------------------------------------------------------- committed shim dir


def test_committed_ext_shim_is_current():
    path = os.path.join(discovery.shim_dir(), discovery.EXT_SHIM_FILENAME)
    with open(path, encoding="utf-8") as f:
        assert f.read() == discovery.shim_source(TRAINERS), (
            "regenerate it: python -c 'from nnunetv2_medseqft.plugin import discovery as d, registry as r; "
            "open(d.shim_dir() + \"/\" + d.EXT_SHIM_FILENAME, \"w\").write(d.shim_source(r.TRAINERS))'")


def test_shim_dir_holds_only_shims():
    d = discovery.shim_dir()
    assert os.path.isabs(d)
    modules = sorted(n for n in os.listdir(d) if n.endswith(".py"))
    assert modules == ["__init__.py", discovery.EXT_SHIM_FILENAME]
    assert os.path.getsize(os.path.join(d, "__init__.py")) == 0
    assert not [n for n in os.listdir(d) if os.path.isdir(os.path.join(d, n)) and n != "__pycache__"]


# ---------------------------------------------------------------- shim module behaviour (in-process)


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shim_module_resolves_lazily(tmp_path, monkeypatch):
    pkg = tmp_path / "lib" / "medseqft_probe_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text("class Probe:\n    pass\n")
    (pkg / "broken.py").write_text("import medseqft_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    names = {
        "Probe": "medseqft_probe_pkg.mod",
        "Broken": "medseqft_probe_pkg.broken",
        "Gone": "medseqft_probe_pkg.gone",
        "NotThere": "medseqft_probe_pkg.mod",
        "Missing": "medseqft_no_such_pkg.mod",
    }
    shim = tmp_path / "shim.py"
    shim.write_text(discovery.shim_source(names))
    try:
        m = _load(str(shim), "medseqft_test_shim")
        assert not hasattr(m, "nnUNetTrainer") and not hasattr(m, "__path__")
        assert "medseqft_probe_pkg" not in sys.modules  # unrelated names import nothing
        assert set(names) <= set(dir(m))
        assert m.Probe is sys.modules["medseqft_probe_pkg.mod"].Probe
        with pytest.raises(ImportError, match=r"medseqft_no_such_pkg is not installed but a stale shim") as e:
            _ = m.Missing
        assert f"delete {shim}" in str(e.value) and "medseqft unregister" in str(e.value)
        with pytest.raises(ImportError, match=r"has no module medseqft_probe_pkg\.gone.*out of date"):
            _ = m.Gone
        with pytest.raises(ImportError, match=r"does not define NotThere.*out of date"):
            _ = m.NotThere
        with pytest.raises(ModuleNotFoundError) as e:  # a real missing dependency stays as it is
            _ = m.Broken
        assert e.value.name == "medseqft_no_such_dependency"
    finally:
        for mod in [k for k in sys.modules if k.startswith("medseqft_probe_pkg")]:
            del sys.modules[mod]


def test_shim_source_rejects_bad_names():
    for bad in ({"a b": "x"}, {"__path__": "x"}, {"X": "not a module"}, {"X": ""}, {"class": "x"}):
        with pytest.raises(ValueError):
            discovery.shim_source(bad)
    assert discovery.shim_source({}).startswith(discovery.SHIM_MARKER)


# ---------------------------------------------------------------- register/unregister on a fake tree


@pytest.fixture
def tree(tmp_path):
    """Minimal nnunetv2 folder layout."""
    root = tmp_path / "nnunetv2"
    for sub in ("", "training", "training/nnUNetTrainer", "experiment_planning"):
        (root / sub).mkdir(exist_ok=True)
        (root / sub / "__init__.py").write_text("")
        os.chmod(root / sub / "__init__.py", 0o644)
    return str(root)


def _listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_register_unregister_fake_tree(tree):
    before = _snapshot(tree)
    paths = discovery.register(tree)
    assert paths == [os.path.join(_trainer_dir(tree), "medseqft_shim.py"),
                     os.path.join(_planner_dir(tree), "medseqft_shim.py")]
    for path, names in zip(paths, (TRAINERS, PLANNERS), strict=True):
        with open(path, encoding="utf-8") as f:
            assert f.read() == discovery.shim_source(names)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644  # like the package's files, not mkstemp's 0600
    assert not [p for p in _listing(tree) if p.endswith(".tmp")]
    # an outdated shim of ours is refreshed, its stale .pyc dropped
    with open(paths[0], "a", encoding="utf-8") as f:
        f.write("# old\n")
    cache = os.path.join(_trainer_dir(tree), "__pycache__")
    os.mkdir(cache)
    open(os.path.join(cache, "medseqft_shim.cpython-311.pyc"), "wb").close()
    assert discovery.register(tree) == paths
    with open(paths[0], encoding="utf-8") as f:
        assert f.read() == discovery.shim_source(TRAINERS)
    assert not os.path.exists(cache)
    # compiled files of ours are removed, other ones kept
    os.mkdir(cache)
    for n in ("medseqft_shim.cpython-311.pyc", "medseqft_shim.cpython-312.opt-1.pyc", "other.cpython-311.pyc"):
        open(os.path.join(cache, n), "wb").close()
    removed = discovery.unregister(tree)
    assert sorted(removed) == sorted(paths + [os.path.join(cache, "medseqft_shim.cpython-311.pyc"),
                                              os.path.join(cache, "medseqft_shim.cpython-312.opt-1.pyc")])
    assert os.listdir(cache) == ["other.cpython-311.pyc"]
    os.unlink(os.path.join(cache, "other.cpython-311.pyc"))
    os.rmdir(cache)
    assert _snapshot(tree) == before
    assert discovery.unregister(tree) == []


def test_user_file_is_never_touched(tree):
    user = os.path.join(_planner_dir(tree), "medseqft_shim.py")
    with open(user, "w") as f:
        f.write("class MyPlanner: pass\n")
    with pytest.raises(MedSeqFTError, match="not written by nnunetv2_medseqft.*refusing to overwrite"):
        discovery.register(tree)
    assert not os.path.exists(os.path.join(_trainer_dir(tree), "medseqft_shim.py"))  # all or nothing
    with pytest.raises(MedSeqFTError, match="refusing to remove"):
        discovery.unregister(tree)
    with open(user) as f:
        assert f.read() == "class MyPlanner: pass\n"
    os.unlink(user)
    os.mkdir(user)  # a directory of that name is not ours either
    with pytest.raises(MedSeqFTError, match="refusing to overwrite"):
        discovery.register(tree)


def test_not_a_nnunet_dir(tmp_path):
    with pytest.raises(MedSeqFTError, match="does not look like the nnunetv2 package folder"):
        discovery.register(str(tmp_path))


def _deny_writes(monkeypatch, folder):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: (
        False if os.path.abspath(p) == os.path.abspath(folder) and mode & os.W_OK else real_access(p, mode, *a, **k)))


def test_not_writable_register(tree, monkeypatch):
    _deny_writes(monkeypatch, _planner_dir(tree))
    before = _listing(tree)
    with pytest.raises(MedSeqFTError) as e:
        discovery.register(tree)
    msg = str(e.value)
    assert "not writable" in msg and "medseqft env" in msg
    assert f"export nnUNet_extTrainer={discovery.shim_dir()}" in msg
    assert "virtual environment" in msg
    assert _listing(tree) == before  # nothing written into the writable trainer folder either


def test_not_writable_even_if_access_says_yes(tree, monkeypatch):
    # e.g. root on a read-only file system: os.access is not enough, the real try decides
    def mkstemp(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(discovery.tempfile, "mkstemp", mkstemp)
    with pytest.raises(MedSeqFTError, match="not writable"):
        discovery.register(tree)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="chmod does not stop root")
def test_not_writable_chmod(tree):
    os.chmod(_trainer_dir(tree), 0o555)
    try:
        with pytest.raises(MedSeqFTError, match="nnUNet_extTrainer"):
            discovery.register(tree)
    finally:
        os.chmod(_trainer_dir(tree), 0o755)


def test_not_writable_unregister_and_noop_cases(tree, monkeypatch):
    paths = discovery.register(tree)
    _deny_writes(monkeypatch, _trainer_dir(tree))
    assert discovery.register(tree) == paths  # already current: nothing to write, no error
    with pytest.raises(MedSeqFTError, match="cannot remove .*not writable"):
        discovery.unregister(tree)
    assert all(os.path.exists(p) for p in paths)
    monkeypatch.undo()
    discovery.unregister(tree)
    _deny_writes(monkeypatch, _trainer_dir(tree))
    assert discovery.unregister(tree) == []  # nothing registered: no write needed, no error
    cache = os.path.join(_trainer_dir(tree), "__pycache__")
    os.mkdir(cache)
    leftover = os.path.join(cache, "medseqft_shim.cpython-311.pyc")
    open(leftover, "wb").close()
    assert discovery.unregister(tree) == [] and os.path.exists(leftover)  # harmless leftovers: skipped
    monkeypatch.undo()
    assert discovery.unregister(tree) == [leftover, cache]  # writable: cleaned up


# ---------------------------------------------------------------- env / CLI


def test_export_line(monkeypatch):
    d = discovery.shim_dir()
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    assert discovery.ext_trainer_export_line() == f"export nnUNet_extTrainer={d}"
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join(["/a", d, "", "/b", "/a"]))
    assert discovery.ext_trainer_export_line() == "export nnUNet_extTrainer=" + os.pathsep.join([d, "/a", "/b"])
    monkeypatch.setenv("nnUNet_extTrainer", "/my trainers")
    assert discovery.ext_trainer_export_line() == f"export nnUNet_extTrainer='{d}{os.pathsep}/my trainers'"


def test_cli_env(capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    assert main(["env"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"export nnUNet_extTrainer={discovery.shim_dir()}"
    assert lines[1].startswith("#") and "medseqft register" in " ".join(lines[1:])


def test_cli_register_unregister(tree, capsys):
    assert main(["register", "--nnunet-dir", tree]) == 0
    out = capsys.readouterr().out
    assert f"wrote: {os.path.join(_trainer_dir(tree), 'medseqft_shim.py')}" in out
    assert main(["register", "--nnunet-dir", tree]) == 0
    assert "up to date:" in capsys.readouterr().out
    assert main(["unregister", "--nnunet-dir", tree]) == 0
    assert "removed:" in capsys.readouterr().out
    assert main(["unregister", "--nnunet-dir", tree]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_cli_error_exit_2(tmp_path, capsys):
    assert main(["register", "--nnunet-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medseqft register: error:") and "nnunetv2 package folder" in err
    assert "Traceback" not in err
