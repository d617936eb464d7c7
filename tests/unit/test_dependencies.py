"""pyproject.toml declares what the code imports: every third-party package a module of the
project imports when it is loaded is a core dependency, the optional ones (Triton, PostgreSQL,
plots, protobuf code generation) live in extras and are imported only where they are used, and
the version floors are those the code and the generated protobuf modules need."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("palm_rlhf", "services", "kernels", "clients")
PROTO_DIR = ROOT / "palm_rlhf" / "proto" / "v1"

# extra -> (the distributions it adds, the top-level modules they provide)
OPTIONAL = {
    "gpu": ({"triton"}, {"triton"}),
    "postgres": ({"psycopg"}, {"psycopg", "psycopg_binary"}),
    "plots": ({"matplotlib"}, {"matplotlib", "mpl_toolkits"}),
    "dev": ({"grpcio-tools", "ruff"}, {"grpc_tools"}),
}
# modules of the project that need an extra to be imported at all
MODULES_OF_EXTRAS = {"kernels.attention": "gpu", "kernels.swiglu": "gpu"}


def _project() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(req: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert m, req
    return _canonical(m.group(1))


def _floor(reqs: list[str], name: str) -> tuple[int, ...]:
    """The lower bound (``>=`` or ``==``) of ``name`` among ``reqs``."""
    for req in reqs:
        if _requirement_name(req) == name:
            m = re.search(r"(?:>=|==)\s*([0-9][0-9.]*)", req)
            assert m, f"{req!r} has no lower bound"
            return tuple(int(p) for p in m.group(1).strip(".").split("."))
    raise AssertionError(f"{name} is not declared")


def _run(script: str) -> dict:
    """Run ``script`` in a fresh interpreter at the repository root; it prints one JSON line."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# Records every `import` statement executed by the module-level code of a project module, and
# maps each imported third-party module to the distribution whose files hold it.
_RECORDER = """
import builtins, importlib, importlib.metadata as md, json, os, pkgutil, sys

OURS = {packages!r}
BLOCKED = set({blocked!r})


class Block:
    # a meta-path finder that makes the optional packages look uninstalled
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{{name}} is not installed (blocked)", name=name)
        return None


sys.meta_path.insert(0, Block())
seen = set()
real_import = builtins.__import__


def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    module = real_import(name, globals, locals, fromlist, level)
    if level == 0 and globals is not None:
        importer = globals.get("__name__") or ""
        if importer.split(".")[0] in OURS and sys._getframe(1).f_code.co_name == "<module>":
            seen.add((importer, name))
    return module


builtins.__import__ = recording_import
failed = {{}}
for name in {entry_points!r}:
    importlib.import_module(name)
if {walk!r}:
    for pkg in OURS:
        for info in pkgutil.walk_packages(importlib.import_module(pkg).__path__, pkg + "."):
            if info.name in {skip!r}:
                continue
            try:
                importlib.import_module(info.name)
            except Exception as e:  # reported, so that the test names the module
                failed[info.name] = repr(e)
builtins.__import__ = real_import

top_level = md.packages_distributions()


def distribution(module_name):
    # the distribution that installed the module; where several share a top-level name (google),
    # the one whose file list holds the module's file
    candidates = sorted(set(top_level.get(module_name.split(".")[0], ())))
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    if module is not None and not path:  # a namespace package: one of its submodules
        path = next((m.__file__ for n, m in sorted(sys.modules.items())
                     if n.startswith(module_name + ".") and getattr(m, "__file__", None)), None)
    if not path:
        return None
    path = os.path.realpath(path)
    for name in candidates:
        files = md.distribution(name).files or ()
        if any(os.path.realpath(md.distribution(name).locate_file(f)) == path for f in files):
            return name
    return None


imports = []
for importer, name in sorted(seen):
    top = name.split(".")[0]
    if top in OURS or top in sys.stdlib_module_names:
        continue
    imports.append([importer, name, distribution(name)])
print(json.dumps({{"imports": imports, "failed": failed, "loaded": sorted({{m.split(".")[0] for m in sys.modules}})}}))
"""


def _record(entry_points: list[str], walk: bool, blocked: set[str] = frozenset()) -> dict:
    script = _RECORDER.format(
        packages=PACKAGES,
        blocked=sorted(blocked),
        entry_points=entry_points,
        walk=walk,
        skip=sorted(MODULES_OF_EXTRAS),
    )
    return _run(script)


def _all_optional_modules() -> set[str]:
    return {m for _, modules in OPTIONAL.values() for m in modules}


def _check_core(imports: list[list]) -> None:
    core = {_requirement_name(r) for r in _project()["dependencies"]}
    undeclared = [
        f"{importer} imports {name} ({dist or 'no installed distribution'})"
        for importer, name, dist in imports
        if dist is None or _canonical(dist) not in core
    ]
    assert not undeclared, "module-level imports that are not core dependencies:\n" + "\n".join(undeclared)


