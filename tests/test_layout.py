"""The README's module map lists exactly the package's modules."""

import pkgutil
import re
from pathlib import Path

import sequnlearn

README = Path(__file__).parents[1] / "README.md"


def _documented() -> set[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split("## How the code is laid out", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"^\| `([a-z_.]+)` \|", section, flags=re.M))
    for line in section.splitlines():  # the toyworld row names its modules in its text
        if line.startswith("| `toyworld` |"):
            names |= {f"toyworld.{m}" for m in re.findall(r"`([a-z_]+)`", line.split("|")[2])}
    return names


def _modules() -> set[str]:
    found = set()
    root = Path(sequnlearn.__file__).parent
    for info in pkgutil.walk_packages(sequnlearn.__path__, prefix="sequnlearn."):
        name = info.name.removeprefix("sequnlearn.")
        init = root.joinpath(*name.split("."), "__init__.py")
        if name == "__main__" or (info.ispkg and not init.read_text(encoding="utf-8").strip()):
            continue  # an empty package marker is no module to describe
        found.add(name)
    return found


def test_readme_module_map_matches_the_package():
    documented, actual = _documented(), _modules()
    assert actual - documented == set(), f"modules missing from the README's map: {sorted(actual - documented)}"
    assert documented - actual == set(), f"README lists modules that do not exist: {sorted(documented - actual)}"
