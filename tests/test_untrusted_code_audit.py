"""A static audit of the package: nothing that can execute code from a file is called.

Every torch.load passes weights_only=True; no pickle-family module is imported; no eval/exec; YAML is
read with safe_load only; numpy never loads pickles; trust_remote_code is never passed as anything
but False. A new call that breaks one of these fails here, naming the file and line.
"""

import ast
import pathlib

import velotune

PACKAGE = pathlib.Path(velotune.__file__).parent
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle", "joblib"}


def _name(node: ast.AST) -> str:
    """'torch.load' for torch.load(...), 'eval' for eval(...)."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else ""


def _keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def problems_in(source: str, where: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        line = f"{where}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{line} imports {m}" for m in modules if m.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        name = _name(node.func)
        if name in ("eval", "exec", "compile", "__import__"):
            found.append(f"{line} calls {name}()")
        if name.endswith("torch.load"):
            weights_only = _keyword(node, "weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{line} calls torch.load without weights_only=True")
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
            found.append(f"{line} calls {name} (use yaml.safe_load)")
        allow_pickle = _keyword(node, "allow_pickle")
        if allow_pickle is not None and not (isinstance(allow_pickle, ast.Constant) and allow_pickle.value is False):
            found.append(f"{line} passes allow_pickle")
        remote = _keyword(node, "trust_remote_code")
        if remote is not None and not (isinstance(remote, ast.Constant) and remote.value is False):
            found.append(f"{line} passes trust_remote_code other than False")
    return found


def test_the_package_never_calls_anything_that_runs_code_from_a_file():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += problems_in(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE.parent)))
    assert not found, "\n".join(found)


def test_the_audit_catches_each_kind_of_unsafe_call():
    bad = """
import pickle
from dill import loads
import torch, yaml, numpy as np
torch.load("x")
torch.load("x", weights_only=False)
yaml.load(open("c"))
np.load("a.npy", allow_pickle=True)
AutoTokenizer.from_pretrained("f", trust_remote_code=True)
eval("1")
"""
    found = problems_in(bad, "bad.py")
    for what in ("imports pickle", "imports dill", "bad.py:5 calls torch.load", "bad.py:6 calls torch.load",
                 "yaml.load", "allow_pickle", "trust_remote_code", "eval()"):  # fmt: skip
        assert any(what in f for f in found), (what, found)
    good = 'torch.load("x", map_location="cpu", weights_only=True)\nyaml.safe_load(t)\nf(trust_remote_code=False)\n'
    assert problems_in(good, "good.py") == []
