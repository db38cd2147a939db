"""Render or lint the Helm chart with the Helm SDK; run by the tool venv's python.

The project venv lacks ``helm_python`` (it lives in ``.tools``), so the tests call
this script in a subprocess. ``chart_render.py CHART [VALUES.yaml ...]`` prints the
rendered objects as a JSON list. ``chart_render.py --batch`` reads
``{"chart": dir, "renders": {key: {"values": {...}, "release": ..., "namespace": ...}},
"lint": {key: values}}`` on stdin and prints ``{"renders": {key: {template: text}
or {"error": message}}, "lint": {key: report}}``, so a test session pays for one process.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import yaml
from helm_python import HelmError, lint  # type: ignore[import-not-found]
from helm_python.chart import Chart  # type: ignore[import-not-found]


def render(chart: str, values: dict[str, Any], release: str, namespace: str) -> dict[str, str]:
    """Template name -> rendered text, as ``helm template`` would write them."""
    files: dict[str, str] = Chart.load(chart).render(
        values, name=release, namespace=namespace, is_install=True
    )
    return files


def batch(request: dict[str, Any]) -> dict[str, Any]:
    chart = request["chart"]
    renders: dict[str, Any] = {}
    for key, job in request.get("renders", {}).items():
        try:
            renders[key] = render(
                chart,
                job.get("values", {}),
                job.get("release", "secret-sidecar"),
                job.get("namespace", "default"),
            )
        except HelmError as exc:  # a failing render is a result the caller asserts on
            renders[key] = {"error": str(exc)}
    lints = {
        key: lint(chart, values, strict=True) for key, values in request.get("lint", {}).items()
    }
    return {"renders": renders, "lint": lints}


def main(argv: list[str]) -> int:
    if argv[1:] == ["--batch"]:
        json.dump(batch(json.load(sys.stdin)), sys.stdout)
        return 0
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    values: dict[str, Any] = {}
    for path in argv[2:]:
        with open(path, encoding="utf-8") as handle:
            values.update(yaml.safe_load(handle) or {})
    files = render(argv[1], values, "secret-sidecar", "default")
    objects = [
        document
        for name, text in sorted(files.items())
        if name.endswith((".yaml", ".yml"))
        for document in yaml.safe_load_all(text)
        if document
    ]
    json.dump(objects, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
