"""The Dockerfile builds what k8s/ runs, checked without a container daemon.

No Docker or BuildKit on these machines, so the checks are the ones a build would fail (or worse,
silently pass) on: every COPY source exists and is not dropped by .dockerignore, the install line
installs the `gpu` extra, the base image is the Ray release the project pins, the final user is
not root, `wget` is installed (KubeRay's probes call it), the default command runs, and the image
k8s/ pulls is the one docs/operations.md tells you to build and push.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    op: str
    args: str


def parse(text: str) -> list[Instruction]:
    """Dockerfile instructions: comments dropped, backslash continuations joined."""
    out: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comments inside a continued instruction are skipped by Docker too
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        op, _, args = full.partition(" ")
        out.append(Instruction(op.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def instructions(op: str, parsed: list[Instruction] | None = None) -> list[Instruction]:
    return [i for i in (parsed or parse(DOCKERFILE.read_text())) if i.op == op]


def build_args(parsed: list[Instruction]) -> dict[str, str]:
    args = {}
    for i in parsed:
        if i.op == "ARG" and "=" in i.args:
            name, _, default = i.args.partition("=")
            args[name] = default
    return args


def exec_form(args: str) -> list[str]:
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def copy_sources(parsed: list[Instruction]) -> list[str]:
    sources = []
    for i in parsed:
        if i.op not in ("COPY", "ADD"):
            continue
        parts = [p for p in exec_form(i.args) if not p.startswith("--")]
        assert "--from" not in i.args, "multi-stage COPY --from is not checked here; extend the test"
        sources += parts[:-1]
    return sources


def ignored(rel: str, patterns: list[str]) -> bool:
    """.dockerignore semantics enough for this repo: globs, ** and leading dirs, `!` exceptions."""
    result = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        pattern_alt = pattern[3:] if pattern.startswith("**/") else None
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern_alt is not None and fnmatch.fnmatchcase(prefix.rsplit("/", 1)[-1], pattern_alt)
            ):
                result = not negate
                break
    return result


def dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def kustomize_image() -> str:
    kustomization = yaml.safe_load((REPO_ROOT / "k8s" / "kustomization.yaml").read_text())
    (image,) = [i for i in kustomization["images"] if i["name"] == "tierserve"]
    return f"{image['newName']}:{image['newTag']}"


# ------------------------------------------------------------------------------ tests
def test_parser_reads_continuations_and_rejects_nothing_silently() -> None:
    parsed = parse("FROM a:b\n# c\nRUN x \\\n  # inner\n  && y\nUSER 1000\n")
    assert parsed == [Instruction("FROM", "a:b"), Instruction("RUN", "x  && y"), Instruction("USER", "1000")]
    with pytest.raises(AssertionError):
        parse("RUN x \\\n")


def test_base_image_is_the_pinned_ray_on_cuda_and_python_311() -> None:
    import ray

    parsed = parse(DOCKERFILE.read_text())
    (base,) = instructions("FROM", parsed)
    image = re.sub(r"\$\{(\w+)\}", lambda m: build_args(parsed)[m.group(1)], base.args.split()[0])
    repo, _, tag = image.partition(":")
    assert repo in ("rayproject/ray", "rayproject/ray-llm"), image
    assert tag.startswith(f"{ray.__version__}-py311-cu12"), f"{image}: not Ray {ray.__version__}, py311, CUDA 12"


def test_every_copy_source_exists_and_is_not_dockerignored() -> None:
    parsed = parse(DOCKERFILE.read_text())
    sources = copy_sources(parsed)
    assert sources
    patterns = dockerignore_patterns()
    for src in sources:
        path = REPO_ROOT / src
        assert path.exists(), f"COPY {src}: not in the repo"
        assert not ignored(src.rstrip("/"), patterns), f"COPY {src}: excluded by .dockerignore"
    # What the pods and the config read from /app must come in through one of those sources.
    (workdir,) = {i.args for i in instructions("WORKDIR", parsed)}
    config = yaml.safe_load((REPO_ROOT / "configs" / "gpu.yaml").read_text())
    calibration = Path(config["applications"][0]["args"]["cache"]["semantic_calibration"])
    rel = calibration.relative_to(workdir).as_posix()
    assert (REPO_ROOT / rel).is_file()
    assert any(rel == s.rstrip("/") or rel.startswith(s.rstrip("/") + "/") for s in sources), rel
    for needed in ("feature_store/definitions.py", "feature_store/feature_store.yaml", "feature_store/sample/ratings.csv"):
        assert any(needed.startswith(s.rstrip("/") + "/") for s in sources), needed
        assert not ignored(needed, patterns), needed
    # A local build (or the symlink to one) must not be copied over the one built in the image.
    assert ignored("feature_store/data", patterns) and ignored(".venv", patterns) and ignored(".models", patterns)


def test_dockerignore_matcher() -> None:
    assert ignored("a/__pycache__/x.pyc", ["**/__pycache__"])
    assert ignored("tests/unit/x.py", ["tests"])
    assert not ignored("feature_store/x.py", ["feature_store/data"])
    assert not ignored("docs/keep.md", ["docs", "!docs/keep.md"])


def test_installs_the_gpu_extra_and_wget() -> None:
    runs = [i.args for i in instructions("RUN")]
    assert any(re.search(r"pip install (-e )?\"?\.\[gpu\]\"?", r) for r in runs), "no `pip install .[gpu]`"
    # The dependency layer reads the same pins: the base list and the gpu extra from pyproject.toml.
    assert any("['optional-dependencies']['gpu']" in r and "pyproject.toml" in r for r in runs)
    assert "gpu" in tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.search(r"apt-get install\b.*\bwget\b", r) for r in runs), "wget is not installed"


def test_final_user_is_not_root() -> None:
    users = instructions("USER")
    assert users, "no USER: the image would run as root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), user
    # Numeric, so that runAsNonRoot can be verified by the kubelet.
    assert user.isdigit()


def test_models_are_not_baked_in() -> None:
    text = DOCKERFILE.read_text()
    assert ".models" not in copy_sources(parse(text))
    assert not any("snapshot_download" in i.args or "deployments.models" in i.args for i in instructions("RUN"))


def test_default_command_runs() -> None:
    (cmd,) = instructions("CMD")
    argv = exec_form(cmd.args)
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert argv[0] in scripts, f"CMD {argv[0]} is not a console script of the project"
    module, _, func = scripts[argv[0]].partition(":")
    code = f"import sys, {module} as m; sys.argv[0] = {argv[0]!r}; m.{func}()"
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv[1:]], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Usage" in proc.stdout


def test_image_reference_matches_kustomization_docs_and_version() -> None:
    image = kustomize_image()
    name, _, tag = image.rpartition(":")
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert tag == version, f"kustomization tags {tag}, the project is {version}"
    labels = " ".join(i.args for i in instructions("LABEL"))
    assert f'org.opencontainers.image.version="{version}"' in labels
    docs = (REPO_ROOT / "docs" / "operations.md").read_text()
    assert f"docker build -t {image} ." in docs and f"docker push {image}" in docs
    assert f"docker build -t {image} ." in DOCKERFILE.read_text()
