"""constraints.txt: the versions `make test` and `make demo` install, within setup.py's ranges."""

from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
CI_PYTHON = Marker('python_version == "3.11"')


def pins() -> dict[str, tuple[str, Requirement]]:
    """{canonical name: (pinned version, requirement)} from constraints.txt."""
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==", f"not an exact pin: {line!r}"
        assert req.marker == CI_PYTHON, f"{line!r}: pins hold for CI's Python 3.11 only"
        name = canonicalize_name(req.name)
        assert name not in out, f"{req.name} pinned twice"
        out[name] = (specs[0].version, req)
    return out


def package_requirements() -> list[Requirement]:
    """setup.py's requirements of the extras `make test` installs (the Makefile's EXTRAS)."""
    extras = re.search(r"^EXTRAS \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    reqs = [Requirement(r) for r in importlib.metadata.requires("siasam-fast")]
    return [r for r in reqs
            if r.marker is None or any(r.marker.evaluate({"extra": e}) for e in extras.split(","))]


def test_constraints_are_exact_pins_for_ci_python_and_leave_torch_to_the_makefile():
    pinned = pins()
    assert len(pinned) > 20  # the whole set-up, not only the direct dependencies
    assert "torch" not in pinned and "triton" not in pinned  # TORCH_CPU in the Makefile pins them


def test_every_dependency_is_pinned_within_setup_py_s_range():
    pinned = pins()
    for req in package_requirements():
        name = canonicalize_name(req.name)
        if name in ("torch", "triton"):
            continue
        assert name in pinned, f"{req.name} ({req}) is a dependency but constraints.txt has no pin"
        version = pinned[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"constraints.txt pins {req.name}=={version}, outside setup.py's {req.specifier}")


def test_the_makefile_installs_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text().replace("\\\n", " ")
    assert re.search(r"^CONSTRAINTS \?= constraints\.txt$", makefile, re.M)
    installs = [line for line in makefile.splitlines() if "pip install -q" in line
                and "--upgrade pip" not in line]
    assert len(installs) == 2 and all("$(PIP_C)" in line for line in installs), installs
    # torch's CPU pins stay in the package's install too (an upgrade would pull a CUDA torch)
    assert all("$(TORCH_CPU)" in line for line in installs), installs
