"""The README's shell commands, as tests run them: `readme_commands("SLURM")` is what a user copies from that
section (backslash continuations joined, trailing `# comments` dropped); `all_readme_commands()` is every command
of the README with its section's heading; `ray_cluster_step` says which README Ray command tests/cluster/test_ray.py
runs as what. Example output belongs in ```text fences, which hold no commands."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SHELL_FENCES = {"", "sh", "bash", "shell"}


def readme_commands(heading: str, readme: Path = README) -> list[str]:
    """The commands of every code block (4-space indented or ```-fenced) under `heading` (the heading's text,
    any level), up to the next heading of the same or a higher level."""
    return commands_in(section(heading, readme))


def all_readme_commands(readme: Path = README) -> list[tuple[str, str]]:
    """(heading, command) for every command of the README in order; a command belongs to the nearest heading above
    it (the lines before the first subheading belong to the title; a `#` line inside a fence is no heading)."""
    out, heading, lines, fenced = [], "", [], False
    for line in readme.read_text().splitlines():
        if re.match(r"\s*(```|~~~)", line):
            fenced = not fenced
        m = None if fenced else re.match(r"(#+)\s+(.*?)\s*$", line)
        if m:
            out += [(heading, c) for c in commands_in(lines)]
            heading, lines = m.group(2), []
        else:
            lines.append(line)
    return out + [(heading, c) for c in commands_in(lines)]


def fenced_blocks(heading: str, language: str, readme: Path = README) -> list[str]:
    """The text of every ```<language> block under `heading` (e.g. the Python a README section shows)."""
    blocks, current = [], None
    for line in section(heading, readme):
        if current is None and re.match(rf"\s*```+\s*{re.escape(language)}\s*$", line):
            current = []
        elif current is not None and line.strip().startswith("```"):
            blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def section(heading: str, readme: Path = README) -> list[str]:
    """The lines under `heading`, up to the next heading of the same or a higher level."""
    lines = readme.read_text().splitlines()
    start = level = None
    for i, line in enumerate(lines):
        m = re.match(r"(#+)\s+(.*?)\s*$", line)
        if m and m.group(2) == heading:
            start, level = i + 1, len(m.group(1))
            break
    if start is None:
        raise KeyError(f"no heading {heading!r} in {readme}")
    out = []
    for line in lines[start:]:
        m = re.match(r"(#+)\s", line)
        if m and len(m.group(1)) <= level:
            break
        out.append(line)
    return out


def commands_in(lines: list[str]) -> list[str]:
    return [c for c in (strip_comment(c) for c in join_continuations(code_lines(lines))) if c]


def code_lines(lines: list[str]) -> list[str]:
    """The lines inside code blocks: fenced blocks of a shell (or no) language, and indented blocks, which start
    after a blank line."""
    out, fence, previous_blank = [], None, True
    for line in lines:
        m = re.match(r"\s*(```+|~~~+)\s*(\w*)", line)
        if fence is None and m:
            fence = (m.group(1), m.group(2) in SHELL_FENCES)
        elif fence is not None:
            if line.strip().startswith(fence[0]):
                fence = None
            elif fence[1]:
                out.append(line)
        elif line.startswith("    ") and (previous_blank or (out and out[-1].endswith("\\"))):
            out.append(line[4:])
            previous_blank = True                  # the block goes on while its lines stay indented
            continue
        previous_blank = not line.strip()
    return out


def join_continuations(lines: list[str]) -> list[str]:
    commands, current = [], ""
    for line in lines:
        piece = line.strip() if current else line.rstrip()
        if piece.endswith("\\"):
            current += piece[:-1].rstrip() + " "
        else:
            commands.append(current + piece)
            current = ""
    if current:
        commands.append(current.rstrip())
    return commands


def strip_comment(command: str) -> str:
    """Drop a `# comment` (a # at the start or after a blank, outside quotes)."""
    quote = None
    for i, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or command[i - 1].isspace()):
            return command[:i].rstrip()
    return command.strip()


def with_overrides(command: str, *overrides: str) -> str:
    """The command with each key=value override replacing the one of the same key, or appended."""
    words = shlex.split(command)
    for override in overrides:
        key = override.split("=", 1)[0] + "="
        hits = [i for i, w in enumerate(words) if w.startswith(key)]
        if hits:
            words[hits[0]] = override
        else:
            words.append(override)
    return shlex.join(words)


def ray_cluster_step(command: str) -> str | None:
    """What tests/cluster/test_ray.py does with a command of the README's Ray section: "env" (an `export` it
    applies to the commands after it), "head" (`ray start --head ...`), "join" (`ray start --address=...`),
    "sweep" (the sweep on the running cluster) or "stop" (`ray stop`, which it does by stopping exactly the
    processes it started); None for a command it does not run."""
    words = shlex.split(command)
    if words[0] == "export":
        return "env"
    if words[:3] == ["ray", "start", "--head"]:
        return "head"
    if words[:2] == ["ray", "start"] and any(w.startswith("--address=") for w in words):
        return "join"
    if words == ["ray", "stop"]:
        return "stop"
    if words[0] == "python" and "hydra.launcher.ray.init.address=auto" in words:
        return "sweep"
    return None
