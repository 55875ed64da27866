"""Imports run one way (services -> scheduler -> models -> kernels, and services -> client),
and the processes around the engine core, and the client, never load torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("services", "scheduler", "models", "kernels")  # each may import only those after it


def imported_twolane_packages(folder: str) -> dict[str, set[str]]:
    """For each module of `folder`, the twolane packages it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted((ROOT / folder).glob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        found[path.name] = {n.split(".")[1] for n in names if n.startswith("twolane.")}
    return found


@pytest.mark.parametrize("layer", LAYERS)
def test_a_layer_imports_only_the_layers_below_it(layer: str) -> None:
    allowed = {layer, *LAYERS[LAYERS.index(layer) + 1 :], "v1"}
    if layer == "services":
        allowed.add("bench")  # the `twolane bench` command starts the benchmarks
        allowed.add("client")  # the CLI calls servers through it
    for module, packages in imported_twolane_packages(layer).items():
        assert packages <= allowed, f"{layer}/{module} imports {sorted(packages - allowed)}"


def test_the_client_imports_only_itself_and_the_api() -> None:
    # Services may use the client (the CLI does); the client needs nothing of a server.
    for module, packages in imported_twolane_packages("client").items():
        assert packages <= {"client", "v1"}, f"client/{module} imports {sorted(packages)}"
    for layer in LAYERS[1:]:
        for module, packages in imported_twolane_packages(layer).items():
            assert "client" not in packages, f"{layer}/{module} imports the client"


@pytest.mark.parametrize(
    "module",
    [
        "twolane.services.frontend",
        "twolane.services.http_front",
        "twolane.services.job_runner",
        # job_runner imports these as it starts the worker, not at its own import.
        "twolane.services.job_worker",
        "twolane.services.job_metrics",
        "twolane.services.supervisor",
        "twolane.services.gateway",
        "twolane.services.webhooks_cli",
        "twolane.services.cli",
        "twolane.scheduler.client",
        "twolane.scheduler.prefix_hash",
        "twolane.client",
    ],
)
def test_processes_around_the_engine_core_do_not_load_torch(module: str) -> None:
    code = f"import sys, {module}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
