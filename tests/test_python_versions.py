"""setup.py declares the Pythons TensorFlow 2.21 supports (3.10-3.13), and every project source
parses with the Python 3.10 grammar (CI here runs only 3.11, so this is the 3.10 check)."""

import ast
import pathlib
from importlib import metadata

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUPPORTED = ["3.10", "3.11", "3.12", "3.13"]  # TensorFlow 2.21's Python versions


def _setup_keywords() -> dict:
    """The literal keyword arguments of the setup(...) call in setup.py (not executed)."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)
             and getattr(n.func, "id", None) == "setup"]
    assert len(calls) == 1
    out = {}
    for kw in calls[0].keywords:
        try:
            out[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            pass  # not a literal (e.g. find_packages(...))
    return out


def test_python_requires_admits_310_to_313_only():
    spec = SpecifierSet(_setup_keywords()["python_requires"])
    for minor in SUPPORTED:
        for patch in ("0", "9", "20"):
            assert Version(f"{minor}.{patch}") in spec, (minor, str(spec))
    for outside in ("3.9.18", "3.14.0", "4.0.0"):
        assert Version(outside) not in spec, (outside, str(spec))


def test_classifiers_list_each_supported_python_and_match_tensorflow():
    classifiers = _setup_keywords()["classifiers"]
    ours = {c.rsplit(" :: ", 1)[1] for c in classifiers
            if c.startswith("Programming Language :: Python :: 3.")}
    assert ours == set(SUPPORTED)
    tf_meta = metadata.metadata("tensorflow")
    tf_pythons = {c.rsplit(" :: ", 1)[1] for c in tf_meta.get_all("Classifier")
                  if c.startswith("Programming Language :: Python :: 3.")}
    if Version(metadata.version("tensorflow")).release[:2] == (2, 21):
        assert ours == tf_pythons, "setup.py's Pythons should be TensorFlow 2.21's own"
        spec = SpecifierSet(_setup_keywords()["python_requires"])
        assert all(Version(f"{p}.0") in SpecifierSet(tf_meta["Requires-Python"])
                   for p in ours) and all(Version(f"{p}.0") in spec for p in tf_pythons)


def _sources() -> list[pathlib.Path]:
    files = [ROOT / "setup.py"]
    for folder in ("tfdpfair", "experiments", "benchmarks", "tests"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return files


def test_every_source_parses_with_the_python_310_grammar():
    """ast's feature_version=(3, 10) rejects 3.11+ syntax such as `except*` (PEP 654) and
    star-unpacking in subscripts (PEP 646)."""
    bad = []
    for path in _sources():
        try:
            ast.parse(path.read_text(), filename=str(path), feature_version=(3, 10))
        except SyntaxError as err:
            bad.append(f"{path.relative_to(ROOT)}:{err.lineno}: {err.msg}")
    assert not bad, bad


# Standard-library names added in Python 3.11 or later (what's new in 3.11/3.12/3.13); a use
# of one of them would fail on 3.10 at import or run time, which the grammar check cannot see.
_NEWER_THAN_310 = {
    ("tomllib", None), ("typing", "Self"), ("typing", "LiteralString"), ("typing", "Never"),
    ("typing", "assert_never"), ("typing", "assert_type"), ("typing", "reveal_type"),
    ("typing", "dataclass_transform"), ("typing", "Required"), ("typing", "NotRequired"),
    ("typing", "TypeVarTuple"), ("typing", "Unpack"), ("typing", "override"),
    ("enum", "StrEnum"), ("enum", "ReprEnum"), ("enum", "verify"), ("datetime", "UTC"),
    ("asyncio", "TaskGroup"), ("asyncio", "timeout"), ("asyncio", "Runner"),
    ("hashlib", "file_digest"), ("contextlib", "chdir"), ("operator", "call"),
    ("itertools", "batched"), ("math", "cbrt"), ("math", "exp2"),
    ("builtins", "ExceptionGroup"), ("builtins", "BaseExceptionGroup"),
}


def test_no_standard_library_name_newer_than_310():
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            hits = []
            if isinstance(node, ast.Import):
                hits = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                hits = [(node.module, None)] + [(node.module, a.name) for a in node.names]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                hits = [(node.value.id, node.attr)]
            elif isinstance(node, ast.Name):
                hits = [("builtins", node.id)]
            elif isinstance(node, ast.Attribute) and node.attr == "add_note":
                hits = [("BaseException", "add_note")]
            found += [f"{path.relative_to(ROOT)}:{node.lineno}: {m}.{n}" for m, n in hits
                      if (m, n) in _NEWER_THAN_310 or (m, n) == ("BaseException", "add_note")]
    assert not found, found
