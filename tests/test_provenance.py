"""provenance.json tells the truth about sequnlearn's own source, wherever it is installed."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import sequnlearn
from sequnlearn.runs import source_info

ROOT = Path(__file__).resolve().parents[1]


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_a_checkout_records_its_own_commit():
    info = source_info()
    assert info["source"] == "git checkout" and info["version"] == sequnlearn.__version__
    assert info["git_commit"] == _git(ROOT, "rev-parse", "HEAD")


def test_an_install_inside_another_repository_records_the_version_not_that_commit(tmp_path):
    repo = tmp_path / "research-project"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "notes.txt").write_text("someone else's project\n")
    _git(repo, "add", "notes.txt")
    _git(repo, "commit", "-q", "-m", "theirs")
    (repo / "notes.txt").write_text("dirty\n")
    source = tmp_path / "sequnlearn-src"  # a copy: pip builds in the source tree
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    site = repo / ".venv-site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(source)], check=True, capture_output=True, timeout=300)
    code = ("import json, sequnlearn; from sequnlearn.runs import provenance; "
            "p = provenance(); print(json.dumps([sequnlearn.__file__, p['sequnlearn'], p['git_commit'], p['git_dirty']]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(site), "PATH": os.environ["PATH"], "HOME": str(tmp_path)}).stdout
    where, info, commit, dirty = json.loads(out.splitlines()[-1])
    assert where.startswith(str(site))
    assert info["source"] == "installed" and info["version"] == sequnlearn.__version__
    assert commit is None and dirty is None and info["git_commit"] is None
    assert _git(repo, "rev-parse", "HEAD") not in out
