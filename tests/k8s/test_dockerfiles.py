"""The container build files: torch pinned and installed before the project, non-root user,
`palm-rlhf` entrypoint, a build context that holds what `pip install` needs.

There is no container engine in the test environment, so the Dockerfiles are parsed, not
built; the parse follows the Dockerfile rules that matter here (line continuations, stages,
ARG defaults).
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
IMAGES = {"cpu": DOCKER / "Dockerfile.cpu", "cuda": DOCKER / "Dockerfile.cuda"}
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)  # (INSTRUCTION, arguments)

    def all(self, op: str) -> list[str]:
        return [args for ins, args in self.instructions if ins == op]


def parse_dockerfile(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """(ARG defaults with variables expanded in RUN lines, stages in order)."""
    lines: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comments inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        lines.append(buf + stripped)
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG":
            name, _, default = rest.partition("=")
            args.setdefault(name.strip(), default.strip())
        if op == "FROM":
            m = re.match(r"(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.IGNORECASE)
            assert m, line
            stages.append(Stage(base=m.group(1), name=m.group(2)))
            continue
        if stages:
            stages[-1].instructions.append((op, rest))
    return args, stages


def expand(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def pip_installs(stage: Stage, args: dict[str, str]) -> list[str]:
    """Each `pip install ...` command of a stage, variables expanded, in order."""
    out = []
    for run in stage.all("RUN"):
        for part in re.split(r"&&|;", expand(run, args)):
            if re.search(r"\bpip\s+install\b", part):
                out.append(part.strip())
    return out


def torch_pin() -> str:
    return importlib.metadata.version("torch").split("+")[0]


@pytest.fixture(params=sorted(IMAGES))
def image(request) -> tuple[str, dict[str, str], list[Stage]]:
    path = IMAGES[request.param]
    assert path.is_file(), f"{path} is missing"
    args, stages = parse_dockerfile(path)
    return request.param, args, stages


def test_multi_stage_with_a_clean_runtime_stage(image):
    _name, _args, stages = image
    assert len(stages) >= 2, "single-stage build: the pip caches and build inputs stay in the image"
    final = stages[-1]
    copies = final.all("COPY")
    assert any("--from=" in c for c in copies), "the runtime stage copies nothing from the build stage"
    assert not pip_installs(final, {}), "the runtime stage installs Python packages itself"
    assert not any(c.split()[0] in (".", "./") for c in copies if "--from" not in c), (
        "runtime stage copies sources"
    )


def test_torch_is_pinned_and_installed_before_the_project(image):
    name, args, stages = image
    build = next(s for s in stages if pip_installs(s, args))
    installs = pip_installs(build, args)
    first = installs[0]
    assert re.search(rf"[\"']?torch=={re.escape(torch_pin())}[\"']?(\s|$)", first), (
        f"{name}: the first pip install is not torch=={torch_pin()} (the version the project is tested with): {first}"
    )
    assert "--index-url" in first, f"{name}: torch's index is left implicit"
    if name == "cpu":
        assert CPU_INDEX in first, f"cpu image installs torch from {first}"
    # Every later install repeats the pin, so no dependency can replace this torch build.
    for cmd in installs[1:]:
        assert f"torch=={torch_pin()}" in cmd, f"{name}: a later install does not pin torch: {cmd}"
    project = [i for i, cmd in enumerate(installs) if re.search(r"\s(/src|\.)(\s|$)|\.whl", cmd)]
    assert project and project[0] > 0, f"{name}: the project is not installed after torch"


def test_the_project_layer_comes_after_the_dependency_layer(image):
    """Editing the sources must not invalidate the (large) dependency layers."""
    _name, args, stages = image
    build = next(s for s in stages if pip_installs(s, args))
    ops = [(ins, a) for ins, a in build.instructions if ins in ("COPY", "RUN")]
    full_copy = next(i for i, (ins, a) in enumerate(ops) if ins == "COPY" and a.split()[0] == ".")
    deps = next(
        i for i, (ins, a) in enumerate(ops) if ins == "RUN" and "requirements" in a and "pip install" in a
    )
    assert deps < full_copy


def test_runs_as_a_non_root_user_with_the_palm_rlhf_entrypoint(image):
    name, _args, stages = image
    final = stages[-1]
    users = final.all("USER")
    assert users, f"{name}: no USER, the container runs as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), f"{name}: USER {user}"
    assert user.isdigit(), "a numeric USER lets Kubernetes check runAsNonRoot"
    last_user = max(i for i, (ins, _a) in enumerate(final.instructions) if ins == "USER")
    assert not any(ins == "RUN" for ins, _a in final.instructions[last_user:]), "RUN after USER"
    entry = final.all("ENTRYPOINT")
    assert entry and json.loads(entry[-1]) == ["palm-rlhf"], f"{name}: ENTRYPOINT {entry}"
    assert not final.all("HEALTHCHECK"), "Kubernetes probes do the health checks"


def test_runtime_never_builds_or_downloads_a_model(image):
    _name, _args, stages = image
    env = " ".join(stages[-1].all("ENV"))
    assert "PALM_RLHF_DEMO_AUTOBUILD=0" in env
    text = " ".join(a for s in stages for ins, a in s.instructions if ins in ("RUN", "CMD", "ENTRYPOINT"))
    assert not re.search(r"\b(curl|wget|huggingface-cli|hf_hub_download|snapshot_download)\b", text)


def test_cuda_image_uses_a_cuda_torch_and_cpu_image_does_not():
    _a, cpu = parse_dockerfile(IMAGES["cpu"])
    args, cuda = parse_dockerfile(IMAGES["cuda"])
    cuda_first = pip_installs(next(s for s in cuda if pip_installs(s, args)), args)[0]
    assert CPU_INDEX not in cuda_first
    assert "PALM_RLHF_DEVICE=cuda" in " ".join(cuda[-1].all("ENV"))
    assert "PALM_RLHF_DEVICE=cpu" in " ".join(cpu[-1].all("ENV"))


def dockerignore_patterns() -> list[str]:
    path = REPO / ".dockerignore"
    assert path.is_file(), ".dockerignore is missing: the build context would hold .venv and .git"
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def ignored(rel: str, patterns: list[str]) -> bool:
    out = False
    for pat in patterns:
        neg = pat.startswith("!")
        pat = pat.lstrip("!").strip("/")
        parts = rel.split("/")
        hit = any(
            fnmatch.fnmatch("/".join(parts[: i + 1]), pat)
            or fnmatch.fnmatch("/".join(parts[: i + 1]), "**/" + pat)
            or (pat.startswith("**/") and fnmatch.fnmatch(parts[i], pat[3:]))
            for i in range(len(parts))
        )
        if hit:
            out = not neg
    return out


def test_build_context_keeps_what_pip_install_needs_and_drops_the_rest():
    patterns = dockerignore_patterns()
    for heavy in (".venv", ".git", "data", "tests"):
        assert ignored(heavy, patterns), f"{heavy} would be sent to the image build"
    for needed in ("pyproject.toml", "palm_rlhf/model.py", "services/__init__.py", "protos/palm_rlhf"):
        assert not ignored(needed, patterns), f"{needed} is excluded from the build context"
    # The shipped demo checkpoint must reach the image (no download at start).
    assert not ignored("palm_rlhf/demo/assets/demo-v2/manifest.json", patterns)
    assert ignored("palm_rlhf/__pycache__/model.cpython-311.pyc", patterns)


def test_files_the_build_copies_exist():
    for path in IMAGES.values():
        _args, stages = parse_dockerfile(path)
        for stage in stages:
            for c in stage.all("COPY"):
                if "--from" in c:
                    continue
                *sources, _dest = c.split()
                for src in sources:
                    assert (REPO / src).exists(), f"{path.name}: COPY {src}: no such file in the repository"


def test_files_pyproject_refers_to_reach_the_build_context():
    """`pip install /src` reads the readme named in pyproject.toml; a missing one fails the build."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    readme = project.get("readme")
    if isinstance(readme, dict):
        readme = readme.get("file")
    if readme:
        assert (REPO / readme).is_file(), f"pyproject.toml names readme {readme!r}, which does not exist"
        assert not ignored(readme, dockerignore_patterns()), f"{readme} is excluded from the build context"


