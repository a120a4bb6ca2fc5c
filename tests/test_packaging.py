"""The package as a product: licence metadata, extras, `--version` and what the sdist carries."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import tomllib

import controlnext

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_is_apache_2_as_an_spdx_string_with_its_file():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"  # a string (PEP 639), not the deprecated {text = ...} table
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text and "Copyright The controlnext authors" in text
    # setuptools reads the SPDX form from 77 on; older ones print a deprecation box or fail
    (setuptools,) = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    assert setuptools == "setuptools>=77"


def test_all_extra_is_every_other_extra_but_dev():
    extras = PYPROJECT["project"]["optional-dependencies"]
    (spec,) = extras["all"]
    named = spec.removeprefix("controlnext[").removesuffix("]").split(",")
    assert sorted(named) == sorted(set(extras) - {"all", "dev"})


def test_version_flag_prints_the_package_version():
    out = subprocess.run([sys.executable, "-m", "controlnext.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"controlnext {controlnext.__version__}"
    assert controlnext.__version__ == PYPROJECT["project"]["version"]


ACCELERATE_CONFIGS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_accelerate_configs_exist():
    assert len(ACCELERATE_CONFIGS) >= 5  # the README cites them


def _has_build() -> bool:
    # importlib.metadata, not find_spec: a local `build/` output folder would pass for the package.
    try:
        importlib.metadata.version("build")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_build(), reason="needs `build`; the manifest test covers it")
def test_sdist_carries_the_accelerate_configs_and_license(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    (sdist,) = tmp_path.glob("controlnext-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert set(ACCELERATE_CONFIGS) <= names
    assert "LICENSE" in names


def test_manifest_rules_select_the_accelerate_configs_and_license(monkeypatch):
    # The sdist's extra files are the MANIFEST.in rules applied to the tree (distutils' own template reader).
    from setuptools._distutils.filelist import FileList

    monkeypatch.chdir(ROOT)
    files = FileList()
    files.findall()  # paths relative to the current folder
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            files.process_template_line(line)
    assert set(ACCELERATE_CONFIGS) | {"LICENSE"} <= {Path(f).as_posix() for f in files.files}
