"""The one exception type for problems a user can fix, and the settings and commands its messages name.

A message names a setting with `setting("batch-size")` and a subcommand with `command("train")`, not with the
command line's words: each front end words them its own way (`--batch-size 8` and `hinge train` on the command line,
`batch_size=8` and `hinge_cli.api.train()` in Python), so the core speaks to neither.
"""

from __future__ import annotations

from typing import Protocol

SETTING, COMMAND, VALUE = "\x1e", "\x1d", "\x1f"  # around a named setting or command in a message; between name and value


def setting(name: str, value: object = None) -> str:
    """A setting named in a message, by its command-line name (`batch-size`), with the value to give, if any."""
    return SETTING + name + ("" if value is None else VALUE + str(value)) + SETTING


def command(name: str) -> str:
    """A subcommand named in a message, by its command-line name (`pretrain-warmup`)."""
    return COMMAND + name + COMMAND


class Words(Protocol):
    """How a front end words the settings and commands a message names."""

    def setting(self, name: str, value: str | None) -> str: ...

    def command(self, name: str) -> str: ...


class CommandLineWords:
    """The `hinge` command line's words: `--batch-size 8`, `hinge train`."""

    def setting(self, name: str, value: str | None) -> str:
        return f"--{name}" + ("" if value is None else f" {value}")

    def command(self, name: str) -> str:
        return f"hinge {name}"


COMMAND_LINE = CommandLineWords()


def worded(text: str, words: Words) -> str:
    """`text` with the settings and commands it names in `words`."""
    out = []
    for i, part in enumerate(text.split(SETTING)):
        if i % 2:
            name, _, value = part.partition(VALUE)
            out.append(words.setting(name, value if VALUE in part else None))
        else:
            out.append("".join(words.command(p) if j % 2 else p for j, p in enumerate(part.split(COMMAND))))
    return "".join(out)


class HingeError(Exception):
    """A user-fixable problem: says what was wrong and what to do about it.

    The CLI prints it as a single line and exits with status 2, so the message
    must stand on its own without a traceback. `problem` and `fix` keep the settings
    they name unworded; `str()` words them as the command line does.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem.rstrip(". ")
        self.fix = fix
        super().__init__(self.worded(COMMAND_LINE))

    def worded(self, words: Words) -> str:
        """The whole message in a front end's words."""
        text = f"{self.problem}; {self.fix}" if self.fix else self.problem
        return worded(text, words)

    def __str__(self) -> str:
        return self.worded(COMMAND_LINE)