def test_the_cpu_image_ships_a_portable_build_of_the_cpu_decode_kernel():
    """The runtime stage has no compiler: the build stage compiles the kernel for any CPU of
    the architecture, after the project is installed (it lands beside the installed source)."""
    args, stages = parse_dockerfile(IMAGES["cpu"])
    build = next(s for s in stages if pip_installs(s, args))
    runs = [expand(r, args) for r in build.all("RUN")]
    compiler = next((i for i, r in enumerate(runs) if re.search(r"apt-get install .*\bgcc\b", r)), None)
    assert compiler is not None, "no C compiler in the build stage"
    prebuild = next((i for i, r in enumerate(runs) if "python -m kernels.cpu_decode --prebuild" in r), None)
    project = next(i for i, r in enumerate(runs) if re.search(r"pip install --no-deps /src", r))
    assert prebuild is not None and compiler < prebuild and project <= prebuild
    assert prebuild_after_install(runs[prebuild])


def prebuild_after_install(run: str) -> bool:
    parts = [p.strip() for p in run.split("&&")]
    installs = [i for i, p in enumerate(parts) if "pip install" in p]
    builds = [i for i, p in enumerate(parts) if "kernels.cpu_decode --prebuild" in p]
    return bool(builds) and (not installs or max(installs) < min(builds))
