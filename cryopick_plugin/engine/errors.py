"""Errors raised for bad input.

An `InputError` carries a one-line message of the form ``<file>: <problem>``. The command line prints it
and exits with status 2; a Scipion protocol fails with the same message. It is raised before any long
computation starts and before any output is written.
"""


class InputError(ValueError):
    """Bad user input: a one-line message naming the file (or option) and the problem."""

    def __init__(self, source, problem):
        self.source = str(source)
        self.problem = str(problem)
        super().__init__(f"{self.source}: {self.problem}")