def test_start_up_imports_only_core_dependencies():
    """What `palm-rlhf` and `python -m services.cli` load before parsing their arguments."""
    got = _record(["palm_rlhf", "palm_rlhf.cli", "services.cli"], walk=False)
    _check_core(got["imports"])
    assert not set(got["loaded"]) & _all_optional_modules(), got["loaded"]


def test_every_module_loads_with_the_core_dependencies_alone():
    """Every module of the project (but those of an extra) imports with the optional packages
    made uninstallable, and each of its module-level third-party imports is a core dependency."""
    got = _record(["palm_rlhf", "services.cli"], walk=True, blocked=_all_optional_modules())
    assert not got["failed"], got["failed"]
    assert len({i[0] for i in got["imports"]}) > 20, "the recorder saw too few modules"
    _check_core(got["imports"])
    assert not set(got["loaded"]) & _all_optional_modules()


def test_modules_of_an_extra_import_only_core_and_that_extra():
    for module, extra in MODULES_OF_EXTRAS.items():
        dists, tops = OPTIONAL[extra]
        for top in tops:
            pytest.importorskip(top, reason=f"{module} needs the {extra} extra (in the test extra)")
        got = _record([module], walk=False)
        core = {_requirement_name(r) for r in _project()["dependencies"]} | dists
        wrong = [
            f"{i} imports {n} ({d})" for i, n, d in got["imports"] if d is None or _canonical(d) not in core
        ]
        assert not wrong, wrong
        assert any(_canonical(d or "") in dists for _, _, d in got["imports"]), (
            f"{module} no longer needs the {extra} extra: take it out of MODULES_OF_EXTRAS"
        )


def test_optional_packages_are_extras_and_the_test_extra_has_them_all():
    project = _project()
    core = {_requirement_name(r) for r in project["dependencies"]}
    extras = project["optional-dependencies"]
    test = set(extras["test"])
    for extra, (dists, _) in OPTIONAL.items():
        assert {_requirement_name(r) for r in extras[extra]} == dists, extra
        assert not dists & core, f"{dists} must not be core dependencies"
        assert set(extras[extra]) <= test, f"the test extra lacks {extra}: {extras[extra]}"


def test_version_floors_cover_what_the_code_needs():
    deps = _project()["dependencies"]
    # scaled_dot_product_attention(enable_gqa=...) (kernels/dispatch.py) came with torch 2.5
    assert "enable_gqa=" in (ROOT / "kernels" / "dispatch.py").read_text()
    assert _floor(deps, "torch") >= (2, 5)

    # the generated modules refuse a protobuf runtime older than the protoc that wrote them
    check = re.compile(
        r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,\s*(\d+),\s*(\d+),\s*(\d+),"
    )
    gencode = [
        tuple(int(x) for x in check.search(p.read_text()).groups()) for p in PROTO_DIR.glob("*_pb2.py")
    ]
    assert gencode, f"no generated *_pb2.py under {PROTO_DIR}"
    assert _floor(deps, "protobuf") >= max(gencode)

    # and the generated stubs refuse a grpcio older than the grpcio-tools that wrote them
    stub = re.compile(r"GRPC_GENERATED_VERSION = '([0-9.]+)'")
    grpc_gen = [
        tuple(int(x) for x in stub.search(p.read_text()).group(1).split("."))
        for p in PROTO_DIR.glob("*_pb2_grpc.py")
    ]
    assert grpc_gen
    assert _floor(deps, "grpcio") >= max(grpc_gen)


def test_a_missing_matplotlib_names_the_extra_to_install():
    got = _run(
        """
        import json, sys
        sys.modules["matplotlib"] = None  # as if it were not installed
        from palm_rlhf.demo import taste
        try:
            taste._pyplot()
        except ImportError as e:
            print(json.dumps({"error": str(e)}))
        else:
            print(json.dumps({"error": None}))
        """
    )
    assert got["error"] and "pip install 'palm-rlhf[plots]'" in got["error"]


def test_the_demo_corpus_files_are_package_data():
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = package_data["palm_rlhf"]
    base = ROOT / "palm_rlhf"
    shipped = {p for pattern in patterns for p in base.glob(pattern) if p.is_file()}
    corpus = set((base / "demo" / "assets" / "corpus").glob("*.json"))
    assert corpus and corpus <= shipped


@pytest.mark.parametrize(("image", "needed"), [("cpu", {"postgres"}), ("cuda", {"gpu", "postgres"})])
def test_the_images_install_the_extras_they_need(image, needed):
    text = (ROOT / "docker" / f"Dockerfile.{image}").read_text()
    m = re.search(r"^ARG EXTRAS=(\S*)$", text, re.MULTILINE)
    assert m, f"Dockerfile.{image} names no EXTRAS"
    extras = set(filter(None, m.group(1).split(",")))
    assert extras == needed
    assert extras <= set(_project()["optional-dependencies"])
    assert '"${EXTRAS}"' in text and "optional-dependencies" in text  # the requirement list uses them
