"""The README and docs/ say only what is true of the code: every command in their shell blocks
names files that exist and flags that the command defines, and every link to a file or a
heading of ours leads somewhere."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# where each command's flags are defined
SOURCES = {
    "test_streaming.py": ["csm_streaming/cli.py", "csm_streaming/options.py"],
    "csm-stream": ["csm_streaming/cli.py", "csm_streaming/options.py"],
    "csm-server": ["csm_streaming/server/app.py", "csm_streaming/options.py"],
    "csm-watermark": ["csm_streaming/verify_watermark.py"],
    "watermarking.py": ["csm_streaming/verify_watermark.py"],
    "setup.sh": ["setup.sh"],
}


def shell_commands(path: Path) -> list[str]:
    """The commands of a document's bash blocks, continuation lines joined, comments cut."""
    text = path.read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands += [c.strip() for c in re.split(r"&&|;", line) if c.strip()]
    return commands


def command_files(words: list[str]) -> tuple[str | None, list[str]]:
    """(the command that owns the flags, the project files it names)."""
    files = [w for w in words if re.fullmatch(r"[\w./-]+\.(py|sh)", w)]
    owner = next((Path(w).name if not w.startswith("benchmarks/") else w for w in words
                  if Path(w).name in SOURCES or w.startswith("benchmarks/")
                  or w == "deploy_vast.py"), None)
    if owner is None:
        owner = next((Path(w).name for w in words if Path(w).name in SOURCES), None)
    return owner, files


def flag_sources(owner: str) -> str:
    if owner in SOURCES:
        paths = SOURCES[owner]
    elif owner.startswith("benchmarks/"):
        paths = [owner, "benchmarks/common.py", "csm_streaming/options.py"]
    else:  # deploy_vast.py: a face over csm_streaming/deploy/
        paths = [owner, "csm_streaming/deploy/command.py", "csm_streaming/options.py"]
    return "\n".join((ROOT / p).read_text() for p in paths)


CASES = [(doc.name, cmd) for doc in DOCS for cmd in shell_commands(doc)]


def test_the_docs_have_commands_to_check():
    assert len(CASES) > 20 and {d for d, _ in CASES} >= {"README.md", "performance.md"}


@pytest.mark.parametrize("doc, command", CASES)
def test_each_command_names_real_files_and_flags(doc, command):
    words = shlex.split(command)
    if not words or words[0] in ("curl", "export", "cd", "ssh", "pip", "git") \
            or "pytest" in words:
        return  # not one of ours: their flags are theirs
    owner, files = command_files(words)
    for f in files:
        assert (ROOT / f).exists(), f"{doc}: `{command}` names {f}, which does not exist"
    if owner is None:
        return
    source = flag_sources(owner)
    for w in words:
        flag = w.split("=")[0]
        if re.fullmatch(r"--[a-z][\w-]*", flag):
            assert f'"{flag}"' in source or f"{flag})" in source, \
                f"{doc}: `{command}`: {owner} has no {flag}"


def test_links_to_our_files_and_headings_lead_somewhere():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.name}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken


def anchors(path: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings."""
    out = set()
    for title in re.findall(r"^#+ (.+)$", path.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
        out.add(slug)
    return out
