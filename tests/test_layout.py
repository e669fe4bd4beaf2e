"""The README's layout table is the import rule: every module imports only from lower floors
(or from its own package folder), only the commands parse argv, only files.py touches safetensors."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "knnmem"


def floors() -> dict[str, int]:
    """README floor table: 'knnmem/x.py' or 'knnmem/x/' -> floor."""
    table = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        match = re.match(r"\| (\d+) \| (.+?) \|", line)
        if match:
            for name in re.findall(r"`([^`]+)`", match.group(2)):
                table[name] = int(match.group(1))
    return table


def floor_of(path: Path, table: dict[str, int]) -> int:
    rel = path.relative_to(PACKAGE).as_posix()
    if rel in table:
        return table[rel]
    folder = rel.split("/")[0] + "/"
    assert folder in table, f"knnmem/{rel} is in no floor of the README's layout table"
    return table[folder]


def imported_files(path: Path) -> set[Path]:
    """knnmem files that `path` imports (lazy imports included)."""
    here = path.parent
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = here
            for _ in range(node.level - 1):
                base = base.parent
            parts = node.module.split(".") if node.module else []
            names = [a.name for a in node.names] if not node.module else [None]
            for name in names:
                target = base.joinpath(*parts, *([name] if name else []))
                for candidate in (target.with_suffix(".py"), target / "__init__.py"):
                    if candidate.exists() and PACKAGE in candidate.parents:
                        found.add(candidate)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("knnmem."):
                    target = ROOT.joinpath(*alias.name.split("."))
                    found |= {c for c in (target.with_suffix(".py"), target / "__init__.py") if c.exists()}
    return found


def test_every_import_points_to_a_lower_floor():
    table = floors()
    assert table.get("commands/") == 8 and table.get("files.py") == 0  # the table was read
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        mine = floor_of(path, table)
        for target in imported_files(path):
            same_folder = target.parent == path.parent and path.parent != PACKAGE
            if target.name == "__init__.py" and target.parent == PACKAGE:
                continue  # `from .. import x` of a module is resolved to the module itself above
            if floor_of(target, table) >= mine and not same_folder:
                wrong.append(f"{path.relative_to(ROOT)} (floor {mine}) imports {target.relative_to(ROOT)}")
    assert not wrong, "\n".join(wrong)


def test_only_commands_parse_argv_and_only_files_touch_safetensors():
    for path in PACKAGE.rglob("*.py"):
        text, rel = path.read_text(), path.relative_to(PACKAGE).as_posix()
        if "import argparse" in text or "sys.argv" in text:
            assert rel.startswith("commands/") or rel == "cli.py", rel
        if re.search(r"^\s*(from|import) safetensors", text, flags=re.M):
            assert rel == "files.py", rel
