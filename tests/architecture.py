"""The import rules of the design (../shared/design.md, "Who may import whom"), checked from the source.

    python -m tests.architecture          # what `make lint` runs; exit 1 naming every broken rule

Every `import` and `from ... import` of `resnet_pipeline/` and `flows/` counts, wherever it is written
(a function-level import is still a dependency), except those under `if TYPE_CHECKING:`. A rule names
the modules it governs and the package modules they may not import; a cycle among the package's
modules is reported with its path.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "resnet_pipeline"


@dataclass(frozen=True)
class Rule:
    """Modules under any of `sources` import nothing under any of `forbidden` (prefixes of dotted
    names), except what `allowed` names."""

    name: str
    sources: tuple[str, ...]
    forbidden: tuple[str, ...]
    allowed: tuple[str, ...] = ()

    def governs(self, module: str) -> bool:
        return any(_under(module, s) for s in self.sources)

    def breaks(self, imported: str) -> bool:
        return any(_under(imported, f) for f in self.forbidden) and not any(_under(imported, a) for a in self.allowed)


RULES = (
    Rule(
        "flows/ run stages through resnet_pipeline.stages and the config loader, nothing else of the package",
        ("flows",),
        (PACKAGE,),
        allowed=(f"{PACKAGE}.stages", f"{PACKAGE}.config", f"{PACKAGE}.redact"),
    ),
    Rule("the package never imports flows/", (PACKAGE,), ("flows",)),
    Rule(
        "config imports nothing above it (only the depth table, the model-spec syntax and URL redaction)",
        (f"{PACKAGE}.config", f"{PACKAGE}.config_checks"),
        (PACKAGE,),
        allowed=(
            f"{PACKAGE}.config",
            f"{PACKAGE}.config_checks",
            f"{PACKAGE}.models.specs",
            f"{PACKAGE}.modelspec",
            f"{PACKAGE}.redact",
        ),
    ),
    Rule(
        "models know nothing of data, training, config or the registry",
        (f"{PACKAGE}.models",),
        (f"{PACKAGE}.data", f"{PACKAGE}.training", f"{PACKAGE}.config", f"{PACKAGE}.registry", f"{PACKAGE}.stages"),
    ),
    Rule(
        "data knows nothing of models, training, evaluation or the registry",
        (f"{PACKAGE}.data",),
        (f"{PACKAGE}.models", f"{PACKAGE}.training", f"{PACKAGE}.evaluation", f"{PACKAGE}.registry"),
    ),
    Rule(
        "training imports no registry and no predict (a registry `train.init` is resolved by the stage)",
        (f"{PACKAGE}.training",),
        (f"{PACKAGE}.registry", f"{PACKAGE}.predict", f"{PACKAGE}.stages", f"{PACKAGE}.cli"),
    ),
    Rule(
        "the registry moves files and metadata: no training, models, data or evaluation",
        (f"{PACKAGE}.registry",),
        (f"{PACKAGE}.training", f"{PACKAGE}.models", f"{PACKAGE}.data", f"{PACKAGE}.evaluation", f"{PACKAGE}.stages"),
    ),
    Rule(
        "stages talk through the contracts module, not each other's internals",
        (PACKAGE, "flows"),
        tuple(
            f"{PACKAGE}.data.{stage}.{name}"
            for stage in ("split", "shard")
            for name in ("INDEX", "SCHEMA", "SPLITS", "read_manifest", "shard_name")
        ),
        allowed=(f"{PACKAGE}.data.contracts",),
    ),
)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in `path`; `from a import b` gives `a.b` (a module or a
    name in it: rules on a prefix match both)."""
    module = module_name(path)
    is_package = path.name == "__init__.py"
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                continue
            if isinstance(child, ast.Import):
                found.extend((child.lineno, alias.name) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = module.split(".") if is_package else module.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                found.extend((child.lineno, f"{base}.{alias.name}" if base else alias.name) for alias in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def sources() -> list[Path]:
    return sorted([*(ROOT / PACKAGE).rglob("*.py"), *(ROOT / "flows").rglob("*.py")])


def _resolve(name: str, modules: set[str]) -> str | None:
    """The package module `name` refers to (itself, or the module a `from` import takes a name from)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def violations() -> list[str]:
    files = sources()
    modules = {module_name(p) for p in files}
    found: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in files:
        module = module_name(path)
        for line, name in imports(path):
            for rule in RULES:
                if rule.governs(module) and rule.breaks(name):
                    found.append(f"{path.relative_to(ROOT)}:{line}: imports {name}: {rule.name}")
            target = _resolve(name, modules)
            if target and target != module:
                graph[module].add(target)
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan), as a path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_path_through(sorted(c), graph) for c in components]


def _path_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle from the component's first module back to itself, through the component."""
    start, members = component[0], set(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt_frontier = []
        for node in frontier:
            for nxt in sorted(graph[node] & members):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if nxt not in parents:
                    parents[nxt] = node
                    nxt_frontier.append(nxt)
        frontier = nxt_frontier
    return component


def main() -> int:
    found = violations()
    for line in found:
        print(line)
    if found:
        print(f"{len(found)} import rule(s) broken (tests/architecture.py)", file=sys.stderr)
        return 1
    print(f"import rules: {len(sources())} modules checked, {len(RULES)} rules, no cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
