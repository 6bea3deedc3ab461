"""Hydra's bash completion, queried as bash asks it on a Tab: the lines that set COMP_* for a command line, call the
completion function and print the reply, for tests that have installed the completion in a real bash first."""
from __future__ import annotations

import shlex


def completion_query(line: str, function: str = "hydra_bash_completion") -> str:
    """Bash lines completing `line` (the cursor at its end): they print `REPLY: <candidates>`."""
    return "\n".join([f"COMP_LINE={shlex.quote(line)}", "COMP_POINT=${#COMP_LINE}",
                      f"COMP_WORDS=({' '.join(shlex.quote(w) for w in line.split())})",
                      f"COMP_CWORD={len(line.split()) - 1}", function, 'echo "REPLY: ${COMPREPLY[*]}"'])


def completion_reply(stdout: str) -> list[str]:
    """The candidates a completion_query printed."""
    return stdout.split("REPLY:", 1)[1].split()
