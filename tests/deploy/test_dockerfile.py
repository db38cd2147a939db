"""The Dockerfile and its build context, checked without building (make image-test builds).

What deployments rely on: the final stage runs as the numeric uid 10001 (Kubernetes'
runAsNonRoot can only verify a number), starts ``secret-sidecar run`` with the baked
config, probes through the CLI, exposes the socket directory as a volume, carries
nothing from the context but the venv built in the first stage, and the context holds
what the COPY lines need and none of the venvs, caches, tests or git history.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from dataclasses import dataclass
from functools import cache

import yaml

from sidecar.config import parse_config
from tests.deploy.tooling import ROOT, SOCKET, SOCKET_DIR, run_tool

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CONFIG = "/etc/secret-sidecar/config.yaml"
VENV = "/opt/secret-sidecar"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # the rest of the instruction, continuation lines joined


def parse(text: str) -> list[list[Instruction]]:
    """The instructions of a Dockerfile, one list per stage (``FROM`` first)."""
    instructions: list[Instruction] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):  # comments may sit inside an instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued instruction"
    stages: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


@cache
def stages() -> list[list[Instruction]]:
    return parse(DOCKERFILE.read_text(encoding="utf-8"))


def final() -> list[Instruction]:
    return stages()[-1]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    """The last ``keyword`` of a stage (the one that takes effect), failing if absent."""
    found = [i for i in stage if i.keyword == keyword]
    assert found, f"no {keyword} in the stage FROM {stage[0].args}"
    return found[-1]


def exec_form(args: str) -> list[str]:
    """A JSON-array argument; the shell form would run under /bin/sh and lose signals."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        value = None
    assert isinstance(value, list), f"not the exec (JSON array) form: {args}"
    assert all(isinstance(v, str) for v in value)
    return value


def test_hadolint_passes() -> None:
    run_tool("hadolint", "--no-color", str(DOCKERFILE))


def test_the_final_stage_is_a_slim_runtime_on_the_build_stages_base() -> None:
    """The venv's interpreter is a symlink to the base's python3: both stages share it."""
    build, *_, runtime = stages()
    assert len(stages()) >= 2, "multi-stage: wheels are installed in a build stage"
    image, *name = build[0].args.split()
    assert [word.lower() for word in name] == ["as", "build"]
    assert image.startswith("python:3.11-slim")
    assert runtime[0].args.split() == [image]


def test_runs_as_the_numeric_non_root_user() -> None:
    users = [i.args for i in final() if i.keyword == "USER"]
    assert users == ["10001:10001"]


def test_entrypoint_and_command_run_the_daemon_with_the_baked_config() -> None:
    assert exec_form(only(final(), "ENTRYPOINT").args) == ["secret-sidecar"]
    assert exec_form(only(final(), "CMD").args) == ["run", "-c", CONFIG]
    env = " ".join(i.args for i in final() if i.keyword == "ENV")
    assert re.search(rf'PATH="?{VENV}/bin:', env), "secret-sidecar must be on PATH"
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "a read-only root cannot take bytecode"


def test_healthcheck_asks_the_daemon_through_the_cli() -> None:
    options, _, command = only(final(), "HEALTHCHECK").args.partition("CMD ")
    assert exec_form(command) == ["secret-sidecar", "health", "--socket", SOCKET]
    assert "--interval=" in options


def test_socket_directory_is_a_volume_and_metrics_port_is_exposed() -> None:
    volume = only(final(), "VOLUME").args
    volumes = exec_form(volume) if volume.startswith("[") else volume.split()
    assert SOCKET_DIR in volumes
    assert "9464" in only(final(), "EXPOSE").args.split()


def test_nothing_reaches_the_final_stage_but_the_build_stages_output() -> None:
    """No sources, wheels or build tools: COPY only from the build stage, no installs."""
    for instruction in final():
        if instruction.keyword in {"COPY", "ADD"}:
            assert instruction.keyword == "COPY", f"ADD in the final stage: {instruction}"
            assert "--from=build" in instruction.args, f"copies the context: {instruction}"
        if instruction.keyword == "RUN":
            for tool in ("apt-get", "apt ", "pip ", "pip3 "):
                assert tool not in instruction.args, f"installs in the final stage: {instruction}"
    copied = [i.args for i in final() if i.keyword == "COPY"]
    assert any(f"{VENV} {VENV}" in c for c in copied), "the venv comes from the build stage"


