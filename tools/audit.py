"""`make audit`: fail on known vulnerabilities in the packages installed in a venv.

Usage: python tools/audit.py [--venv DIR] [--allowlist FILE] [--strict]

Run with the venv's own python (as `make audit` does), it audits that interpreter's
installed distributions (`importlib.metadata`, so pip and setuptools too); `--venv DIR`
audits another venv's. The project itself (the name in pyproject.toml, an editable
install) is skipped. `--strict` makes unchecked packages fail (see below); by default,
in CI too, they are reported: any upstream release of a package that another one pins
would otherwise fail CI with no vulnerability found.

Source: for each package, PyPI's project JSON, https://pypi.org/pypi/NAME/json (16 at a
time, 15 s per request, 2 retries, 60 s in all). Its `vulnerabilities` list holds the
advisories that affect the project's *latest* release (`info.version`) and nothing else: an advisory
fixed in an older release is absent from it (requests' and urllib3's lists are empty,
though their old releases have known advisories). PyPI's per-release JSON, which would
describe the installed release itself and is what pip-audit reads, answers 404 here.

Rule, for an installed version V of a project whose latest release is L (PEP 440
comparisons with packaging.version), and each listed advisory that is not withdrawn:
  - V == L: the advisory applies. PyPI attributes advisories to releases, so the list is
    exactly V's; `fixed_in` never clears it (a version older than V in `fixed_in` may be
    the fix of an earlier range, with V in a later one, e.g. a regression).
  - V != L: the advisory affects L; whether it affects V is decided from `fixed_in` only
    in the one direction that is safe: it is cleared for V when some F in `fixed_in` has
    F <= V and the same major.minor as V (a fix on V's own release line that V already
    has); otherwise it applies (also with `fixed_in` empty: no fix released, and the
    version it was introduced in is unknown, so V is assumed affected).
  - Coverage: advisories that do not affect L are not listed, so for V != L the list
    cannot show that V is free of them. Such a package is reported "unchecked", never
    passed as clean. Also unchecked: a package not on PyPI (404), one installed from a
    URL or a local path rather than from PyPI, an unparseable version, an answer missing
    `info.version` or `vulnerabilities`, or a malformed advisory entry.

Allowlist (audit-allowlist.txt), one entry a line, `ENTRY  # package, reason, YYYY-MM-DD`:
  - an advisory id (PYSEC-..., GHSA-..., CVE-...): a finding whose id or any alias is
    listed does not fail;
  - `unchecked:NAME`: package NAME may stay unchecked (e.g. a dependency pins it below its
    latest release) without failing the strict run.

Exit status: 0 clean; 1 a vulnerability not allowlisted; 2 a missing or malformed
allowlist; 3 PyPI not reached for some package after retries (a gate that passes blind
is worse than none); 4 (strict only) an unchecked package not allowlisted. When several
apply, the first in the order 2, 1, 3, 4.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[1]
PYPI = "https://pypi.org/pypi/{}/json"
WORKERS = 16
TIMEOUT = 15.0
RETRIES = 2
ID_RE = re.compile(r"(PYSEC|GHSA|CVE)-[A-Za-z0-9-]+")
UNCHECKED_RE = re.compile(r"unchecked:([A-Za-z0-9][A-Za-z0-9._-]*)")
COMMENT_RE = re.compile(r"\s*(?P<text>\S.*?)\s*,\s*(?P<date>\d{4}-\d{2}-\d{2})\s*")

EXIT_VULNERABLE = 1
EXIT_ALLOWLIST = 2
EXIT_UNREACHABLE = 3
EXIT_UNCHECKED = 4


class AllowlistError(Exception):
    pass


@dataclass(frozen=True)
class Entry:
    key: str  # an upper-cased advisory id, or a canonical package name
    line: str
    lineno: int
    review: datetime.date


@dataclass
class Allowlist:
    ids: dict[str, Entry] = field(default_factory=dict)
    unchecked: dict[str, Entry] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)


def load_allowlist(path: Path) -> Allowlist:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AllowlistError(f"{path}: cannot read it: {exc.strerror}") from exc
    allow = Allowlist()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, _, comment = line.partition("#")
        words = head.split()
        want = f"{path}:{lineno}: want 'ID  # package, reason, YYYY-MM-DD'"
        match = COMMENT_RE.fullmatch(comment)
        if len(words) != 1 or not match:
            raise AllowlistError(f"{want}: {raw}")
        try:
            review = datetime.date.fromisoformat(match["date"])
        except ValueError as exc:
            raise AllowlistError(f"{want}: bad date: {raw}") from exc
        word = words[0]
        if ID_RE.fullmatch(word):
            entry = Entry(word.upper(), line, lineno, review)
            table = allow.ids
        elif unchecked := UNCHECKED_RE.fullmatch(word):
            entry = Entry(canonicalize_name(unchecked[1]), line, lineno, review)
            table = allow.unchecked
        else:
            raise AllowlistError(f"{want} (ID: PYSEC-, GHSA-, CVE- or unchecked:NAME): {raw}")
        if entry.key in table:
            raise AllowlistError(
                f"{path}:{lineno}: {word} is already on line {table[entry.key].lineno}"
            )
        table[entry.key] = entry
    return allow


@dataclass(frozen=True)
class Installed:
    name: str  # canonical
    display: str
    version: str
    direct_url: dict[str, Any] | None


def venv_path(venv: Path) -> list[str]:
    python = venv / "bin" / "python"
    out = subprocess.run(  # noqa: S603 (the venv's own interpreter, fixed arguments)
        [str(python), "-I", "-c", "import json, sys; print(json.dumps(sys.path))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    paths: list[str] = json.loads(out)
    return paths


def installed(venv: Path | None) -> list[Installed]:
    dists = metadata.distributions(path=venv_path(venv)) if venv else metadata.distributions()
    found: dict[str, Installed] = {}
    for dist in dists:
        display = dist.name
        if not display:
            continue
        name = canonicalize_name(display)
        if name in found:  # shadowed by an earlier sys.path entry: not the one imported
            continue
        direct = dist.read_text("direct_url.json")
        found[name] = Installed(name, display, dist.version, json.loads(direct) if direct else None)
    return sorted(found.values(), key=lambda d: d.name)


def project_name() -> str | None:
    try:
        with (ROOT / "pyproject.toml").open("rb") as f:
            name = tomllib.load(f).get("project", {}).get("name")
    except OSError:
        return None
    return canonicalize_name(name) if isinstance(name, str) else None


class NotFound:
    pass


@dataclass(frozen=True)
class Unreachable:
    reason: str


def fetch(name: str, deadline: float) -> dict[str, Any] | NotFound | Unreachable:
    request = urllib.request.Request(  # noqa: S310 (a fixed https URL)
        PYPI.format(name),
        headers={"User-Agent": "secret-sidecar-audit", "Accept": "application/json"},
    )
    reason = "no attempt"
    for attempt in range(RETRIES + 1):
        left = deadline - time.monotonic()
        if left <= 0:
            return Unreachable(f"{reason}; overall deadline passed")
        try:
            with urllib.request.urlopen(request, timeout=min(TIMEOUT, left)) as resp:  # noqa: S310
                body = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return NotFound()
            reason = f"HTTP {exc.code}"
            if exc.code != 429 and exc.code < 500:
                return Unreachable(reason)
        except (OSError, ValueError) as exc:  # URLError, timeouts, resets, non-JSON answers
            reason = str(getattr(exc, "reason", None) or exc) or type(exc).__name__
        else:
            if isinstance(body, dict):
                return body
            reason = "answer is not a JSON object"
        if attempt < RETRIES:
            time.sleep(min(0.5 * 2**attempt, max(0.0, deadline - time.monotonic())))
    return Unreachable(f"{reason} (after {RETRIES + 1} attempts)")


@dataclass(frozen=True)
class Advisory:
    id: str
    aliases: tuple[str, ...]
    fixed_in: tuple[str, ...]
    link: str

    def names(self) -> set[str]:
        return {self.id.upper(), *(a.upper() for a in self.aliases)}


def parse_advisories(raw: object) -> list[Advisory] | str:
    """The non-withdrawn advisories, or why the list cannot be read."""
    if not isinstance(raw, list):
        return "PyPI's answer has no `vulnerabilities` list"
    out = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            return f"malformed advisory entry {str(item)[:80]}"
        if item.get("withdrawn"):
            continue
        aliases, fixed = item.get("aliases") or [], item.get("fixed_in") or []
        if not all(isinstance(x, str) for x in [*aliases, *fixed]):
            return f"malformed advisory entry {item['id']}"
        link = item.get("link")
        out.append(
            Advisory(
                item["id"], tuple(aliases), tuple(fixed), link if isinstance(link, str) else ""
            )
        )
    return out


def applies(installed: Version, latest: Version, adv: Advisory) -> str | None:
    """Why `adv` (listed for `latest`) applies to `installed`; None when it is cleared."""
    fixed = []
    for text in adv.fixed_in:
        try:
            fixed.append(Version(text))
        except InvalidVersion:
            continue
    shown = ", ".join(adv.fixed_in) or "none"
    if installed == latest:
        return f"listed for {latest}, the latest release (fixed in: {shown})"
    line = installed.release[:2]
    if any(f <= installed and f.release[:2] == line for f in fixed):
        return None
    if not adv.fixed_in:
        return f"listed for latest {latest}, no fix released: assumed to affect {installed} too"
    series = ".".join(map(str, line))
    return (
        f"listed for latest {latest}; fixed in {shown}: none of them {series}.x and <= {installed}"
    )


@dataclass
class Finding:
    package: str
    version: str
    advisories: list[Advisory]
    why: str
    allowed_by: Entry | None = None

    def names(self) -> set[str]:
        return set().union(*(a.names() for a in self.advisories))


@dataclass
class Result:
    dist: Installed
    latest: str | None = None
    unchecked: str | None = None
    unreachable: str | None = None
    findings: list[Finding] = field(default_factory=list)


def group(advisories: Iterable[tuple[Advisory, str]]) -> list[tuple[list[Advisory], str]]:
    """Merge advisories that name each other (a PYSEC and its GHSA twin) into one finding."""
    groups: list[tuple[list[Advisory], set[str], str]] = []
    for adv, why in advisories:
        for members, names, _ in groups:
            if names & adv.names():
                members.append(adv)
                names.update(adv.names())
                break
        else:
            groups.append(([adv], adv.names(), why))
    return [(members, why) for members, _, why in groups]


def audit(dist: Installed, deadline: float) -> Result:
    result = Result(dist)
    if dist.direct_url is not None:
        result.unchecked = f"installed from {dist.direct_url.get('url', 'a URL')}, not from PyPI"
        return result
    answer = fetch(dist.name, deadline)
    if isinstance(answer, Unreachable):
        result.unreachable = answer.reason
        return result
    if isinstance(answer, NotFound):
        result.unchecked = "not on PyPI (404)"
        return result
    info = answer.get("info")
    latest = info.get("version") if isinstance(info, dict) else None
    if not isinstance(latest, str):
        result.unchecked = "PyPI's answer has no info.version"
        return result
    result.latest = latest
    advisories = parse_advisories(answer.get("vulnerabilities"))
    if isinstance(advisories, str):
        result.unchecked = advisories
        return result
    try:
        have, last = Version(dist.version), Version(latest)
    except InvalidVersion:
        result.unchecked = f"version {dist.version!r} or {latest!r} is not PEP 440"
        return result
    if have != last:
        where = "behind" if have < last else "ahead of"
        result.unchecked = f"{where} latest {latest}: PyPI lists the advisories of {latest} only"
    hits = [(adv, why) for adv in advisories if (why := applies(have, last, adv))]
    result.findings = [Finding(dist.display, dist.version, m, why) for m, why in group(hits)]
    return result


def describe(finding: Finding) -> str:
    first = finding.advisories[0]
    spelled = {n.upper(): n for a in finding.advisories for n in (a.id, *a.aliases)}
    names = sorted(spelled[n] for n in finding.names() - {first.id.upper()})
    also = f" ({', '.join(names)})" if names else ""
    link = f" {first.link}" if first.link else ""
    return f"{finding.package} {finding.version}: {first.id}{also}: {finding.why}{link}"


def report(
    results: Sequence[Result], allow: Allowlist, strict: bool, skipped: list[Installed]
) -> int:
    def say(text: str = "") -> None:
        print(f"audit: {text}" if text else "", flush=True)

    answered = [r for r in results if r.unreachable is None]
    at_latest = [r for r in answered if r.unchecked is None]
    unchecked = [r for r in answered if r.unchecked is not None]
    unreachable = [r for r in results if r.unreachable is not None]
    findings = [f for r in results for f in r.findings]
    for f in findings:
        hits = sorted(f.names() & allow.ids.keys())
        if hits:
            f.allowed_by = allow.ids[hits[0]]
            allow.used.update(hits)

    for d in skipped:
        say(f"skipped {d.display} {d.version} (this project)")
    say(
        f"{len(results)} packages, {len(answered)} answered by PyPI: {len(at_latest)} at their "
        f"latest release (checked), {len(unchecked)} unchecked, {len(unreachable)} unreachable"
    )
    open_unchecked = []
    if unchecked:
        say("unchecked (PyPI's data cannot show these are free of known advisories):")
        for r in unchecked:
            entry = allow.unchecked.get(r.dist.name)
            if entry:
                allow.used.add(entry.key)
            else:
                open_unchecked.append(r)
            mark = f"allowlisted, line {entry.lineno}" if entry else "NOT ALLOWLISTED"
            say(f"  {r.dist.display} {r.dist.version}: {r.unchecked}  [{mark}]")
    for r in unreachable:
        say(f"  UNREACHABLE {r.dist.display} {r.dist.version}: {r.unreachable}")
    failing = [f for f in findings if f.allowed_by is None]
    say(f"vulnerabilities: {len(findings)} ({len(failing)} not allowlisted)")
    for f in findings:
        mark = f"allowlisted, line {f.allowed_by.lineno}" if f.allowed_by else "NOT ALLOWLISTED"
        say(f"  {describe(f)}  [{mark}]")

    today = datetime.date.today()
    for entry in [*allow.ids.values(), *allow.unchecked.values()]:
        if entry.key not in allow.used and not unreachable:
            say(f"note: allowlist line {entry.lineno} matched nothing here: {entry.line}")
        elif entry.review < today:
            say(f"note: allowlist line {entry.lineno} is past its review date: {entry.line}")

    if failing:
        say(
            "FAILED: vulnerabilities not in the allowlist; raise the minimum version if a fix "
            "exists, else allowlist the id with a reason and a review date"
        )
        return EXIT_VULNERABLE
    if unreachable:
        say(f"FAILED: PyPI not reached for {len(unreachable)} package(s): the audit is incomplete")
        return EXIT_UNREACHABLE
    if open_unchecked:
        names = ", ".join(r.dist.display for r in open_unchecked)
        if strict:
            say(
                f"FAILED: unchecked and not allowlisted: {names}; upgrade them to their latest "
                "release, or add 'unchecked:NAME  # why, YYYY-MM-DD' to the allowlist"
            )
            return EXIT_UNCHECKED
        say(f"warning: unchecked and not allowlisted: {names} (fails with --strict)")
    say("OK")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--venv", type=Path, help="audit this venv (default: this interpreter's)")
    parser.add_argument("--allowlist", type=Path, default=ROOT / "audit-allowlist.txt")
    parser.add_argument("--strict", action="store_true", help="fail on unchecked packages too")
    parser.add_argument(
        "--deadline", type=float, default=60.0, help="seconds for all PyPI requests"
    )
    args = parser.parse_args(argv)
    strict = args.strict
    try:
        allow = load_allowlist(args.allowlist)
    except AllowlistError as exc:
        print(f"audit: {exc}", file=sys.stderr)
        return EXIT_ALLOWLIST

    own = project_name()
    dists = installed(args.venv)
    skipped = [d for d in dists if d.name == own]
    todo = [d for d in dists if d.name != own]
    where = args.venv or Path(sys.prefix)
    print(
        f"audit: auditing {len(todo)} packages in {where}, {len(allow.ids)} allowlisted ids, "
        f"{len(allow.unchecked)} allowlisted unchecked{', strict' if strict else ''}",
        flush=True,
    )
    deadline = time.monotonic() + args.deadline
    with ThreadPoolExecutor(WORKERS) as pool:
        results = list(pool.map(lambda d: audit(d, deadline), todo))
    return report(results, allow, strict, skipped)


if __name__ == "__main__":
    sys.exit(main())
