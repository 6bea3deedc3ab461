"""The README's shell commands, as tests run them: `readme_commands("SLURM")` is what a user copies from that
section (backslash continuations joined, trailing `# comments` dropped)."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
SHELL_FENCES = {"", "sh", "bash", "shell"}


def readme_commands(heading: str, readme: Path = README) -> list[str]:
    """The commands of every code block (4-space indented or ```-fenced) under `heading` (the heading's text,
    any level), up to the next heading of the same or a higher level."""
    lines = readme.read_text().splitlines()
    start = level = None
    for i, line in enumerate(lines):
        m = re.match(r"(#+)\s+(.*?)\s*$", line)
        if m and m.group(2) == heading:
            start, level = i + 1, len(m.group(1))
            break
    if start is None:
        raise KeyError(f"no heading {heading!r} in {readme}")
    section = []
    for line in lines[start:]:
        m = re.match(r"(#+)\s", line)
        if m and len(m.group(1)) <= level:
            break
        section.append(line)
    return [c for c in (strip_comment(c) for c in join_continuations(code_lines(section))) if c]


def code_lines(section: list[str]) -> list[str]:
    """The lines inside code blocks: fenced blocks of a shell (or no) language, and indented blocks, which start
    after a blank line."""
    out, fence, previous_blank = [], None, True
    for line in section:
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
