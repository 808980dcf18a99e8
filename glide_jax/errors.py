"""What a command-line tool prints when it fails: one line, never a traceback on the screen.

Expected failures (bad input, missing or unconvertible weights, a failed download) are reported
by each CLI as one `error:` line with exit code 2. Anything else is a bug: `report_bug` writes the
traceback to a file and prints one line saying so, with exit code 1.
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from typing import Callable

EXIT_BUG = 1
EXIT_INTERRUPTED = 130


def report_bug(err: BaseException, program: str) -> int:
    """One line on stderr saying this is a bug and where its traceback was written; EXIT_BUG."""
    text = "".join(traceback.format_exception(type(err), err, err.__traceback__))
    try:
        handle, path = tempfile.mkstemp(prefix=f"{program}-traceback-", suffix=".txt")
        with open(handle, "w") as f:
            f.write(text)
        where = f"the traceback is in {path}"
    except OSError:
        where = "the traceback could not be written to a file:\n" + text
    print(f"error: an unexpected error, which is a bug in glide-jax ({type(err).__name__}: "
          f"{' '.join(str(err).split())[:300]}); {where}", file=sys.stderr)
    return EXIT_BUG


def run_cli(main: Callable[[], int], program: str) -> int:
    """`main()`'s exit code, with an unexpected exception turned into `report_bug`'s one line."""
    try:
        return main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # the CLI reported its expected errors itself
        return report_bug(err, program)
