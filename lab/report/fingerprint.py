"""What decides a verdict, hashed: the prediction, the code that produces its numbers,
the data split and the profile settings it reads.

Source is hashed as its syntax tree (`ast.dump` without docstrings, decorators or line
numbers), so reformatting, comments and docstring edits never change a fingerprint,
while any change to what the code does does. What is followed from a test function:

- the test itself and the fixtures it requests that the project defines (hypotheses/
  and its conftest files), and every helper function of hypotheses/ they call, all the
  way down;
- the `lab` functions they call by name and the `Lab` methods they call on the `lab`
  fixture, one level deep (the lab's internals are tested by tests/, not fingerprinted;
  a refactor of them does not amend every prediction);
- `lab.data` functions, all the way down: they decide the data split;
- module-level constants the code reads (a bound like NANOGPT_README_VAL_LOSS);
- the profile settings: every `profile.<scale>` the followed code reads, per profile.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import hashlib
import inspect
import json
import textwrap
import types
from pathlib import Path

INFRA_FIXTURES = frozenset({"lab", "outcome", "lab_profile", "request", "benchmark", "tmp_path", "tmp_path_factory"})
_SIMPLE = (int, float, str, bool, type(None))


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _strip(node: ast.AST) -> ast.AST:
    for n in ast.walk(node):
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            n.decorator_list = []
            body = n.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
                if isinstance(body[0].value.value, str):
                    n.body = body[1:] or [ast.Pass()]
    return node


def normalised_source(source: str) -> str:
    """The syntax tree of `source`, without docstrings, decorators or positions."""
    return ast.dump(_strip(ast.parse(textwrap.dedent(source))), annotate_fields=True, include_attributes=False)


def _tree(func) -> ast.AST | None:
    try:
        tree = _strip(ast.parse(textwrap.dedent(inspect.getsource(func))))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    for node in tree.body:  # a function's own name is its id, not what it does: renames are moves
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            node.name = "_"
    return tree


def _is_simple_constant(value) -> bool:
    if isinstance(value, _SIMPLE):
        return True
    if isinstance(value, tuple | frozenset):
        return all(_is_simple_constant(v) for v in value)
    return False


def _module_of(obj) -> str:
    return getattr(obj, "__module__", None) or ""


def stable_repr(value) -> str:
    """repr, but the same in every process: a set's repr follows string hashing, which
    Python randomises per process, so its elements are sorted first."""
    if isinstance(value, (set, frozenset)):
        return f"{type(value).__name__}({sorted(stable_repr(v) for v in value)})"
    if type(value) in (list, tuple):
        inner = ", ".join(stable_repr(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if type(value) is dict:
        return "{" + ", ".join(f"{stable_repr(k)}: {stable_repr(v)}" for k, v in value.items()) + "}"
    return repr(value)


class Follower:
    """Walks the code a test depends on and hashes it (see the module docstring)."""

    def __init__(self, project_root: Path, lab_class=None):
        self.root = Path(project_root).resolve()
        self.lab_class = lab_class
        self.code: dict[str, str] = {}  # qualified name -> normalised source
        self.data: dict[str, str] = {}
        self.constants: dict[str, str] = {}
        self.scales: set[str] = set()
        self.uses_seeds = False
        self._seen: set[int] = set()

    def _in_project(self, func) -> bool:
        try:
            path = Path(inspect.getsourcefile(func) or "").resolve()
        except TypeError:
            return False
        hyp = self.root / "hypotheses"
        return path.is_relative_to(hyp) or path == self.root / "conftest.py"

    def follow(self, func, *, depth: str = "project", key: str | None = None) -> None:
        """depth: "project" (hypotheses code: follow everything), "lab" (one level),
        "data" (lab.data: follow lab.data calls). `key` names the function in the hash
        (the test itself is hashed as "<test>", so renaming it is not a change)."""
        func = inspect.unwrap(func)
        if id(func) in self._seen or not isinstance(func, types.FunctionType):
            return
        self._seen.add(id(func))
        tree = _tree(func)
        if tree is None:
            return
        # keyed by name, not module: moving a helper to another module is not a change
        target = self.data if depth == "data" else self.code
        name = key or func.__qualname__
        while name in target:
            name += "'"
        target[name] = ast.dump(tree, annotate_fields=True, include_attributes=False)
        self._scan_profile(tree)
        lab_params = self._lab_params(func)
        for ref in self._references(tree, func, lab_params):
            self._visit(ref, depth)

    def _visit(self, obj, depth: str) -> None:
        if isinstance(obj, tuple):  # ("const", name, value)
            self.constants[obj[1]] = stable_repr(obj[2])
            return
        if not isinstance(obj, types.FunctionType):
            return
        mod = _module_of(obj)
        if self._in_project(obj):
            if depth == "project":
                self.follow(obj, depth="project")
        elif mod == "lab.data" or mod.startswith("lab.data."):
            self.follow(obj, depth="data")
        elif mod.startswith("lab.") and not mod.startswith("lab.report") and depth == "project":
            self.follow(obj, depth="lab")

    def _lab_params(self, func) -> set[str]:
        try:
            params = set(inspect.signature(func).parameters)
        except (TypeError, ValueError):
            return set()
        return params & {"lab", "self"} if self.lab_class is not None else set()

    def _references(self, tree: ast.AST, func, lab_params: set[str]):
        g = func.__globals__
        closure = {}
        for name, cell in zip(func.__code__.co_freevars, func.__closure__ or ()):
            try:
                closure[name] = cell.cell_contents
            except ValueError:  # an empty cell: the variable is assigned later
                pass
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
                if node.id in closure:
                    value = closure[node.id]
                elif node.id in g:
                    value = g[node.id]
                else:
                    continue
                if hasattr(builtins, node.id) and value is getattr(builtins, node.id):
                    continue
                if _is_simple_constant(value) and node.id.isupper():
                    yield ("const", node.id, value)
                elif isinstance(value, types.FunctionType):
                    yield value
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                base = node.value.id
                if base in lab_params and self.lab_class is not None:
                    attr = inspect.getattr_static(self.lab_class, node.attr, None)
                    target = getattr(attr, "fget", attr)
                    if isinstance(target, types.FunctionType):
                        yield target
                elif isinstance(g.get(base), types.ModuleType):
                    value = getattr(g[base], node.attr, None)
                    if isinstance(value, types.FunctionType):
                        yield value

    def _scan_profile(self, tree: ast.AST) -> None:
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            v = node.value
            if isinstance(v, ast.Attribute) and v.attr == "profile":
                self.scales.add(node.attr)
            elif isinstance(v, ast.Name) and v.id in ("lab_profile", "profile"):
                self.scales.add(node.attr)
            elif node.attr == "seeds" and isinstance(v, ast.Name) and v.id in ("lab", "self"):
                self.uses_seeds = True

    def settings(self, profile) -> dict:
        out = {}
        for scale in sorted(self.scales):
            value = getattr(profile, scale, None)
            if dataclasses.is_dataclass(value):
                out[scale] = dataclasses.asdict(value)
            elif value is not None and not callable(value):
                out[scale] = value
        if self.uses_seeds:
            out["seeds"] = list(profile.seeds)
        return out