def test_no_stage_adds_urls_and_dependencies_come_from_the_lock() -> None:
    for stage in stages():
        for instruction in stage:
            if instruction.keyword == "ADD":
                assert "://" not in instruction.args, f"ADD of a URL: {instruction}"
    installs = [i.args for i in stages()[0] if i.keyword == "RUN" and "pip install" in i.args]
    assert installs, "the build stage installs with pip"
    for run in installs:
        for command in run.split("&&"):
            if "pip install" in command:
                assert "--no-index" in command, f"pip may reach an index: {command}"
                assert "--no-deps" in command, f"pip may resolve again: {command}"
    assert any("--require-hashes" in run and "runtime.txt" in run for run in installs)


def test_the_image_version_is_the_projects() -> None:
    """``ARG VERSION`` labels the image and picks the wheel; it must follow pyproject."""
    with (ROOT / "pyproject.toml").open("rb") as handle:
        version = tomllib.load(handle)["project"]["version"]
    for stage in stages():
        defaults = [i.args for i in stage if i.keyword == "ARG" and i.args.startswith("VERSION")]
        assert defaults == [f"VERSION={version}"], f"stage {stage[0].args}: {defaults}"


def baked_config() -> str:
    """The YAML the Dockerfile writes as its default config (``printf '%s\\n' lines``)."""
    for stage in stages():
        for instruction in stage:
            if instruction.keyword == "RUN" and "config.yaml" in instruction.args:
                words = shlex.split(instruction.args)
                start = words.index("%s\\n") + 1
                end = words.index(">", start)
                return "\n".join(words[start:end]) + "\n"
    raise AssertionError("no RUN writes the default config.yaml")


def test_baked_config_serves_the_volumes_socket_and_metrics_on_all_interfaces() -> None:
    config = parse_config(yaml.safe_load(baked_config()), "the image's config.yaml")
    assert str(config.listen.socket) == SOCKET
    assert config.listen.mode & 0o060 == 0o060, "the gateway's group must reach the socket"
    assert config.metrics.host_port == ("0.0.0.0", 9464)
    assert config.vaults == (), "the env backend needs no vault entity"


def _regex(pattern: str) -> re.Pattern[str]:
    """Docker's .dockerignore glob: ``*`` and ``?`` stay within a path segment, ``**`` not."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, pattern) pairs in file order; the last one that matches decides."""
    rules = []
    for raw in DOCKERIGNORE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.removeprefix("!").strip().strip("/")
        rules.append((not negated, _regex(pattern)))
    return rules


def excluded(path: str) -> bool:
    """Whether the build context leaves ``path`` out (a rule on a parent covers it)."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    verdict = False
    for excludes, pattern in dockerignore():
        if any(pattern.fullmatch(p) for p in prefixes):
            verdict = excludes
    return verdict


def test_dockerignore_keeps_venvs_caches_tests_and_git_out_of_the_context() -> None:
    for path in [
        ".venv/bin/python",
        ".tools/bin/hadolint",
        ".git/HEAD",
        ".mypy_cache/3.11/sidecar/config.meta.json",
        ".pytest_cache/v/cache/lastfailed",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        ".coverage",
        "sidecar/__pycache__/config.cpython-311.pyc",
        "tests/unit/test_config.py",
        "secret_sidecar.egg-info/PKG-INFO",
        "build/lib/sidecar/cli.py",
        "sidecar.sock",
        "deploy/docker-compose.yml",
    ]:
        assert excluded(path), f"{path} would be sent to the image build"


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    sources = []
    for stage in stages():
        for instruction in stage:
            if instruction.keyword == "COPY" and "--from=" not in instruction.args:
                *from_context, _destination = instruction.args.split()
                sources += [s for s in from_context if not s.startswith("--")]
    assert sources, "the build stage copies the lock and the wheelhouse"
    for source in sources:
        # A directory is checked through a file in it, as the context would carry it.
        path = f"{source}secret_sidecar-0.1.0-py3-none-any.whl" if source.endswith("/") else source
        assert not excluded(path), f"the Dockerfile copies {source}, the context leaves it out"


def test_dockerignore_matcher_follows_docker_rules() -> None:
    """The matcher above is what the two tests trust: Docker's semantics on samples."""
    pattern = _regex("*.pyc")
    assert pattern.fullmatch("x.pyc")
    assert not pattern.fullmatch("a/x.pyc"), "* does not cross /"
    assert _regex("**/*.pyc").fullmatch("a/b/x.pyc")
    assert _regex("**/*.pyc").fullmatch("x.pyc")
    assert excluded(".git")
    assert excluded(".git/objects/ab/cdef")
    assert not excluded("requirements/runtime.txt")
    assert excluded("requirements/dev.txt"), "only the runtime lock goes into the image"
