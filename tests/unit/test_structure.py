"""Structure rules the code keeps: functions short enough to read, and settings read from the
environment in one place per process (the settings modules)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [p for d in ("palm_rlhf", "services", "kernels", "clients", "bench") for p in (ROOT / d).rglob("*.py")
           if "proto/v1" not in p.as_posix()]
MAX_FUNCTION_LINES = 150
SETTINGS_MODULES = {
    "services/common/settings.py",
    "services/gateway/settings.py",
    "kernels/settings.py",
    "palm_rlhf/demo/settings.py",
}
# environment reads that are not settings of this project
ENV_READS_ALLOWED = {
    "kernels/_runtime.py": "TRITON_INTERPRET is Triton's own switch, which tests flip at run time",
}


def _rel(p: Path) -> str:
    return p.relative_to(ROOT).as_posix()


def test_no_function_is_longer_than_150_lines():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{_rel(path)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def _env_reads(tree: ast.AST) -> list[int]:
    """Lines that read a variable: os.getenv(...), os.environ.get(...), os.environ[...] (a
    copy of the whole environment for a child process, dict(os.environ, ...), is not a read)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            f = node.func
            if f.attr == "getenv" and isinstance(f.value, ast.Name) and f.value.id == "os":
                lines.append(node.lineno)
            if (f.attr in ("get", "setdefault", "pop") and isinstance(f.value, ast.Attribute)
                    and f.value.attr == "environ"):
                lines.append(node.lineno)
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "environ":
            lines.append(node.lineno)
    return lines


def test_the_environment_is_read_only_in_the_settings_modules():
    found = []
    for path in SOURCES:
        rel = _rel(path)
        if rel in SETTINGS_MODULES or rel in ENV_READS_ALLOWED or rel.startswith("bench/"):
            continue
        found += [f"{rel}:{line}" for line in _env_reads(ast.parse(path.read_text()))]
    assert not found, found


def test_the_checks_above_see_what_they_look_for():
    assert _env_reads(ast.parse("import os\nos.environ.get('X')\nos.getenv('Y')\nos.environ['Z']\n")) == [2, 3, 4]
    assert _env_reads(ast.parse("import os\nenv = dict(os.environ, A='1')\n")) == []
